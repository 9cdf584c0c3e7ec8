"""Routes of event channels: publish, read, dead letters and their replay."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from ..client import Client
from .body import STREAM_ID
from .responses import OBJ, JSONBody


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


def add_routes(router: APIRouter, client: Client) -> None:
    """Add the event channel routes to ``router`` (the ``/v1`` router)."""

    @router.post("/events/{channel}", status_code=202, tags=["events"], response_model=OBJ)
    def publish_event(channel: str, body: EventBody) -> JSONBody:
        """Publish an event; each matching EventSubscription starts one run (once per id)."""
        return JSONBody(client.publish(channel, body.data, body.id), 202)

    @router.get("/events/{channel}", tags=["events"], response_model=OBJ)
    def channel_events(channel: str, limit: int = Query(50, ge=1, le=1000)) -> JSONBody:
        """The channel's newest events, oldest first."""
        return JSONBody({"channel": channel, "events": client.channel_events(channel, limit)})

    @router.get("/events/{channel}/dead", tags=["events"], response_model=OBJ)
    def dead_events(channel: str, limit: int = Query(50, ge=1, le=1000)) -> JSONBody:
        """Events that could not start a run, with the subscription and the reason."""
        return JSONBody({"channel": channel, "dead": client.dead_events(channel, limit)})

    @router.post("/events/{channel}/replay", tags=["events"], response_model=OBJ)
    def replay_events(channel: str, body: ReplayBody | None = None) -> JSONBody:
        """Deliver dead-lettered events again once their cause is fixed."""
        ids = body.ids if body is not None else None
        return JSONBody({"channel": channel, "outcomes": client.replay(channel, ids or None)})
