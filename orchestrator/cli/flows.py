"""``orchestrator flows ...``: deployed flows, their state and their recent runs."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

import click
import yaml
from rich.table import Table
from rich.text import Text

from ..model import ScheduleSpec
from .base import (
    RUN_STATUSES,
    Env,
    cell,
    echo_json,
    event_line,
    fmt_when,
    json_option,
    out_console,
    status_cell,
)


@click.group()
def flows() -> None:
    """Deployed flows: list, view, start, stop, status."""


@flows.command("ls")
@json_option
@click.pass_obj
def flows_ls(env: Env, as_json: bool) -> None:
    """List deployed flows with their current version and state."""
    rows = env.client.flows()
    if as_json:
        echo_json(rows)
        return
    table = Table("flow", "version", "state", "deployed")
    for f in rows:
        deployed = f.get("deployed_at")
        table.add_row(
            cell(f["name"]),
            cell(f.get("version")),
            status_cell(f.get("state")),
            cell(fmt_when(float(deployed)) if deployed else None),
        )
    out_console().print(table)


@flows.command("view")
@click.argument("name")
@json_option
@click.pass_obj
def flows_view(env: Env, name: str, as_json: bool) -> None:
    """Show a flow's current definition as YAML, with its version and state."""
    from ..scheduler import upcoming  # Celery: only flows view needs it

    info, resource = env.client.flow(name)
    schedules = [
        {
            **sch,
            "upcoming": upcoming(
                ScheduleSpec.model_validate(
                    {k: sch[k] for k in ("flow", "cron", "timezone", "inputs", "catchup")}
                )
            ),
        }
        for sch in env.client.schedules()
        if sch["flow"] == name
    ]
    if as_json:
        echo_json({"name": name, **info, "definition": resource.document(), "schedules": schedules})
        return
    click.echo(f"# flow {name}: version {info.get('version')}, {info.get('state')}")
    for sch in schedules:
        zone = ZoneInfo(sch["timezone"])
        times = ", ".join(
            datetime.fromtimestamp(t, zone).strftime("%Y-%m-%d %H:%M %Z") for t in sch["upcoming"]
        )
        paused = " (paused: the flow is stopped)" if info.get("state") == "stopped" else ""
        click.echo(f"# schedule {sch['name']}: {sch['cron']} {sch['timezone']}{paused}")
        click.echo(f"#   next five: {times}")
    click.echo(yaml.safe_dump(resource.document(), sort_keys=False, allow_unicode=True), nl=False)


@flows.command("start")
@click.argument("name")
@click.pass_obj
def flows_start(env: Env, name: str) -> None:
    """Let a flow accept triggers (and its schedules fire)."""
    env.client.start_flow(name)
    click.echo(f"flow {name} started")


@flows.command("stop")
@click.argument("name")
@click.pass_obj
def flows_stop(env: Env, name: str) -> None:
    """Make a flow refuse triggers; runs already going carry on."""
    env.client.stop_flow(name)
    click.echo(f"flow {name} stopped")


@flows.command("status")
@click.argument("name")
@click.option("--limit", default=100, show_default=True, help="How many recent runs to count.")
@json_option
@click.pass_obj
def flows_status(env: Env, name: str, limit: int, as_json: bool) -> None:
    """A flow's state, version and how its recent runs ended."""
    info, _resource = env.client.flow(name)
    recent = env.client.runs(flow=name, limit=limit)
    counts = Counter(r.status for r in recent)
    if as_json:
        echo_json({"name": name, **info, "recent_runs": len(recent), "runs": dict(counts)})
        return
    console = out_console()
    deployed = info.get("deployed_at")
    console.print(
        Text.assemble(
            ("flow ", ""),
            (name, "bold"),
            f"  version {info.get('version')}  ",
            status_cell(info.get("state")),
            f"  deployed {fmt_when(float(deployed)) if deployed else '-'}",
        )
    )
    table = Table("status", "runs", title=f"last {len(recent)} runs", title_justify="left")
    for status in RUN_STATUSES:
        if counts.get(status):
            table.add_row(status_cell(status), cell(counts[status]))
    console.print(table)


@flows.command("logs")
@click.argument("name")
@click.option("--runs", "runs_", default=20, show_default=True, help="How many recent runs.")
@click.option("--limit", default=200, show_default=True, help="At most this many events.")
@json_option
@click.pass_obj
def flows_logs(env: Env, name: str, runs_: int, limit: int, as_json: bool) -> None:
    """Print the event log across a flow's recent runs, oldest first, with each run's id."""
    for event in env.client.flow_events(name, runs=runs_, limit=limit):
        if as_json:
            click.echo(json.dumps(event, ensure_ascii=False))
        else:
            run_id = event.pop("run")
            click.echo(f"{run_id}  {event_line(event)}")
