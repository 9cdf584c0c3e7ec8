"""The REST API (FastAPI): trigger and inspect runs, decide approvals, send signals.

``create_api(settings, client=None, dev=False)`` builds the app; ``orchestrator api``
serves it with uvicorn. Every endpoint but ``/healthz`` needs ``Authorization: Bearer
<token>`` with a token from ``ORCHESTRATOR_API_TOKENS``; with ``dev=True`` a request that
reached the server on a loopback address needs none. The package's errors become JSON
4xx bodies (``{"error": ..., "message": ..., "field": ...}``); bad input never a 5xx.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .client import Client
from .dashboard import mount_dashboard
from .errors import (
    DefinitionError,
    ExpressionError,
    FlowStopped,
    Forbidden,
    InputError,
    InvalidState,
    NotFound,
    OrchestratorError,
)
from .graph import to_mermaid
from .metrics import metrics_registry
from .runtime import trigger_flow
from .settings import Settings
from .store import ACTIVE, ENDED
from .variables import resolve
from .webhooks import SignatureError
from .webhooks import verify as verify_signature

STATUSES = (*ACTIVE, *ENDED)
#: A Redis stream entry id (``<ms>`` or ``<ms>-<seq>``, each below 2**64); Redis rejects others.
STREAM_ID = r"^[0-9]{1,19}(-[0-9]{1,19})?$"


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


def _error(code: int, error: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=code)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        resp = _error(401, "unauthorized", exc.message)
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return _error(422, "invalid_input", str(exc), field=f"inputs.{exc.field}")

    @app.exception_handler(DefinitionError)
    async def _definition(request: Request, exc: DefinitionError) -> JSONResponse:
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
            async def handler(request: Request, exc: Exception) -> JSONResponse:
                return _error(status, name, str(exc))

            return handler

        app.add_exception_handler(cls, make())

    @app.exception_handler(OrchestratorError)
    async def _other(request: Request, exc: OrchestratorError) -> JSONResponse:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
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
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": name, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return _error(503, "unavailable", f"cannot reach Redis: {exc}")
        return _error(500, "internal_error", f"Redis refused a command: {exc}")


def create_api(settings: Settings, client: Client | None = None, dev: bool = False) -> FastAPI:
    """The REST API app; it closes ``client`` at shutdown only when it made it."""
    owned = client is None
    client = client or Client(settings)
    tokens = [t.encode() for t in token_list(settings)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owned:
                client.close()

    app = FastAPI(
        title="celery-orchestrator",
        version="v1",
        description="Trigger and inspect runs of declarative flows.",
        lifespan=lifespan,
    )
    app.state.client = client
    _install_handlers(app)

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

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Liveness: pings Redis; 503 when it cannot be reached."""
        try:
            client.store.r.ping()
        except redis.RedisError as exc:
            return _error(503, "unavailable", f"cannot reach Redis: {exc}", status="down")
        return JSONResponse({"status": "ok", "redis": "ok"})

    registry = metrics_registry(client)

    @app.get("/metrics", tags=["health"], dependencies=[Depends(authenticate)])
    def metrics(request: Request) -> Response:
        """Prometheus metrics of every worker and run, read from Redis (see metrics.py)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)

    @v1.post("/flows/{name}/runs", status_code=201, tags=["runs"])
    def trigger(
        name: str,
        body: TriggerBody | None = None,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> dict[str, Any]:
        """Start a run; the same ``Idempotency-Key`` returns the same run."""
        inputs = body.inputs if body is not None else {}
        run = client.trigger(name, inputs=inputs, idempotency_key=idempotency_key or None)
        return run.as_dict()

    @v1.get("/runs", tags=["runs"])
    def list_runs(
        flow: str | None = None,
        status: str | None = Query(None, description=f"one of: {', '.join(STATUSES)}"),
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Runs, newest first, filtered by flow and status."""
        if status is not None and status not in STATUSES:
            return _error(
                422,
                "invalid_request",
                f"unknown status {status!r}; expected one of: {', '.join(STATUSES)}",
                field="query.status",
            )
        return {"runs": [r.as_dict() for r in client.runs(flow=flow, status=status, limit=limit)]}

    @v1.get("/runs/{run_id}", tags=["runs"])
    def get_run(run_id: str) -> dict[str, Any]:
        return client.get(run_id).as_dict()

    @v1.get("/runs/{run_id}/events", tags=["runs"])
    def run_events(
        run_id: str,
        after: str = Query("-", pattern=f"^-$|{STREAM_ID}", description="an event id, or -"),
    ) -> dict[str, Any]:
        """The run's event log, oldest first; ``after`` is an event id to continue from."""
        client.get(run_id)  # 404 for an unknown run rather than an empty list
        return {"events": client.events(run_id, after=after)}

    @v1.post("/runs/{run_id}/cancel", tags=["runs"])
    def cancel(run_id: str) -> dict[str, Any]:
        return client.cancel(run_id).as_dict()

    @v1.post("/runs/{run_id}/retry", tags=["runs"])
    def retry(run_id: str) -> dict[str, Any]:
        return client.retry(run_id).as_dict()

    @v1.post("/runs/{run_id}/steps/{step}/approve", tags=["approvals"])
    def approve(run_id: str, step: str, body: DecisionBody) -> dict[str, Any]:
        client.approve(run_id, step, by=body.by, comment=body.comment)
        return {"run": run_id, "step": step, "decision": "approved", "by": body.by}

    @v1.post("/runs/{run_id}/steps/{step}/reject", tags=["approvals"])
    def reject(run_id: str, step: str, body: DecisionBody) -> dict[str, Any]:
        client.reject(run_id, step, by=body.by, comment=body.comment)
        return {"run": run_id, "step": step, "decision": "rejected", "by": body.by}

    @v1.post("/runs/{run_id}/signals/{name}", tags=["signals"])
    def signal(run_id: str, name: str, payload: Annotated[Any, Body()] = None) -> dict[str, Any]:
        """Send a signal; ``result`` is ``resumed`` (a step was waiting) or ``kept``."""
        result = client.signal(run_id, name, payload)
        return {"run": run_id, "signal": name, "result": result}

    @v1.get("/flows", tags=["flows"])
    def flows() -> dict[str, Any]:
        return {"flows": client.flows()}

    @v1.get("/flows/{name}/graph", tags=["flows"])
    def graph(name: str, run: str | None = None) -> dict[str, Any]:
        """The flow as Mermaid text; with ``?run=ID``, coloured by that run's step statuses."""
        info, resource = client.flow(name)
        version = info.get("version")
        statuses = None
        if run is not None:
            r = client.get(run)
            if r.flow != name:
                raise NotFound(f"run {run!r} is a run of {r.flow!r}, not of {name!r}")
            version = r.version
            resource = client.plan(r.flow, r.version).resource
            statuses = {k: s.status for k, s in r.steps.items()}
        return {
            "flow": name,
            "version": version,
            "format": "mermaid",
            "graph": to_mermaid(resource, statuses),
        }

    @v1.get("/flows/{name}/events", tags=["flows"])
    def flow_events(
        name: str, runs: int = Query(20, ge=1, le=500), limit: int = Query(200, ge=1, le=5000)
    ) -> dict[str, Any]:
        """The event log across the flow's newest runs (``orchestrator flows logs``)."""
        return {"flow": name, "events": client.flow_events(name, runs=runs, limit=limit)}

    @v1.post("/events/{channel}", status_code=202, tags=["events"])
    def publish_event(channel: str, body: EventBody) -> dict[str, Any]:
        """Publish an event; each matching EventSubscription starts one run (once per id)."""
        return client.publish(channel, body.data, body.id)

    @v1.get("/events/{channel}", tags=["events"])
    def channel_events(channel: str, limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """The channel's newest events, oldest first."""
        return {"channel": channel, "events": client.channel_events(channel, limit)}

    @v1.get("/events/{channel}/dead", tags=["events"])
    def dead_events(channel: str, limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """Events that could not start a run, with the subscription and the reason."""
        return {"channel": channel, "dead": client.dead_events(channel, limit)}

    @v1.post("/events/{channel}/replay", tags=["events"])
    def replay_events(channel: str, body: ReplayBody | None = None) -> dict[str, Any]:
        """Deliver dead-lettered events again once their cause is fixed."""
        ids = body.ids if body is not None else None
        return {"channel": channel, "outcomes": client.replay(channel, ids or None)}

    @app.post("/v1/hooks/{flow}", status_code=201, tags=["webhooks"])
    async def webhook(
        flow: str,
        request: Request,
        x_signature: str | None = Header(None, alias="X-Signature"),
    ) -> JSONResponse:
        """Trigger ``flow`` with the JSON body as its inputs; authenticated by signature.

        ``X-Signature: t=<unix time>,sha256=<HMAC-SHA256(secret, "<t>." + body)>`` with
        the flow's ``spec.webhook.secret``; no bearer token (senders rarely can add one).
        The same signed request within five minutes returns the same run (200).
        """
        body = await request.body()
        return await run_in_threadpool(_webhook, flow, body, x_signature)

    def _webhook(flow: str, body: bytes, signature: str | None) -> JSONResponse:
        _, resource = client.flow(flow)
        hook = resource.spec.webhook
        if hook is None:
            raise NotFound(f"flow {flow!r} has no webhook (set spec.webhook.secret)")
        var = client.store.resource("Variable", hook.secret)
        try:
            if var is None:
                raise ExpressionError(f"webhook secret variable {hook.secret!r} is not deployed")
            secret = str(resolve(hook.secret, var))
        except ExpressionError as exc:
            return _error(503, "unavailable", f"the webhook cannot be verified here: {exc}")
        try:
            digest = verify_signature(signature, body, secret)
        except SignatureError as exc:
            return _error(401, "invalid_signature", str(exc), field="header.X-Signature")
        try:
            inputs = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            return _error(400, "invalid_json", f"request body is not valid JSON: {exc}")
        if not isinstance(inputs, dict):
            return _error(
                422, "invalid_request", "the body must be a JSON object of inputs", field="body"
            )
        run_id, created, _, _ = trigger_flow(
            client.store, client.app, client.plan, flow, inputs, f"hook:{digest}"
        )
        run = client.get(run_id)
        return JSONResponse(jsonable_encoder(run.as_dict()), status_code=201 if created else 200)

    app.include_router(v1)
    mount_dashboard(app)  # the web dashboard at /ui; its data calls use /v1 above
    return app
