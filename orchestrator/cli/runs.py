"""``orchestrator run`` and ``orchestrator runs ...``: trigger a run, watch it, and act on
runs (cancel, retry, approve, reject, signal) and their event logs."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..errors import RunFailed
from .base import (
    POLL_S,
    RUN_STATUSES,
    Env,
    cell,
    echo_json,
    error_text,
    event_line,
    fail,
    fmt_clock,
    fmt_duration,
    fmt_when,
    json_option,
    out_console,
    status_cell,
)

if TYPE_CHECKING:  # the client pulls in Celery; commands import it when they need it
    from ..client import Client, Run


def parse_inputs(pairs: tuple[str, ...] | list[str], inputs_json: str | None) -> dict[str, Any]:
    """Trigger inputs from ``--inputs-json`` overlaid with ``--input k=v`` pairs.

    A value that parses as JSON keeps its JSON type (``pages=3`` is an integer,
    ``flag=true`` a boolean, ``tags=["a"]`` a list); anything else is a string.
    """
    values: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            values = json.loads(inputs_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--inputs-json") from exc
        if not isinstance(values, dict):
            raise click.BadParameter(
                "expected a JSON object of input names to values", param_hint="--inputs-json"
            )
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--input")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


@click.command()
@click.argument("name")
@click.option("--input", "-i", "pairs", multiple=True, metavar="NAME=VALUE", help="An input.")
@click.option("--inputs-json", metavar="JSON", help="All inputs as one JSON object.")
@click.option("--idempotency-key", help="A second trigger with the same key gives the same run.")
@click.option("--wait", is_flag=True, help="Show the steps live until the run ends.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds --wait waits.")
@json_option
@click.pass_obj
def run(
    env: Env,
    name: str,
    pairs: tuple[str, ...],
    inputs_json: str | None,
    idempotency_key: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Trigger a run of a deployed flow; print its id, or with --wait its progress and outputs.

    Values of --input are JSON when they parse as JSON (pages=3 is a number,
    flag=true a boolean), strings otherwise.
    """
    inputs = parse_inputs(pairs, inputs_json)
    client = env.client
    started = client.trigger(name, inputs=inputs, idempotency_key=idempotency_key)
    if not wait:
        if as_json:
            echo_json(started.as_dict())
        else:
            click.echo(started.id)
        return
    try:
        if as_json:
            final = _poll_until_done(client, started.id, timeout)
        else:
            final = _watch(client, started.id, timeout)
    except KeyboardInterrupt:
        fail(
            f"stopped waiting; run {started.id} goes on "
            f"(`orchestrator runs logs {started.id} --follow`)",
            code=130,
        )
    _report_end(final, as_json)


def _poll_until_done(client: Client, run_id: str, timeout: float) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        current = client.get(run_id)
        if current.done:
            return current
        if time.monotonic() >= deadline:
            fail(
                f"run {run_id} still {current.status} after {timeout:g}s; "
                f"follow it with `orchestrator runs logs {run_id} --follow`"
            )
        time.sleep(POLL_S)


def _watch(client: Client, run_id: str, timeout: float) -> Run:
    """Poll the run and redraw its steps in place until it ends (or ``timeout`` passes)."""
    console = out_console()
    current = client.get(run_id)
    order = client.plan(current.flow, current.version).order
    deadline = time.monotonic() + timeout
    with Live(_run_view(current, order), console=console, refresh_per_second=10) as live:
        while not current.done:
            if time.monotonic() >= deadline:
                live.stop()
                fail(
                    f"run {run_id} still {current.status} after {timeout:g}s; "
                    f"follow it with `orchestrator runs logs {run_id} --follow`"
                )
            time.sleep(POLL_S)
            current = client.get(run_id)
            live.update(_run_view(current, order))
    if not console.is_terminal:
        console.print()
    return current


def _report_end(final: Run, as_json: bool) -> None:
    if as_json:
        echo_json(final.as_dict())
    else:
        click.echo("outputs:")
        click.echo(json.dumps(final.outputs or {}, indent=2, ensure_ascii=False))
    if final.status != "succeeded":
        fail(f"run {final.id} ended {final.status}: {error_text(final.error)}")


def _step_order(run: Run, order: list[str]) -> list[str]:
    """Step keys in document order (``id[i]`` forEach instances by index), then by start."""
    rank = {sid: i for i, sid in enumerate(order)}

    def key(k: str) -> tuple:
        base, _, rest = k.partition("[")
        idx = tuple(int(i) for i in re.findall(r"\d+", rest))
        return (rank.get(base, len(rank)), idx, run.steps[k].started_at or 0)

    return sorted(run.steps, key=key)


def _step_duration(step: Any, now: float) -> float | None:
    if step.started_at is None:
        return None
    end = step.finished_at if step.finished_at is not None else now
    return max(0.0, end - step.started_at)


def _run_view(run: Run, order: list[str]) -> Group:
    now = time.time()
    end = run.finished_at or now
    elapsed = end - run.created_at if run.created_at else None
    header = Text.assemble(
        ("run ", ""),
        (run.id, "bold"),
        f"  flow {run.flow}  ",
        status_cell(run.status),
        f"  {fmt_duration(elapsed) or ''}",
    )
    table = Table("step", "status", "attempts", "duration", "worker")
    for k in _step_order(run, order):
        s = run.steps[k]
        table.add_row(
            cell(k),
            status_cell(s.status),
            cell(s.attempts),
            cell(fmt_duration(_step_duration(s, now))),
            cell(s.worker),
        )
    return Group(header, table)


@click.group()
def runs() -> None:
    """Runs: list, show, logs; cancel, retry; approve, reject, signal."""


@runs.command("ls")
@click.option("--flow", help="Only runs of this flow.")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs in this status.")
@click.option("--limit", default=20, show_default=True, help="At most this many runs.")
@json_option
@click.pass_obj
def runs_ls(env: Env, flow: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    found = env.client.runs(flow=flow, status=status, limit=limit)
    if as_json:
        echo_json([r.as_dict() for r in found])
        return
    table = Table("run", "flow", "status", "created", "duration", "error")
    for r in found:
        dur = r.finished_at - r.created_at if r.finished_at and r.created_at else None
        table.add_row(
            cell(r.id),
            cell(r.flow),
            status_cell(r.status),
            cell(fmt_when(r.created_at)),
            cell(fmt_duration(dur)),
            cell(error_text(r.error)),
        )
    out_console().print(table)


@runs.command("show")
@click.argument("run_id", metavar="ID")
@json_option
@click.pass_obj
def runs_show(env: Env, run_id: str, as_json: bool) -> None:
    """Show a run: its fields, inputs, outputs and a table of its steps."""
    r = env.client.get(run_id)
    if as_json:
        echo_json(r.as_dict())
        return
    console = out_console()
    fields = Table.grid(padding=(0, 2))
    dur = r.finished_at - r.created_at if r.finished_at and r.created_at else None
    for label, value in (
        ("run", cell(r.id)),
        ("flow", cell(f"{r.flow} (version {r.version})")),
        ("status", status_cell(r.status)),
        ("created", cell(fmt_when(r.created_at))),
        ("finished", cell(fmt_when(r.finished_at))),
        ("duration", cell(fmt_duration(dur))),
        ("idempotency key", cell(r.idempotency_key)),
        ("inputs", cell(json.dumps(r.inputs, ensure_ascii=False))),
        ("outputs", cell(json.dumps(r.outputs, ensure_ascii=False))),
        ("error", cell(error_text(r.error), "red")),
    ):
        fields.add_row(Text(label, style="bold"), value)
    console.print(fields)
    order = env.client.plan(r.flow, r.version).order
    table = Table("step", "status", "attempts", "started", "duration", "worker", "error")
    for k in _step_order(r, order):
        s = r.steps[k]
        table.add_row(
            cell(k),
            status_cell(s.status),
            cell(s.attempts),
            cell(fmt_clock(s.started_at)),
            cell(fmt_duration(s.duration)),
            cell(s.worker),
            cell(error_text(s.error), "red"),
        )
    console.print(table)


@runs.command("cancel")
@click.argument("run_id", metavar="ID")
@json_option
@click.pass_obj
def runs_cancel(env: Env, run_id: str, as_json: bool) -> None:
    """Cancel a run: no new step starts, running steps are revoked, child runs cancelled."""
    r = env.client.cancel(run_id)
    if as_json:
        echo_json(r.as_dict())
    else:
        click.echo(f"run {r.id} {r.status}")


@runs.command("retry")
@click.argument("run_id", metavar="ID")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to end.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait at most.")
@json_option
@click.pass_obj
def runs_retry(env: Env, run_id: str, wait_: bool, timeout: float | None, as_json: bool) -> None:
    """Restart a failed run from its failed step, reusing the outputs of succeeded steps."""
    r = env.client.retry(run_id)
    if wait_:
        with contextlib.suppress(RunFailed):
            env.client.wait(run_id, timeout=timeout)
        r = env.client.get(run_id)
    if as_json:
        echo_json(r.as_dict())
    else:
        click.echo(f"run {r.id} {r.status}")
    if wait_ and r.status != "succeeded":
        sys.exit(1)


def _decision_command(verb: str, past: str) -> None:
    """``runs approve`` and ``runs reject``: the same command but for the decision."""

    @runs.command(verb, help=f"{verb.capitalize()} a step that waits for a decision.")
    @click.argument("run_id", metavar="ID")
    @click.argument("step")
    @click.option("--by", required=True, help="Who decides (must be a listed approver).")
    @click.option("--comment", help="Why.")
    @click.pass_obj
    def decide(env: Env, run_id: str, step: str, by: str, comment: str | None) -> None:
        getattr(env.client, verb)(run_id, step, by=by, comment=comment)
        click.echo(f"run {run_id} step {step} {past} by {by}")


_decision_command("approve", "approved")
_decision_command("reject", "rejected")


@runs.command("signal")
@click.argument("run_id", metavar="ID")
@click.argument("name")
@click.option("--payload", default="null", help="The signal's payload, as JSON.")
@click.pass_obj
def runs_signal(env: Env, run_id: str, name: str, payload: str) -> None:
    """Send a named signal to a run (kept until a step waits for it)."""
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from exc
    outcome = env.client.signal(run_id, name, value)
    click.echo(f"signal {name} {outcome}")


@runs.command("logs")
@click.argument("run_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the run ends.")
@json_option
@click.pass_obj
def runs_logs(env: Env, run_id: str, follow: bool, as_json: bool) -> None:
    """Print a run's event log (its audit trail), one line per event."""
    client = env.client
    client.get(run_id)  # NotFound for an unknown id, before any output
    after = "-"
    while True:
        # Read the status before the events: the event that ends a run is written
        # with the status change, so once the status says ended, it is in this read.
        ended = not follow or client.get(run_id).done
        for event in client.events(run_id, after):
            after = event["id"]
            click.echo(json.dumps(event, ensure_ascii=False) if as_json else event_line(event))
        if ended:
            return
        time.sleep(POLL_S)
