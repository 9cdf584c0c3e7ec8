"""Routes of deployed flows: the list, a flow's graph and its event log."""

from __future__ import annotations

from fastapi import APIRouter, Query

from ..client import Client
from ..errors import NotFound
from ..graph import to_mermaid
from .responses import OBJ, JSONBody, read_run


def add_routes(router: APIRouter, client: Client) -> None:
    """Add the flow routes to ``router`` (the ``/v1`` router)."""

    @router.get("/flows", tags=["flows"], response_model=OBJ)
    def flows() -> JSONBody:
        return JSONBody({"flows": client.flows()})

    @router.get("/flows/{name}/graph", tags=["flows"], response_model=OBJ)
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

    @router.get("/flows/{name}/events", tags=["flows"], response_model=OBJ)
    def flow_events(
        name: str, runs: int = Query(20, ge=1, le=500), limit: int = Query(200, ge=1, le=5000)
    ) -> JSONBody:
        """The event log across the flow's newest runs (``orchestrator flows logs``)."""
        return JSONBody({"flow": name, "events": client.flow_events(name, runs=runs, limit=limit)})
