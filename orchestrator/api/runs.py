"""Routes of runs: trigger, list, read, events, cancel, retry, approvals and signals."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query
from pydantic import BaseModel, ConfigDict, Field

from ..client import Client, Run
from ..errors import NotFound
from .body import STATUSES, STREAM_ID
from .responses import OBJ, JSONBody, error_body, read_run, run_json


class TriggerBody(BaseModel):
    """Body of ``POST /v1/flows/{name}/runs``."""

    model_config = ConfigDict(extra="forbid")
    inputs: dict[str, Any] = Field(default_factory=dict)


class DecisionBody(BaseModel):
    """Body of ``POST /v1/runs/{id}/steps/{step}/approve|reject``."""

    model_config = ConfigDict(extra="forbid")
    by: str = Field(min_length=1)
    comment: str | None = None


def add_routes(router: APIRouter, client: Client, max_nesting: int) -> None:
    """Add the run routes to ``router`` (the ``/v1`` router), in the documented order."""
    _add_reads(router, client, max_nesting)
    _add_changes(router, client, max_nesting)


def _add_reads(router: APIRouter, client: Client, max_nesting: int) -> None:
    @router.post("/flows/{name}/runs", status_code=201, tags=["runs"], response_model=OBJ)
    def trigger(
        name: str,
        body: TriggerBody | None = None,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> JSONBody:
        """Start a run; the same ``Idempotency-Key`` returns the same run (409 when it
        comes with other inputs)."""
        inputs = body.inputs if body is not None else {}
        run = client.trigger(name, inputs=inputs, idempotency_key=idempotency_key or None)
        return JSONBody(run_json(run, max_nesting), 201)

    @router.get("/runs", tags=["runs"], response_model=OBJ)
    def list_runs(
        flow: str | None = None,
        status: str | None = Query(None, description=f"one of: {', '.join(STATUSES)}"),
        limit: int = Query(50, ge=1, le=1000),
    ) -> JSONBody:
        """Runs, newest first, filtered by flow and status."""
        if status is not None and status not in STATUSES:
            return error_body(
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

    @router.get("/runs/{run_id}", tags=["runs"], response_model=OBJ)
    def get_run(run_id: str) -> JSONBody:
        run, notes = read_run(client, run_id)
        return JSONBody(run_json(run, max_nesting, notes))

    @router.get("/runs/{run_id}/events", tags=["runs"], response_model=OBJ)
    def run_events(
        run_id: str,
        after: str = Query("-", pattern=f"^-$|{STREAM_ID}", description="an event id, or -"),
    ) -> JSONBody:
        """The run's event log, oldest first; ``after`` is an event id to continue from."""
        if not client.store.run_hash(run_id):  # 404 for an unknown run, not an empty list
            raise NotFound(f"run {run_id!r} does not exist (or has passed its retention)")
        return JSONBody({"events": client.events(run_id, after=after)})


def _add_changes(router: APIRouter, client: Client, max_nesting: int) -> None:
    def run_response(run: Run) -> JSONBody:
        return JSONBody(run_json(run, max_nesting), 200)

    @router.post("/runs/{run_id}/cancel", tags=["runs"], response_model=OBJ)
    def cancel(run_id: str) -> JSONBody:
        return run_response(client.cancel(run_id))

    @router.post("/runs/{run_id}/retry", tags=["runs"], response_model=OBJ)
    def retry(run_id: str) -> JSONBody:
        return run_response(client.retry(run_id))

    @router.post("/runs/{run_id}/steps/{step}/approve", tags=["approvals"], response_model=OBJ)
    def approve(run_id: str, step: str, body: DecisionBody) -> JSONBody:
        client.approve(run_id, step, by=body.by, comment=body.comment)
        return JSONBody({"run": run_id, "step": step, "decision": "approved", "by": body.by})

    @router.post("/runs/{run_id}/steps/{step}/reject", tags=["approvals"], response_model=OBJ)
    def reject(run_id: str, step: str, body: DecisionBody) -> JSONBody:
        client.reject(run_id, step, by=body.by, comment=body.comment)
        return JSONBody({"run": run_id, "step": step, "decision": "rejected", "by": body.by})

    @router.post("/runs/{run_id}/signals/{name}", tags=["signals"], response_model=OBJ)
    def signal(run_id: str, name: str, payload: Annotated[Any, Body()] = None) -> JSONBody:
        """Send a signal; ``result`` is ``resumed`` (a step was waiting) or ``kept``."""
        result = client.signal(run_id, name, payload)
        return JSONBody({"run": run_id, "signal": name, "result": result})
