"""``orchestrator events ...``: publish events to channels, list them, and the dead-lettered
ones that could not start a run."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.table import Table

from .base import Env, echo_json, fmt_when, json_option, out_console


@click.group()
def events() -> None:
    """Publish events to channels; list them, and the ones that could not start a run."""


@events.command("publish")
@click.argument("channel")
@click.option("--data", "data_json", metavar="JSON", help="The event's payload (JSON).")
@click.option("--id", "event_id", help="The event's id (an id seen before starts no new run).")
@json_option
@click.pass_obj
def events_publish(
    env: Env, channel: str, data_json: str | None, event_id: str | None, as_json: bool
) -> None:
    """Publish an event: each matching EventSubscription starts one run."""
    try:
        data = json.loads(data_json) if data_json is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--data") from None
    event = env.client.publish(channel, data, event_id)
    if as_json:
        echo_json(event)
    else:
        click.echo(f"published {event['id']} to {channel} (stream id {event['stream_id']})")


@events.command("ls")
@click.argument("channel")
@click.option("--limit", default=20, show_default=True, help="At most this many events.")
@json_option
@click.pass_obj
def events_ls(env: Env, channel: str, limit: int, as_json: bool) -> None:
    """The channel's newest events, oldest first."""
    found = env.client.channel_events(channel, limit)
    if as_json:
        echo_json(found)
        return
    table = Table("stream id", "event id", "time", "data", box=None)
    for e in found:
        table.add_row(e["stream_id"], e["id"], fmt_when(e.get("time")), _compact(e.get("data")))
    out_console().print(table)
    subs = env.client.subscriptions(channel)
    click.echo(f"subscriptions: {', '.join(sorted(subs)) or 'none'}")


@events.command("dead")
@click.argument("channel")
@click.option("--limit", default=50, show_default=True, help="At most this many entries.")
@json_option
@click.pass_obj
def events_dead(env: Env, channel: str, limit: int, as_json: bool) -> None:
    """Events that matched a subscription but could not start a run, and why."""
    found = env.client.dead_events(channel, limit)
    if as_json:
        echo_json(found)
        return
    table = Table("entry", "event id", "subscription", "reason", box=None)
    for e in found:
        table.add_row(e["entry"], e["event"]["id"], e["subscription"], e["reason"])
    out_console().print(table)


@events.command("replay")
@click.argument("channel")
@click.option("--entry", "entries", multiple=True, help="A dead-letter entry (default: all).")
@json_option
@click.pass_obj
def events_replay(env: Env, channel: str, entries: tuple[str, ...], as_json: bool) -> None:
    """Deliver dead-lettered events again, after fixing what stopped them."""
    outcomes = env.client.replay(channel, list(entries) or None)
    if as_json:
        echo_json(outcomes)
    else:
        for o in outcomes:
            what = f"run {o['run']}" if o.get("run") else f"dead again: {o.get('reason')}"
            if o.get("filtered"):
                what = "filtered out"
            click.echo(f"{o['entry']}  {o['subscription']}  {what}")
    if any(o.get("dead") for o in outcomes):
        sys.exit(1)


def _compact(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
