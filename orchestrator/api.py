"""The REST API (FastAPI): trigger and inspect runs, decide approvals, send signals.

``create_api(settings, client=None, dev=False)`` builds the app; ``orchestrator api``
serves it with :func:`serve` (uvicorn). Every endpoint but ``/healthz`` and the webhooks
(``/v1/hooks/{flow}``, authenticated by signature) needs ``Authorization: Bearer <token>``
with a token from ``ORCHESTRATOR_API_TOKENS``, the OpenAPI schema and its pages
(``/openapi.json``, ``/docs``, ``/redoc``) included; with ``dev=True`` a request that
reached the server on a loopback address needs none. The token is checked before the
request body is read.

Every error is a JSON body (``{"error": ..., "message": ..., "field": ...}``); bad input
is a 4xx, never a 5xx:

* A body over ``max_request_bytes`` is refused while it is read (:class:`BodyLimit`): a
  ``Content-Length`` over the limit at once, a chunked body once it passes the limit;
  413, and the connection is closed so the rest is never read.
* A JSON body is parsed by :func:`parse_json_body`: UTF-8 only, no lone surrogates, each
  member nested at most ``max_nesting`` deep (a body nested 100,000 deep is a 422, not a
  ``RecursionError``).
* Values over a limit (``LimitExceeded``) are 413 for a size, 422 otherwise, naming the
  field and the limit; an idempotency key reused with other inputs is 409.

Responses are written by :func:`render_json`, never by FastAPI's encoder: a stored value
that JSON cannot carry (from before the limits: nested too deep to read, a lone
surrogate, NaN) is shown as a marker string and named in the run's ``notes``, so one bad
run cannot break a run list or a run page.
"""

from __future__ import annotations

import hmac
import http
import ipaddress
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import h11
import redis
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from kombu.exceptions import OperationalError as BrokerUnavailable
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .client import Client, Run
from .dashboard import mount_dashboard
from .errors import (
    DefinitionError,
    ExpressionError,
    FlowStopped,
    Forbidden,
    IdempotencyConflict,
    InputError,
    InvalidState,
    LimitExceeded,
    NotFound,
    OrchestratorError,
)
from .graph import to_mermaid
from .health import touch_while_serving
from .limits import check_value
from .metrics import metrics_registry
from .runtime import trigger_flow
from .settings import Settings
from .store import ACTIVE, ENDED
from .variables import resolve
from .webhooks import MISMATCH, SignatureError
from .webhooks import parse as parse_signature

log = logging.getLogger(__name__)

STATUSES = (*ACTIVE, *ENDED)
#: A Redis stream entry id (``<ms>`` or ``<ms>-<seq>``, each below 2**64); Redis rejects others.
STREAM_ID = r"^[0-9]{1,19}(-[0-9]{1,19})?$"
#: ``Retry-After`` (seconds) of a 503 answered while Redis or the broker cannot be reached.
RETRY_AFTER_S = 5
#: Largest request line plus headers (bytes); beyond it the server answers 431.
MAX_HEADER_BYTES = 16 * 1024
#: A response nests at most this deep; anything deeper (a value stored before the
#: limits) is a marker string. It keeps json.dumps well inside the recursion limit.
RENDER_MAX_NESTING = 512


class TriggerBody(BaseModel):
    """Body of ``POST /v1/flows/{name}/runs``."""

    model_config = ConfigDict(extra="forbid")
    inputs: dict[str, Any] = Field(default_factory=dict)


class DecisionBody(BaseModel):
    """Body of ``POST /v1/runs/{id}/steps/{step}/approve|reject``."""

    model_config = ConfigDict(extra="forbid")
    by: str = Field(min_length=1)
    comment: str | None = None


class EventBody(BaseModel):
    """Body of ``POST /v1/events/{channel}``."""

    model_config = ConfigDict(extra="forbid")
    data: Any = Field(None, description="the event's payload; `event.data` in expressions")
    id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]{1,200}$",
        description="the event's id; an id seen before starts no new run (default: a new id)",
    )


class ReplayBody(BaseModel):
    """Body of ``POST /v1/events/{channel}/replay``: which dead-letter entries (none: all)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[str, Field(pattern=STREAM_ID)]] | None = None


class _Unauthorized(Exception):
    def __init__(self, message: str):
        self.message = message


class Refused(StarletteHTTPException):
    """A request refused before its handler ran (body too big, not JSON, too deep).

    An HTTPException, so FastAPI's body reading passes it on instead of turning it into
    its generic 400; the handler writes ``error``, ``message`` and ``extra`` as the body.
    """

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.error, self.extra = error, extra


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_list(settings: Settings) -> list[str]:
    return [t.strip() for t in settings.api_tokens.split(",") if t.strip()]


# -- responses -----------------------------------------------------------------------------

#: What json.dumps raises for a value JSON cannot carry (UnicodeEncodeError is a ValueError).
_UNRENDERABLE = (RecursionError, ValueError, TypeError)


def _dumps(value: Any) -> bytes:
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=jsonable_encoder
    ).encode("utf-8")


def _note(notes: list[dict[str, str]], path: str, why: str) -> str:
    notes.append({"field": path or "(value)", "message": f"{why}: not shown"})
    return f"<not shown: {why}>"


def _text(text: str, path: str, notes: list[dict[str, str]]) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        notes.append(
            {"field": path or "(value)", "message": "holds a lone surrogate: shown escaped"}
        )
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def sanitize(value: Any, path: str, notes: list[dict[str, str]], max_nesting: int) -> Any:
    """A copy of ``value`` that JSON can carry, each replacement named in ``notes``.

    Lists and objects nested ``max_nesting`` deep become a marker string, lone
    surrogates are written escaped (``\\ud800``), NaN and infinities become markers.
    Iterative, so no depth is too deep for it.
    """
    root: list[Any] = [None]
    stack: list[tuple[Any, str, int, Any, Any]] = [(value, path, 0, root, 0)]
    while stack:
        v, p, depth, parent, slot = stack.pop()
        if isinstance(v, dict | list | tuple):
            if depth >= max_nesting:
                parent[slot] = _note(notes, p, f"nested more than {max_nesting} levels deep")
            elif isinstance(v, dict):
                keys = [_text(str(k), f"{p} (a key)", notes) for k in v]
                child: Any = dict.fromkeys(keys)
                parent[slot] = child
                for k, item in zip(keys, v.values(), strict=True):
                    stack.append((item, f"{p}.{k}" if p else k, depth + 1, child, k))
            else:
                child = [None] * len(v)
                parent[slot] = child
                stack.extend((item, f"{p}[{i}]", depth + 1, child, i) for i, item in enumerate(v))
        elif isinstance(v, str):
            parent[slot] = _text(v, p, notes)
        elif isinstance(v, float) and not math.isfinite(v):
            parent[slot] = _note(notes, p, f"{v!r}, which JSON cannot carry")
        elif v is None or isinstance(v, bool | int | float):
            parent[slot] = v
        else:
            try:
                parent[slot] = jsonable_encoder(v)
            except Exception:  # noqa: BLE001 - whatever it is, it is not shown
                parent[slot] = _note(notes, p, f"a {type(v).__name__}, not JSON")
    return root[0]


def render_json(content: Any) -> bytes:
    """``content`` as JSON; what JSON cannot carry is replaced (see :func:`sanitize`)."""
    try:
        return _dumps(content)
    except _UNRENDERABLE:
        notes: list[dict[str, str]] = []
        clean = sanitize(content, "", notes, RENDER_MAX_NESTING)
        if isinstance(clean, dict):
            clean["notes"] = [*(clean.get("notes") or []), *notes]
        return _dumps(clean)


class JSONBody(Response):
    """A JSON response written by :func:`render_json` (bytes are sent as they are)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else render_json(content)


def _error(
    code: int, error: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONBody:
    return JSONBody({"error": error, "message": message, **extra}, code, headers=headers)


#: Run hash fields the client decodes as JSON (see ``Client._run_from_hash``).
_RUN_JSON_FIELDS = ("inputs", "outputs", "error")


def _hash_field(name: str) -> str:
    """Where a run hash field shows in the run's JSON (``o:upper`` -> ``steps.upper.output``)."""
    if name.startswith("o:"):
        return f"steps.{name[2:]}.output"
    if name.startswith("s:"):
        return f"steps.{name[2:]}"
    return name


def read_run(client: Client, run_id: str) -> tuple[Run, list[dict[str, str]]]:
    """The run, and notes on stored values that could not be read back.

    A value nested deeper than ``json.loads`` can read (stored before the nesting
    limit) or not JSON at all is replaced by a marker, not raised for the whole run.
    """
    try:
        return client.get(run_id), []
    except (RecursionError, ValueError):
        pass
    raw = client.store.run_hash(run_id)
    if not raw:
        raise NotFound(f"run {run_id!r} does not exist (or has passed its retention)")
    notes: list[dict[str, str]] = []
    readable = dict(raw)
    for name, text in raw.items():
        if not text or not (name in _RUN_JSON_FIELDS or name.startswith(("s:", "o:"))):
            continue
        try:
            json.loads(text)
        except RecursionError:
            why = "stored nested too deep to read"
        except ValueError as exc:
            why = f"stored as text that is not JSON ({exc})"
        else:
            continue
        marker = _note(notes, _hash_field(name), why)
        readable[name] = json.dumps({"status": "unknown"} if name.startswith("s:") else marker)
    return client._run_from_hash(readable), notes


def run_json(run: Run, max_nesting: int, notes: list[dict[str, str]] | None = None) -> bytes:
    """One run as JSON; values JSON cannot carry become markers named in ``notes``."""
    doc = run.as_dict()
    notes = list(notes or [])
    if notes:
        doc["notes"] = notes
    try:
        return _dumps(doc)
    except _UNRENDERABLE:
        pass
    for key in _RUN_JSON_FIELDS:
        doc[key] = sanitize(doc.get(key), key, notes, max_nesting)
    for name, step in doc["steps"].items():
        for key in ("input", "output", "error"):
            step[key] = sanitize(step.get(key), f"steps.{name}.{key}", notes, max_nesting)
    doc.pop("notes", None)
    doc = sanitize(doc, "", notes, max_nesting + 4)  # the rest: ids, statuses, step records
    doc["notes"] = notes
    return _dumps(doc)


# -- requests ------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: no request body over ``max_bytes`` is read, no headers over
    :data:`MAX_HEADER_BYTES` are served (431; headers that reach the server in one piece
    pass h11's own limit, which only bounds a request still incomplete).

    A ``Content-Length`` over the limit is answered 413 before the app runs (the body is
    never read); a body without one (chunked) is counted as it streams in and refused
    the moment it passes the limit. Either way the 413 closes the connection, so the
    rest of the body is not read either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self) -> Refused:
        return Refused(
            413,
            "limit_exceeded",
            f"request body is over the limit of {self.max_bytes:,} bytes "
            "(limit: ORCHESTRATOR_MAX_REQUEST_BYTES)",
            headers={"Connection": "close"},
            field="body",
            limit="max_request_bytes",
        )

    async def _send_refusal(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = self._refusal()
        response = _error(exc.status_code, exc.error, exc.detail, exc.headers, **exc.extra)
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(k) + len(v) + 4 for k, v in headers)
        if size > MAX_HEADER_BYTES:
            response = _error(
                431,
                "headers_too_large",
                f"the request line and headers are over {MAX_HEADER_BYTES:,} bytes",
                {"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        length = Headers(raw=headers).get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await self._send_refusal(scope, receive, send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._refusal()
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, sending)
        except Refused as exc:  # read by something that does not answer it (not FastAPI)
            if started or exc.status_code != 413:
                raise
            await self._send_refusal(scope, receive, send)


def parse_json_body(body: bytes, settings: Settings) -> Any:
    """A request body as JSON: UTF-8 only, each member nested at most ``max_nesting``.

    Raises :class:`Refused` (400 not UTF-8; 422 too deep or a lone surrogate, naming the
    place) or ``json.JSONDecodeError`` (not JSON).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(
            400, "invalid_json", f"request body is not UTF-8 (byte {exc.start})", field="body"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise Refused(
            400, "invalid_json", f"request body is not valid JSON: {exc}", field="body"
        ) from None
    except RecursionError:
        raise Refused(
            422,
            "limit_exceeded",
            f"request body is nested more than {settings.max_nesting} levels deep "
            "(limit: ORCHESTRATOR_MAX_NESTING)",
            field="body",
            limit="max_nesting",
        ) from None
    # An object body's members are the values (inputs, data, ...): each gets the limit.
    members = value.items() if isinstance(value, dict) else [(None, value)]
    try:
        for key, member in members:
            field = "body" if key is None else f"body.{key}"
            if key is not None and not _encodable(key):
                raise LimitExceeded(f"{field} (a key)", "holds a lone surrogate")
            check_value(
                member,
                field,
                max_bytes=settings.max_request_bytes,
                max_nesting=settings.max_nesting,
                size_limit="max_request_bytes",
            )
    except LimitExceeded as exc:
        raise Refused(
            422, "limit_exceeded", f"{exc.field} {exc.reason}", field=exc.field, limit=exc.limit
        ) from None
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _JSONRequest(Request):
    """A request whose ``json()`` is :func:`parse_json_body` under the app's settings."""

    settings: Settings

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body(), self.settings)
        return self._json


def _route_class(settings: Settings, authenticate: Callable[..., None]) -> type[APIRoute]:
    class Route(APIRoute):
        """A route that checks the token (if it needs one) before reading the body, and
        parses a JSON body with :func:`parse_json_body`."""

        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()
            needs_token = any(d.dependency is authenticate for d in self.dependencies)

            async def route_handler(request: Request) -> Response:
                if needs_token:
                    authenticate(request, request.headers.get("authorization"))
                req = _JSONRequest(request.scope, request.receive)
                req.settings = settings
                return await handler(req)

            return route_handler

    return Route


# -- errors --------------------------------------------------------------------------------


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _unavailable(message: str) -> JSONBody:
    return _error(503, "unavailable", message, headers={"Retry-After": str(RETRY_AFTER_S)})


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONBody:
        return _error(401, "unauthorized", exc.message, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(LimitExceeded)
    async def _limit(request: Request, exc: LimitExceeded) -> JSONBody:
        size = exc.limit is not None and exc.limit.endswith("_bytes")
        return _error(
            413 if size else 422, "limit_exceeded", str(exc), field=exc.field, limit=exc.limit
        )

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONBody:
        return _error(422, "invalid_input", str(exc), field=f"inputs.{exc.field}")

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(request: Request, exc: IdempotencyConflict) -> JSONBody:
        return _error(
            409,
            "idempotency_conflict",
            str(exc),
            field="header.Idempotency-Key",
            idempotency_key=exc.key,
            run_id=exc.run_id,
        )

    @app.exception_handler(DefinitionError)
    async def _definition(request: Request, exc: DefinitionError) -> JSONBody:
        problems = [p.as_dict() for p in exc.problems]
        field = problems[0]["path"] if problems else ""
        return _error(422, "invalid_definition", str(exc), field=field, problems=problems)

    statuses: list[tuple[type[OrchestratorError], int, str]] = [
        (NotFound, 404, "not_found"),
        (FlowStopped, 409, "flow_stopped"),
        (InvalidState, 409, "invalid_state"),
        (Forbidden, 403, "forbidden"),
    ]
    for cls, status, name in statuses:

        def make(status: int = status, name: str = name):
            async def handler(request: Request, exc: Exception) -> JSONBody:
                return _error(status, name, str(exc))

            return handler

        app.add_exception_handler(cls, make())

    @app.exception_handler(OrchestratorError)
    async def _other(request: Request, exc: OrchestratorError) -> JSONBody:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONBody:
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                ctx = e.get("ctx") or {}
                detail = ctx.get("error") or e.get("msg")
                return _error(400, "invalid_json", f"request body is not valid JSON: {detail}")
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        details = [{"field": _loc(e.get("loc", ())), "message": e.get("msg")} for e in errors]
        return _error(
            422,
            "invalid_request",
            str(first.get("msg")),
            field=_loc(first.get("loc", ())),
            errors=details,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONBody:
        headers = getattr(exc, "headers", None)
        if isinstance(exc, Refused):
            return _error(exc.status_code, exc.error, exc.detail, headers, **exc.extra)
        name = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, name, str(exc.detail), headers)

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONBody:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return _unavailable(f"cannot reach Redis: {exc}")
        return _error(500, "internal_error", f"Redis refused a command: {exc}")

    @app.exception_handler(BrokerUnavailable)
    async def _broker(request: Request, exc: BrokerUnavailable) -> JSONBody:
        return _unavailable(f"cannot reach the broker: {exc}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONBody:
        # Still logged with its traceback: Starlette re-raises it after this response.
        return _error(500, "internal_error", f"internal error ({type(exc).__name__}); see the log")


# -- the app -------------------------------------------------------------------------------


def create_api(settings: Settings, client: Client | None = None, dev: bool = False) -> FastAPI:
    """The REST API app; it closes ``client`` at shutdown only when it made it.

    With ``settings.liveness_file`` set, the app touches it while it serves (see
    :func:`orchestrator.health.touch_while_serving`), for ``orchestrator health``.
    """
    owned = client is None
    client = client or Client(settings)
    tokens = [t.encode() for t in token_list(settings)]
    max_nesting = settings.max_nesting

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            if settings.liveness_file:
                tasks.start_soon(touch_while_serving, settings.liveness_file)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
                if owned:
                    client.close()

    app = FastAPI(
        title="celery-orchestrator",
        version="v1",
        description="Trigger and inspect runs of declarative flows.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.client = client
    _install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)

    def authenticate(request: Request, authorization: str | None = Header(None)) -> None:
        if dev:
            server = request.scope.get("server")
            if server and is_loopback(str(server[0])):
                return
        if not authorization:
            raise _Unauthorized("missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Unauthorized("the Authorization header must be 'Bearer <token>'")
        given = token.strip().encode()
        # Compare against every token so the timing says nothing about which matched.
        ok = False
        for t in tokens:
            ok |= hmac.compare_digest(given, t)
        if not ok:
            raise _Unauthorized("invalid token")

    route_class = _route_class(settings, authenticate)
    app.router.route_class = route_class
    token = [Depends(authenticate)]
    v1 = APIRouter(prefix="/v1", dependencies=token, route_class=route_class)

    def run_response(run: Run, status: int = 200) -> JSONBody:
        return JSONBody(run_json(run, max_nesting), status)

    @app.get("/openapi.json", include_in_schema=False, dependencies=token)
    def openapi_schema() -> JSONBody:
        return JSONBody(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=token)
    def docs(request: Request) -> HTMLResponse:
        schema = request.scope.get("root_path", "") + "/openapi.json"
        return get_swagger_ui_html(openapi_url=schema, title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=token)
    def redoc(request: Request) -> HTMLResponse:
        schema = request.scope.get("root_path", "") + "/openapi.json"
        return get_redoc_html(openapi_url=schema, title=f"{app.title} - ReDoc")

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONBody:
        """Liveness: pings Redis; 503 when it cannot be reached."""
        try:
            client.store.r.ping()
        except redis.RedisError as exc:
            return _error(
                503,
                "unavailable",
                f"cannot reach Redis: {exc}",
                headers={"Retry-After": str(RETRY_AFTER_S)},
                status="down",
            )
        return JSONBody({"status": "ok", "redis": "ok"})

    registry = metrics_registry(client)

    @app.get("/metrics", tags=["health"], dependencies=token)
    def metrics(request: Request) -> Response:
        """Prometheus metrics of every worker and run, read from Redis (see metrics.py)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)

    # Handlers return JSONBody (render_json), never a dict for FastAPI's encoder, which
    # recurses and fails on values that JSON cannot carry; response_model is for the docs.
    obj = dict[str, Any]

    @v1.post("/flows/{name}/runs", status_code=201, tags=["runs"], response_model=obj)
    def trigger(
        name: str,
        body: TriggerBody | None = None,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> JSONBody:
        """Start a run; the same ``Idempotency-Key`` returns the same run (409 when it
        comes with other inputs)."""
        inputs = body.inputs if body is not None else {}
        run = client.trigger(name, inputs=inputs, idempotency_key=idempotency_key or None)
        return run_response(run, 201)

    @v1.get("/runs", tags=["runs"], response_model=obj)
    def list_runs(
        flow: str | None = None,
        status: str | None = Query(None, description=f"one of: {', '.join(STATUSES)}"),
        limit: int = Query(50, ge=1, le=1000),
    ) -> JSONBody:
        """Runs, newest first, filtered by flow and status."""
        if status is not None and status not in STATUSES:
            return _error(
                422,
                "invalid_request",
                f"unknown status {status!r}; expected one of: {', '.join(STATUSES)}",
                field="query.status",
            )
        parts = []
        for rid in client.store.run_ids(flow=flow, status=status, limit=limit):
            try:
                run, notes = read_run(client, rid)
            except NotFound:  # expired between the index and the read
                continue
            parts.append(run_json(run, max_nesting, notes))
        return JSONBody(b'{"runs":[' + b",".join(parts) + b"]}")

    @v1.get("/runs/{run_id}", tags=["runs"], response_model=obj)
    def get_run(run_id: str) -> JSONBody:
        run, notes = read_run(client, run_id)
        return JSONBody(run_json(run, max_nesting, notes))

    @v1.get("/runs/{run_id}/events", tags=["runs"], response_model=obj)
    def run_events(
        run_id: str,
        after: str = Query("-", pattern=f"^-$|{STREAM_ID}", description="an event id, or -"),
    ) -> JSONBody:
        """The run's event log, oldest first; ``after`` is an event id to continue from."""
        if not client.store.run_hash(run_id):  # 404 for an unknown run, not an empty list
            raise NotFound(f"run {run_id!r} does not exist (or has passed its retention)")
        return JSONBody({"events": client.events(run_id, after=after)})

    @v1.post("/runs/{run_id}/cancel", tags=["runs"], response_model=obj)
    def cancel(run_id: str) -> JSONBody:
        return run_response(client.cancel(run_id))

    @v1.post("/runs/{run_id}/retry", tags=["runs"], response_model=obj)
    def retry(run_id: str) -> JSONBody:
        return run_response(client.retry(run_id))

    @v1.post("/runs/{run_id}/steps/{step}/approve", tags=["approvals"], response_model=obj)
    def approve(run_id: str, step: str, body: DecisionBody) -> JSONBody:
        client.approve(run_id, step, by=body.by, comment=body.comment)
        return JSONBody({"run": run_id, "step": step, "decision": "approved", "by": body.by})

    @v1.post("/runs/{run_id}/steps/{step}/reject", tags=["approvals"], response_model=obj)
    def reject(run_id: str, step: str, body: DecisionBody) -> JSONBody:
        client.reject(run_id, step, by=body.by, comment=body.comment)
        return JSONBody({"run": run_id, "step": step, "decision": "rejected", "by": body.by})

    @v1.post("/runs/{run_id}/signals/{name}", tags=["signals"], response_model=obj)
    def signal(run_id: str, name: str, payload: Annotated[Any, Body()] = None) -> JSONBody:
        """Send a signal; ``result`` is ``resumed`` (a step was waiting) or ``kept``."""
        result = client.signal(run_id, name, payload)
        return JSONBody({"run": run_id, "signal": name, "result": result})

    @v1.get("/flows", tags=["flows"], response_model=obj)
    def flows() -> JSONBody:
        return JSONBody({"flows": client.flows()})

    @v1.get("/flows/{name}/graph", tags=["flows"], response_model=obj)
    def graph(name: str, run: str | None = None) -> JSONBody:
        """The flow as Mermaid text; with ``?run=ID``, coloured by that run's step statuses."""
        info, resource = client.flow(name)
        version = info.get("version")
        statuses = None
        if run is not None:
            r, _ = read_run(client, run)
            if r.flow != name:
                raise NotFound(f"run {run!r} is a run of {r.flow!r}, not of {name!r}")
            version = r.version
            resource = client.plan(r.flow, r.version).resource
            statuses = {k: s.status for k, s in r.steps.items()}
        return JSONBody(
            {
                "flow": name,
                "version": version,
                "format": "mermaid",
                "graph": to_mermaid(resource, statuses),
            }
        )

    @v1.get("/flows/{name}/events", tags=["flows"], response_model=obj)
    def flow_events(
        name: str, runs: int = Query(20, ge=1, le=500), limit: int = Query(200, ge=1, le=5000)
    ) -> JSONBody:
        """The event log across the flow's newest runs (``orchestrator flows logs``)."""
        return JSONBody({"flow": name, "events": client.flow_events(name, runs=runs, limit=limit)})

    @v1.post("/events/{channel}", status_code=202, tags=["events"], response_model=obj)
    def publish_event(channel: str, body: EventBody) -> JSONBody:
        """Publish an event; each matching EventSubscription starts one run (once per id)."""
        return JSONBody(client.publish(channel, body.data, body.id), 202)

    @v1.get("/events/{channel}", tags=["events"], response_model=obj)
    def channel_events(channel: str, limit: int = Query(50, ge=1, le=1000)) -> JSONBody:
        """The channel's newest events, oldest first."""
        return JSONBody({"channel": channel, "events": client.channel_events(channel, limit)})

    @v1.get("/events/{channel}/dead", tags=["events"], response_model=obj)
    def dead_events(channel: str, limit: int = Query(50, ge=1, le=1000)) -> JSONBody:
        """Events that could not start a run, with the subscription and the reason."""
        return JSONBody({"channel": channel, "dead": client.dead_events(channel, limit)})

    @v1.post("/events/{channel}/replay", tags=["events"], response_model=obj)
    def replay_events(channel: str, body: ReplayBody | None = None) -> JSONBody:
        """Deliver dead-lettered events again once their cause is fixed."""
        ids = body.ids if body is not None else None
        return JSONBody({"channel": channel, "outcomes": client.replay(channel, ids or None)})

    @app.post("/v1/hooks/{flow}", status_code=201, tags=["webhooks"], response_model=obj)
    async def webhook(
        flow: str,
        request: Request,
        x_signature: str | None = Header(None, alias="X-Signature"),
    ) -> JSONBody:
        """Trigger ``flow`` with the JSON body as its inputs; authenticated by signature.

        ``X-Signature: t=<unix time>,sha256=<HMAC-SHA256(secret, "<t>." + body)>`` with
        the flow's ``spec.webhook.secret``; no bearer token (senders rarely can add one).
        The same signed request within five minutes returns the same run (200). A flow
        that is not deployed or has no webhook is refused like a wrong signature (401).
        """
        body = await request.body()  # at most max_request_bytes: BodyLimit
        return await run_in_threadpool(_webhook, flow, body, x_signature)

    def _webhook_secret(flow: str) -> str | None:
        """The flow's webhook secret, or None: not deployed, no webhook, secret missing.

        The same Redis reads whatever the answer (the flow, then a Variable), so the
        time taken does not tell a deployed flow from an unknown name.
        """
        info = client.store.flow_info(flow)
        hook = client.plan(flow, info["version"]).resource.spec.webhook if info else None
        name = hook.secret if hook is not None else f"{flow}\0no-webhook"
        var = client.store.resource("Variable", name)
        if hook is None:
            return None
        if var is None:
            log.warning("webhook of %r: its secret variable %r is not deployed", flow, name)
            return None
        try:
            return str(resolve(name, var))
        except ExpressionError as exc:
            log.warning("webhook of %r cannot be verified here: %s", flow, exc)
            return None

    def _webhook(flow: str, body: bytes, header: str | None) -> JSONBody:
        def refuse(message: str) -> JSONBody:
            return _error(401, "invalid_signature", message, field="header.X-Signature")

        try:
            sig = parse_signature(header)  # depends on the header only, not on the flow
        except SignatureError as exc:
            return refuse(str(exc))
        secret = _webhook_secret(flow)
        # Without a secret the HMAC is computed all the same (with a stand-in), and the
        # refusal is a wrong signature's: nothing tells an unknown flow from a known one.
        matched = sig.matches(body, secret if secret is not None else sig.digest)
        if secret is None or not matched:
            return refuse(MISMATCH)
        try:
            inputs = parse_json_body(body, settings) if body.strip() else {}
        except json.JSONDecodeError as exc:
            return _error(400, "invalid_json", f"request body is not valid JSON: {exc}")
        if not isinstance(inputs, dict):
            return _error(
                422, "invalid_request", "the body must be a JSON object of inputs", field="body"
            )
        run_id, created, _, _ = trigger_flow(
            client.store, client.app, client.plan, flow, inputs, f"hook:{sig.digest}"
        )
        run, notes = read_run(client, run_id)
        return JSONBody(run_json(run, max_nesting, notes), 201 if created else 200)

    app.include_router(v1)
    mount_dashboard(app)  # the web dashboard at /ui; its data calls use /v1 above
    return app


# -- serving -------------------------------------------------------------------------------


class H11JSONErrors(H11Protocol):
    """uvicorn's h11 protocol, answering a request it cannot parse with a JSON body:
    431 when the request line and headers pass ``h11_max_incomplete_event_size``, else
    400 (uvicorn's own answer is plain text)."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or MAX_HEADER_BYTES
        if len(self.conn.trailing_data[0]) > limit:
            status, error = 431, "headers_too_large"
            message = f"the request line and headers are over {limit:,} bytes"
        else:
            status, error, message = 400, "bad_request", f"{msg} (malformed HTTP)"
        body = json.dumps({"error": error, "message": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        reason = http.HTTPStatus(status).phrase.encode()
        for event in (
            h11.Response(status_code=status, headers=headers, reason=reason),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn (h11, headers up to :data:`MAX_HEADER_BYTES`)."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        http=H11JSONErrors,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
