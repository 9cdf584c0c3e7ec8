"""The FastAPI app: its lifespan, the token check, the route class, and the error answers.

:func:`create_api` assembles it: the body limits (:mod:`.body`) as middleware, the error
handlers below, the OpenAPI pages behind the token, then the routes of each resource
(:mod:`.health`, :mod:`.hooks`, and under ``/v1`` :mod:`.runs`, :mod:`.flows`,
:mod:`.events`) and the dashboard.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from kombu.exceptions import OperationalError as BrokerUnavailable
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..client import Client
from ..dashboard import mount_dashboard
from ..errors import (
    DefinitionError,
    FlowStopped,
    Forbidden,
    IdempotencyConflict,
    InputError,
    InvalidState,
    LimitExceeded,
    NotFound,
    OrchestratorError,
)
from ..health import touch_while_serving
from ..settings import Settings
from . import events, flows, health, hooks, runs
from .body import BodyLimit, JSONRequest, Refused
from .responses import JSONBody, error_body, unavailable


class _Unauthorized(Exception):
    def __init__(self, message: str):
        self.message = message


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


# -- the app -------------------------------------------------------------------------------


def create_api(settings: Settings, client: Client | None = None, dev: bool = False) -> FastAPI:
    """The REST API app; it closes ``client`` at shutdown only when it made it.

    With ``settings.liveness_file`` set, the app touches it while it serves (see
    :func:`orchestrator.health.touch_while_serving`), for ``orchestrator health``.
    """
    owned = client is None
    client = client or Client(settings)

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

    authenticate = _authenticator(settings, dev)
    route_class = _route_class(settings, authenticate)
    app.router.route_class = route_class
    token = [Depends(authenticate)]
    v1 = APIRouter(prefix="/v1", dependencies=token, route_class=route_class)

    _add_docs(app, token)
    health.add_routes(app.router, client, token)
    runs.add_routes(v1, client, settings.max_nesting)
    flows.add_routes(v1, client)
    events.add_routes(v1, client)
    hooks.add_routes(app.router, client, settings)
    app.include_router(v1)
    mount_dashboard(app)  # the web dashboard at /ui; its data calls use /v1 above
    return app


def _authenticator(settings: Settings, dev: bool) -> Callable[..., None]:
    """The token check: a bearer token from ``api_tokens`` (none from loopback in dev)."""
    tokens = [t.encode() for t in token_list(settings)]

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

    return authenticate


def _route_class(settings: Settings, authenticate: Callable[..., None]) -> type[APIRoute]:
    class Route(APIRoute):
        """A route that checks the token (if it needs one) before reading the body, and
        parses a JSON body with :func:`~.body.parse_json_body`."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            needs_token = any(d.dependency is authenticate for d in self.dependencies)

            async def route_handler(request: Request) -> Response:
                if needs_token:
                    authenticate(request, request.headers.get("authorization"))
                req = JSONRequest(request.scope, request.receive)
                req.settings = settings
                return await handler(req)

            return route_handler

    return Route


def _add_docs(app: FastAPI, token: list[Any]) -> None:
    """The OpenAPI schema and its pages, behind the token like every other route."""

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


# -- errors --------------------------------------------------------------------------------


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _install_handlers(app: FastAPI) -> None:
    """Every error is a JSON body; bad input is a 4xx, never a 5xx."""
    _install_orchestrator_handlers(app)
    _install_request_handlers(app)


def _install_orchestrator_handlers(app: FastAPI) -> None:
    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONBody:
        return error_body(401, "unauthorized", exc.message, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(LimitExceeded)
    async def _limit(request: Request, exc: LimitExceeded) -> JSONBody:
        size = exc.limit is not None and exc.limit.endswith("_bytes")
        return error_body(
            413 if size else 422, "limit_exceeded", str(exc), field=exc.field, limit=exc.limit
        )

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONBody:
        return error_body(422, "invalid_input", str(exc), field=f"inputs.{exc.field}")

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(request: Request, exc: IdempotencyConflict) -> JSONBody:
        return error_body(
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
        return error_body(422, "invalid_definition", str(exc), field=field, problems=problems)

    statuses: list[tuple[type[OrchestratorError], int, str]] = [
        (NotFound, 404, "not_found"),
        (FlowStopped, 409, "flow_stopped"),
        (InvalidState, 409, "invalid_state"),
        (Forbidden, 403, "forbidden"),
    ]
    for cls, status, name in statuses:

        def make(status: int = status, name: str = name):
            async def handler(request: Request, exc: Exception) -> JSONBody:
                return error_body(status, name, str(exc))

            return handler

        app.add_exception_handler(cls, make())

    @app.exception_handler(OrchestratorError)
    async def _other(request: Request, exc: OrchestratorError) -> JSONBody:
        return error_body(400, "bad_request", str(exc))


def _install_request_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONBody:
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                ctx = e.get("ctx") or {}
                detail = ctx.get("error") or e.get("msg")
                return error_body(400, "invalid_json", f"request body is not valid JSON: {detail}")
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        details = [{"field": _loc(e.get("loc", ())), "message": e.get("msg")} for e in errors]
        return error_body(
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
            return error_body(exc.status_code, exc.error, exc.detail, headers, **exc.extra)
        name = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_body(exc.status_code, name, str(exc.detail), headers)

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONBody:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return unavailable(f"cannot reach Redis: {exc}")
        return error_body(500, "internal_error", f"Redis refused a command: {exc}")

    @app.exception_handler(BrokerUnavailable)
    async def _broker(request: Request, exc: BrokerUnavailable) -> JSONBody:
        return unavailable(f"cannot reach the broker: {exc}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONBody:
        # Still logged with its traceback: Starlette re-raises it after this response.
        return error_body(
            500, "internal_error", f"internal error ({type(exc).__name__}); see the log"
        )
