"""The ``orchestrator`` command line (SPEC §6).

Every command reads its configuration through :class:`Settings` (``ORCHESTRATOR_*``).
Exit status: 0 on success, 1 on a failed run, an invalid definition or a refused
operation, 2 on wrong usage (Click's own usage errors included). Data goes to stdout
(``--json`` makes it machine-readable), errors to stderr.

Commands are grouped the way a reader looks for them (``flows ...``, ``runs ...``);
a new command is one decorated function added to the right group.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from zoneinfo import ZoneInfo

import click
import kombu.exceptions
import redis
import yaml
from pydantic import TypeAdapter, ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .errors import DefinitionError, OrchestratorError, RunFailed
from .model import FlowResource, format_duration
from .settings import Settings
from .store import ENDED

if TYPE_CHECKING:  # the client pulls in Celery; commands import it when they need it
    from .client import Client, Run

STATUS_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "running": "blue",
    "pending": "",
    "skipped": "bright_black",
    "cancelled": "bright_black",
    "waiting": "yellow",
    "retrying": "yellow",
    "compensated": "yellow",
}
RUN_STATUSES = ("pending", "running", "waiting", *ENDED)
SCHEMA_ID = "https://celery-orchestrator.invalid/schema/orchestrator-v1.json"
POLL_S = 0.2


# -- shared plumbing ----------------------------------------------------------------------


class _Env:
    """Settings and the client, made on first use so commands that need no Redis open none."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._client: Client | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = Settings()
            except ValidationError as exc:
                raise click.UsageError(f"invalid ORCHESTRATOR_* setting: {exc}") from exc
        return self._settings

    @property
    def client(self) -> Client:
        if self._client is None:
            from .client import Client

            self._client = Client(self.settings)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Cli(click.Group):
    """The root group: turns the package's errors into messages on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DefinitionError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            sys.exit(1)
        except OrchestratorError as exc:
            _fail(str(exc))
        except redis.RedisError as exc:
            env = ctx.find_object(_Env)
            url = _redact(env.settings.redis_url) if env and env._settings else "Redis"
            _fail(f"cannot reach Redis at {url}: {exc} (set ORCHESTRATOR_REDIS_URL)")
        except kombu.exceptions.OperationalError as exc:
            env = ctx.find_object(_Env)
            url = _redact(env.settings.broker_url) if env and env._settings else "the broker"
            _fail(f"cannot reach the broker at {url}: {exc} (set ORCHESTRATOR_BROKER_URL)")


def _console() -> Console:
    """Rich output on stdout; piped output is not wrapped at 80 columns."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    return console


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _text(value: Any, style: str = "") -> Text:
    """A table cell holding user data verbatim (never read as Rich markup)."""
    if value is None:
        return Text("-", style="bright_black")
    return Text(value if isinstance(value, str) else str(value), style=style)


def _status(status: str | None) -> Text:
    return _text(status, STATUS_STYLES.get(status or "", ""))


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _clock(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m {secs:02d}s"


def _error_text(error: Any) -> str | None:
    if not error:
        return None
    if isinstance(error, dict):
        text = f"{error.get('type') or 'Error'}: {error.get('message')}"
        return f"{text} (step {error['step']})" if error.get("step") else text
    return str(error)


def _looks_like_path(target: str) -> bool:
    return Path(target).exists() or target.endswith((".yaml", ".yml", ".json")) or "/" in target


def _flow_from_path(env: _Env, path: str, flow: str | None) -> FlowResource:
    from .loader import load

    flows = [lr.resource for lr in load(path, env.settings) if lr.kind == "Flow"]
    if flow is not None:
        flows = [f for f in flows if f.name == flow]
    if not flows:
        raise click.BadParameter(
            f"{path} holds no Flow" + (f" named {flow!r}" if flow else ""), param_hint="PATH"
        )
    if len(flows) > 1:
        names = ", ".join(f.name for f in flows)
        raise click.BadParameter(
            f"{path} holds several flows ({names}): choose one with --flow", param_hint="PATH"
        )
    return flows[0]


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


# -- the root group -----------------------------------------------------------------------


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="celery-orchestrator", prog_name="orchestrator")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Declarative multi-step flows on Celery workers, with run state in Redis.

    Configuration comes from ORCHESTRATOR_* environment variables (ORCHESTRATOR_REDIS_URL,
    ORCHESTRATOR_BROKER_URL, ...). Exit status: 0 success, 1 failed run or invalid
    definition, 2 wrong usage.
    """
    env = ctx.ensure_object(_Env)
    ctx.call_on_close(env.close)


# -- definitions --------------------------------------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
@click.pass_obj
def validate(env: _Env, paths: tuple[str, ...], as_json: bool) -> None:
    """Check definition files or folders; print every problem as file:line: path: message."""
    from .loader import load

    try:
        loaded = load(list(paths), env.settings)
    except DefinitionError as exc:
        if as_json:
            _echo_json({"ok": False, "problems": [p.as_dict() for p in exc.problems]})
            sys.exit(1)
        raise
    if as_json:
        resources = [
            {"kind": lr.kind, "name": lr.name, "file": lr.source.file if lr.source else None}
            for lr in loaded
        ]
        _echo_json({"ok": True, "resources": resources})
        return
    for lr in loaded:
        where = f"{lr.source.file}:{lr.source.line}" if lr.source and lr.source.file else ""
        click.echo(f"OK  {lr.kind} {lr.name}  {where}".rstrip())


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
@click.pass_obj
def deploy(env: _Env, paths: tuple[str, ...], as_json: bool) -> None:
    """Store definitions in Redis; runs already going keep the version they started with."""
    from .loader import load

    loaded = load(list(paths), env.settings)  # all problems reported before Redis is asked
    client = env.client
    before = {f["name"]: f.get("version") for f in client.flows()}
    results = []
    for d in client.deploy(*(lr.resource for lr in loaded)):
        same = d.kind == "Flow" and before.get(d.name) == d.version
        change = "new" if d.created else "unchanged" if same else "updated"
        results.append({"kind": d.kind, "name": d.name, "version": d.version, "change": change})
    if as_json:
        _echo_json(results)
        return
    for r in results:
        prefix = "" if r["kind"] == "Flow" else f"{r['kind']} "
        click.echo(f"{prefix}{r['name']}  version {r['version']}  {r['change']}")


@cli.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write it to a file.")
def schema(output: str | None) -> None:
    """Print the JSON Schema of definition documents (for editors and the YAML language server).

    Put `# yaml-language-server: $schema=<path or URL of the file>` at the top of a
    definition to get completion and checks in editors that use it.
    """
    text = json.dumps(definition_schema(), indent=2) + "\n"
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def definition_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one definition document, in its camelCase form."""
    from .loader import KINDS

    models = list(KINDS.values())
    union: Any = models[0]
    for model in models[1:]:
        union = union | model
    body = TypeAdapter(union).json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **body,
        "title": "orchestrator/v1 definition",
        "description": "A definition document (apiVersion: orchestrator/v1) of kind "
        + ", ".join(KINDS),
    }


# -- flows --------------------------------------------------------------------------------


@cli.group()
def flows() -> None:
    """Deployed flows: list, view, start, stop, status."""


@flows.command("ls")
@json_option
@click.pass_obj
def flows_ls(env: _Env, as_json: bool) -> None:
    """List deployed flows with their current version and state."""
    rows = env.client.flows()
    if as_json:
        _echo_json(rows)
        return
    table = Table("flow", "version", "state", "deployed")
    for f in rows:
        deployed = f.get("deployed_at")
        table.add_row(
            _text(f["name"]),
            _text(f.get("version")),
            _status(f.get("state")),
            _text(_when(float(deployed)) if deployed else None),
        )
    _console().print(table)


@flows.command("view")
@click.argument("name")
@json_option
@click.pass_obj
def flows_view(env: _Env, name: str, as_json: bool) -> None:
    """Show a flow's current definition as YAML, with its version and state."""
    from .model import ScheduleSpec
    from .scheduler import upcoming

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
        _echo_json(
            {"name": name, **info, "definition": resource.document(), "schedules": schedules}
        )
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
def flows_start(env: _Env, name: str) -> None:
    """Let a flow accept triggers (and its schedules fire)."""
    env.client.start_flow(name)
    click.echo(f"flow {name} started")


@flows.command("stop")
@click.argument("name")
@click.pass_obj
def flows_stop(env: _Env, name: str) -> None:
    """Make a flow refuse triggers; runs already going carry on."""
    env.client.stop_flow(name)
    click.echo(f"flow {name} stopped")


@flows.command("status")
@click.argument("name")
@click.option("--limit", default=100, show_default=True, help="How many recent runs to count.")
@json_option
@click.pass_obj
def flows_status(env: _Env, name: str, limit: int, as_json: bool) -> None:
    """A flow's state, version and how its recent runs ended."""
    info, _resource = env.client.flow(name)
    recent = env.client.runs(flow=name, limit=limit)
    counts = Counter(r.status for r in recent)
    if as_json:
        _echo_json({"name": name, **info, "recent_runs": len(recent), "runs": dict(counts)})
        return
    console = _console()
    deployed = info.get("deployed_at")
    console.print(
        Text.assemble(
            ("flow ", ""),
            (name, "bold"),
            f"  version {info.get('version')}  ",
            _status(info.get("state")),
            f"  deployed {_when(float(deployed)) if deployed else '-'}",
        )
    )
    table = Table("status", "runs", title=f"last {len(recent)} runs", title_justify="left")
    for status in RUN_STATUSES:
        if counts.get(status):
            table.add_row(_status(status), _text(counts[status]))
    console.print(table)


# -- drawings and canvas ------------------------------------------------------------------


@cli.command()
@click.argument("target", metavar="NAME|PATH", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True
)
@click.option("--run", "run_id", help="Colour the steps by their status in this run.")
@click.option("--flow", help="Which flow, when PATH holds several.")
@click.pass_obj
def graph(env: _Env, target: str | None, fmt: str, run_id: str | None, flow: str | None) -> None:
    """Draw a deployed flow (NAME) or a definition file (PATH) as Mermaid or Graphviz DOT."""
    from .graph import to_dot, to_mermaid

    statuses = None
    if run_id is not None:
        run = env.client.get(run_id)
        statuses = {key: s.status for key, s in run.steps.items()}
        if target is None:
            target = run.flow
    if target is None:
        raise click.UsageError("give a flow NAME, a PATH, or --run ID")
    if _looks_like_path(target):
        resource = _flow_from_path(env, target, flow)
    elif run_id is not None and target == run.flow:
        resource = env.client.plan(run.flow, run.version).resource
    else:
        _info, resource = env.client.flow(target)
    draw = to_mermaid if fmt == "mermaid" else to_dot
    click.echo(draw(resource, statuses), nl=False)


@cli.command("compile")
@click.argument("target", metavar="NAME|PATH")
@click.option("--flow", help="Which flow, when PATH holds several.")
@json_option
@click.pass_obj
def compile_(env: _Env, target: str, flow: str | None, as_json: bool) -> None:
    """Show the Celery canvas a run starts with and every step's task options."""
    from .compiler import Plan, describe

    if _looks_like_path(target):
        from .app import create_app

        plan = Plan(_flow_from_path(env, target, flow), "local", env.settings)
        app = create_app(env.settings, set_as_current=False)
        try:
            described = describe(plan, app)
        finally:
            app.close()
    else:
        info, _resource = env.client.flow(target)
        plan = env.client.plan(target, info["version"])
        described = describe(plan, env.client.app)
    if as_json:
        _echo_json(described)
        return
    from .compiler import render_canvas

    click.echo(f"# flow {described['flow']} version {described['version']}")
    click.echo(render_canvas(described["canvas"]))
    click.echo()
    table = Table(
        "step",
        "kind",
        "task",
        "queue",
        "priority",
        "soft_time_limit",
        "time_limit",
        "rate_limit",
        "max_retries",
        "countdown",
        "on_error",
        title="task options per step",
        title_justify="left",
    )
    for step_id, o in described["steps"].items():
        table.add_row(
            _text(step_id),
            _text(o["kind"]),
            _text(o.get("task")),
            _text(o.get("queue")),
            _text(o.get("priority")),
            _text(_seconds(o.get("soft_time_limit"))),
            _text(_seconds(o.get("time_limit"))),
            _text(o.get("rate_limit")),
            _text(o.get("max_retries")),
            _text(_countdown(o.get("countdown") or {}) if o.get("max_retries") else None),
            _text(o.get("on_error")),
        )
    _console().print(table)


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:g}s"


def _countdown(c: dict[str, Any]) -> str:
    """A retry countdown policy in words: ``exponential 200ms..2s, jitter``."""
    initial = format_duration(c["initial"]) if c.get("initial") is not None else "0s"
    cap = f"..{format_duration(c['max'])}" if c.get("max") is not None else ""
    jitter = ", jitter" if c.get("jitter") else ""
    return f"{c.get('backoff') or 'fixed'} {initial}{cap}{jitter}"


# -- runs ---------------------------------------------------------------------------------


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


@cli.command()
@click.argument("name")
@click.option("--input", "-i", "pairs", multiple=True, metavar="NAME=VALUE", help="An input.")
@click.option("--inputs-json", metavar="JSON", help="All inputs as one JSON object.")
@click.option("--idempotency-key", help="A second trigger with the same key gives the same run.")
@click.option("--wait", is_flag=True, help="Show the steps live until the run ends.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds --wait waits.")
@json_option
@click.pass_obj
def run(
    env: _Env,
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
            _echo_json(started.as_dict())
        else:
            click.echo(started.id)
        return
    try:
        if as_json:
            final = _poll_until_done(client, started.id, timeout)
        else:
            final = _watch(client, started.id, timeout)
    except KeyboardInterrupt:
        _fail(
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
            _fail(
                f"run {run_id} still {current.status} after {timeout:g}s; "
                f"follow it with `orchestrator runs logs {run_id} --follow`"
            )
        time.sleep(POLL_S)


def _watch(client: Client, run_id: str, timeout: float) -> Run:
    """Poll the run and redraw its steps in place until it ends (or ``timeout`` passes)."""
    console = _console()
    current = client.get(run_id)
    order = client.plan(current.flow, current.version).order
    deadline = time.monotonic() + timeout
    with Live(_run_view(current, order), console=console, refresh_per_second=10) as live:
        while not current.done:
            if time.monotonic() >= deadline:
                live.stop()
                _fail(
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
        _echo_json(final.as_dict())
    else:
        click.echo("outputs:")
        click.echo(json.dumps(final.outputs or {}, indent=2, ensure_ascii=False))
    if final.status != "succeeded":
        _fail(f"run {final.id} ended {final.status}: {_error_text(final.error)}")


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
        _status(run.status),
        f"  {_duration(elapsed) or ''}",
    )
    table = Table("step", "status", "attempts", "duration", "worker")
    for k in _step_order(run, order):
        s = run.steps[k]
        table.add_row(
            _text(k),
            _status(s.status),
            _text(s.attempts),
            _text(_duration(_step_duration(s, now))),
            _text(s.worker),
        )
    return Group(header, table)


@cli.group()
def runs() -> None:
    """Runs: list, show, logs; cancel, retry; approve, reject, signal."""


@runs.command("ls")
@click.option("--flow", help="Only runs of this flow.")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs in this status.")
@click.option("--limit", default=20, show_default=True, help="At most this many runs.")
@json_option
@click.pass_obj
def runs_ls(env: _Env, flow: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    found = env.client.runs(flow=flow, status=status, limit=limit)
    if as_json:
        _echo_json([r.as_dict() for r in found])
        return
    table = Table("run", "flow", "status", "created", "duration", "error")
    for r in found:
        dur = r.finished_at - r.created_at if r.finished_at and r.created_at else None
        table.add_row(
            _text(r.id),
            _text(r.flow),
            _status(r.status),
            _text(_when(r.created_at)),
            _text(_duration(dur)),
            _text(_error_text(r.error)),
        )
    _console().print(table)


@runs.command("show")
@click.argument("run_id", metavar="ID")
@json_option
@click.pass_obj
def runs_show(env: _Env, run_id: str, as_json: bool) -> None:
    """Show a run: its fields, inputs, outputs and a table of its steps."""
    r = env.client.get(run_id)
    if as_json:
        _echo_json(r.as_dict())
        return
    console = _console()
    fields = Table.grid(padding=(0, 2))
    dur = r.finished_at - r.created_at if r.finished_at and r.created_at else None
    for label, value in (
        ("run", _text(r.id)),
        ("flow", _text(f"{r.flow} (version {r.version})")),
        ("status", _status(r.status)),
        ("created", _text(_when(r.created_at))),
        ("finished", _text(_when(r.finished_at))),
        ("duration", _text(_duration(dur))),
        ("idempotency key", _text(r.idempotency_key)),
        ("inputs", _text(json.dumps(r.inputs, ensure_ascii=False))),
        ("outputs", _text(json.dumps(r.outputs, ensure_ascii=False))),
        ("error", _text(_error_text(r.error), "red")),
    ):
        fields.add_row(Text(label, style="bold"), value)
    console.print(fields)
    order = env.client.plan(r.flow, r.version).order
    table = Table("step", "status", "attempts", "started", "duration", "worker", "error")
    for k in _step_order(r, order):
        s = r.steps[k]
        table.add_row(
            _text(k),
            _status(s.status),
            _text(s.attempts),
            _text(_clock(s.started_at)),
            _text(_duration(s.duration)),
            _text(s.worker),
            _text(_error_text(s.error), "red"),
        )
    console.print(table)


@runs.command("cancel")
@click.argument("run_id", metavar="ID")
@json_option
@click.pass_obj
def runs_cancel(env: _Env, run_id: str, as_json: bool) -> None:
    """Cancel a run: no new step starts, running steps are revoked, child runs cancelled."""
    r = env.client.cancel(run_id)
    if as_json:
        _echo_json(r.as_dict())
    else:
        click.echo(f"run {r.id} {r.status}")


@runs.command("retry")
@click.argument("run_id", metavar="ID")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to end.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait at most.")
@json_option
@click.pass_obj
def runs_retry(env: _Env, run_id: str, wait_: bool, timeout: float | None, as_json: bool) -> None:
    """Restart a failed run from its failed step, reusing the outputs of succeeded steps."""
    r = env.client.retry(run_id)
    if wait_:
        with contextlib.suppress(RunFailed):
            env.client.wait(run_id, timeout=timeout)
        r = env.client.get(run_id)
    if as_json:
        _echo_json(r.as_dict())
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
    def decide(env: _Env, run_id: str, step: str, by: str, comment: str | None) -> None:
        getattr(env.client, verb)(run_id, step, by=by, comment=comment)
        click.echo(f"run {run_id} step {step} {past} by {by}")


_decision_command("approve", "approved")
_decision_command("reject", "rejected")


@runs.command("signal")
@click.argument("run_id", metavar="ID")
@click.argument("name")
@click.option("--payload", default="null", help="The signal's payload, as JSON.")
@click.pass_obj
def runs_signal(env: _Env, run_id: str, name: str, payload: str) -> None:
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
def runs_logs(env: _Env, run_id: str, follow: bool, as_json: bool) -> None:
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
            click.echo(json.dumps(event, ensure_ascii=False) if as_json else _event_line(event))
        if ended:
            return
        time.sleep(POLL_S)


def _event_line(event: dict[str, Any]) -> str:
    details = []
    for k, v in event.items():
        if k in ("id", "ts", "type", "step"):
            continue
        if k == "error" and isinstance(v, dict):  # the step is in its own column
            v = f"{v.get('type') or 'Error'}: {v.get('message')}"
        elif not isinstance(v, str):
            v = json.dumps(v, ensure_ascii=False)
        details.append(f"{k}={v}")
    ts = event.get("ts")
    when = _clock(float(ts)) if ts is not None else "-"
    return "  ".join([when, f"{event.get('type', '?'):<16}", event.get("step") or "-", *details])


@flows.command("logs")
@click.argument("name")
@click.option("--runs", "runs_", default=20, show_default=True, help="How many recent runs.")
@click.option("--limit", default=200, show_default=True, help="At most this many events.")
@json_option
@click.pass_obj
def flows_logs(env: _Env, name: str, runs_: int, limit: int, as_json: bool) -> None:
    """Print the event log across a flow's recent runs, oldest first, with each run's id."""
    for event in env.client.flow_events(name, runs=runs_, limit=limit):
        if as_json:
            click.echo(json.dumps(event, ensure_ascii=False))
        else:
            run_id = event.pop("run")
            click.echo(f"{run_id}  {_event_line(event)}")


# -- events -------------------------------------------------------------------------------


@cli.group()
def events() -> None:
    """Publish events to channels; list them, and the ones that could not start a run."""


@events.command("publish")
@click.argument("channel")
@click.option("--data", "data_json", metavar="JSON", help="The event's payload (JSON).")
@click.option("--id", "event_id", help="The event's id (an id seen before starts no new run).")
@json_option
@click.pass_obj
def events_publish(
    env: _Env, channel: str, data_json: str | None, event_id: str | None, as_json: bool
) -> None:
    """Publish an event: each matching EventSubscription starts one run."""
    try:
        data = json.loads(data_json) if data_json is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--data") from None
    event = env.client.publish(channel, data, event_id)
    if as_json:
        _echo_json(event)
    else:
        click.echo(f"published {event['id']} to {channel} (stream id {event['stream_id']})")


@events.command("ls")
@click.argument("channel")
@click.option("--limit", default=20, show_default=True, help="At most this many events.")
@json_option
@click.pass_obj
def events_ls(env: _Env, channel: str, limit: int, as_json: bool) -> None:
    """The channel's newest events, oldest first."""
    found = env.client.channel_events(channel, limit)
    if as_json:
        _echo_json(found)
        return
    table = Table("stream id", "event id", "time", "data", box=None)
    for e in found:
        table.add_row(e["stream_id"], e["id"], _when(e.get("time")), _compact(e.get("data")))
    _console().print(table)
    subs = env.client.subscriptions(channel)
    click.echo(f"subscriptions: {', '.join(sorted(subs)) or 'none'}")


@events.command("dead")
@click.argument("channel")
@click.option("--limit", default=50, show_default=True, help="At most this many entries.")
@json_option
@click.pass_obj
def events_dead(env: _Env, channel: str, limit: int, as_json: bool) -> None:
    """Events that matched a subscription but could not start a run, and why."""
    found = env.client.dead_events(channel, limit)
    if as_json:
        _echo_json(found)
        return
    table = Table("entry", "event id", "subscription", "reason", box=None)
    for e in found:
        table.add_row(e["entry"], e["event"]["id"], e["subscription"], e["reason"])
    _console().print(table)


@events.command("replay")
@click.argument("channel")
@click.option("--entry", "entries", multiple=True, help="A dead-letter entry (default: all).")
@json_option
@click.pass_obj
def events_replay(env: _Env, channel: str, entries: tuple[str, ...], as_json: bool) -> None:
    """Deliver dead-lettered events again, after fixing what stopped them."""
    outcomes = env.client.replay(channel, list(entries) or None)
    if as_json:
        _echo_json(outcomes)
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


# -- processes ----------------------------------------------------------------------------


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--pool", "pool_name", metavar="NAME", help="A worker pool of the pools file.")
@click.option(
    "--pools-file",
    default="workers/pools.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where worker pools are defined.",
)
@click.pass_context
def worker(ctx: click.Context, pool_name: str | None, pools_file: str) -> None:
    """Run a Celery worker for flow steps (`celery -A orchestrator.worker worker`).

    Other options go to Celery's worker as they are (-c, -Q, -P, -I/--include, -l,
    -n, ...); they win over the pool's settings. --pool NAME takes queues, concurrency
    and pool type from the pools file. Task modules named in ORCHESTRATOR_TASK_MODULES
    are imported.
    """
    argv = ["worker", *(pool_args(pools_file, pool_name) if pool_name else []), *ctx.args]
    from .redisconn import check_eviction_once, print_warning
    from .worker import app

    check_eviction_once(ctx.ensure_object(_Env).settings, "worker", print_warning)  # or exits
    app.worker_main(argv)


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat with the orchestrator's scheduler: it sends the tick that wakes
    parked steps and fires schedules. Two beats may run; each fire time starts one run.

    Other options go to Celery's beat as they are (-l, --max-interval, ...).
    """
    from .redisconn import check_eviction_once, print_warning
    from .worker import app

    check_eviction_once(ctx.ensure_object(_Env).settings, "beat", print_warning)  # or exits
    app.start(["beat", "-S", "orchestrator.scheduler:Scheduler", *ctx.args])


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(0, 65535))
@click.pass_context
def flower(ctx: click.Context, address: str, port: int) -> None:
    """Run Flower, Celery's web monitor, for the flows' workers, behind HTTP basic auth.

    Users come from ORCHESTRATOR_FLOWER_BASIC_AUTH (user:password[,user2:password2]);
    without it Flower is not started. A step shows as a task named flow.step (e.g.
    text.upper) whose first argument is the run id. Other options go to Flower as they
    are (--url_prefix=..., --persistent=True, ...).
    """
    from .app import create_app
    from .flower import flower_argv

    settings = ctx.ensure_object(_Env).settings
    try:
        argv = flower_argv(settings, address, port, ctx.args)
    except ValueError as exc:
        _fail(str(exc), code=2)
    create_app(settings).start(argv)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--dev",
    is_flag=True,
    help="Skip bearer-token auth; only allowed when --host is a loopback address.",
)
@click.pass_obj
def api(env: _Env, host: str, port: int, dev: bool) -> None:
    """Serve the REST API (OpenAPI at /docs) and the web dashboard (/ui) with uvicorn.

    Every endpoint but /healthz, the webhooks and the dashboard page (/ui) needs
    'Authorization: Bearer TOKEN' with a token from ORCHESTRATOR_API_TOKENS
    (comma-separated), /docs and /openapi.json included, unless --dev on a loopback
    host. With ORCHESTRATOR_LIVENESS_FILE set it touches that file while it serves,
    for 'orchestrator health'.
    """
    from .api import create_api, is_loopback, serve, token_list

    if dev and not is_loopback(host):
        _fail(f"--dev skips authentication and binds only to loopback, not {host!r}", code=2)
    if not dev and not token_list(env.settings):
        _fail("set ORCHESTRATOR_API_TOKENS (comma-separated bearer tokens), or use --dev", code=2)
    from .redisconn import check_eviction_once, print_warning

    check_eviction_once(env.settings, "api", print_warning)  # or exits

    base = f"http://{f'[{host}]' if ':' in host else host}:{port or 'PORT'}"
    click.echo(f"dashboard: {base}/ui   API docs: {base}/docs", err=True)
    serve(create_api(env.settings, env.client, dev=dev), host, port)


def pool_args(pools_file: str | Path, name: str) -> list[str]:
    """Celery worker options (-Q, -c, -P) for a pool of ``workers/pools.yaml``."""
    path = Path(pools_file)
    if not path.is_file():
        raise click.BadParameter(
            f"no pools file at {path} (it defines pools: NAME: {{queues, concurrency, pool}})",
            param_hint="--pool",
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{path} is not valid YAML: {exc}", param_hint="--pool") from exc
    pools = data.get("pools") if isinstance(data, dict) else None
    if not isinstance(pools, dict) or name not in pools:
        known = ", ".join(pools) if isinstance(pools, dict) and pools else "none"
        raise click.BadParameter(
            f"{path} defines no pool {name!r} (pools: {known})", param_hint="--pool"
        )
    spec = pools[name] or {}
    args: list[str] = []
    queues = spec.get("queues")
    if queues:
        if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
            raise click.BadParameter(
                f"{path}: pools.{name}.queues must be a list of queue names", param_hint="--pool"
            )
        args += ["-Q", ",".join(queues)]
    if spec.get("concurrency") is not None:
        if not isinstance(spec["concurrency"], int) or spec["concurrency"] < 1:
            raise click.BadParameter(
                f"{path}: pools.{name}.concurrency must be a positive integer",
                param_hint="--pool",
            )
        args += ["-c", str(spec["concurrency"])]
    if spec.get("pool") is not None:
        if spec["pool"] not in ("prefork", "threads", "gevent", "eventlet", "solo"):
            raise click.BadParameter(
                f"{path}: pools.{name}.pool must be prefork, threads, gevent, eventlet or solo",
                param_hint="--pool",
            )
        args += ["-P", spec["pool"]]
    return args


@cli.command()
@click.option(
    "--flows",
    "flows_dir",
    default="flows",
    show_default=True,
    type=click.Path(file_okay=False),
    help="The example flows to run.",
)
@click.option("--keep", is_flag=True, help="Keep workers, API and dashboard running until Ctrl-C.")
@click.pass_obj
def demo(env: _Env, flows_dir: str, keep: bool) -> None:
    """Run every example flow on two real workers, and show what each step did.

    Uses the Redis at ORCHESTRATOR_REDIS_URL when one answers (under its own key
    prefix and queue, removed afterwards), otherwise a private redis-server. Serves
    the REST API and the dashboard on a loopback port while it runs.
    """
    from .devstack.demo import run_demo

    sys.exit(run_demo(env.settings.redis_url, flows_dir=flows_dir, keep=keep))


@cli.command()
@click.option("--redis-url", help="Use this Redis (default: ORCHESTRATOR_REDIS_URL when set).")
@click.option(
    "--redis-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="Port of the private redis-server (default: a free one).",
)
@click.option(
    "--pools-file",
    default="workers/pools.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="One worker is started per pool of this file.",
)
@click.option("--api-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--flower-port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option(
    "--tasks",
    "task_modules",
    metavar="MODULES",
    help="Task modules the workers import (default: ORCHESTRATOR_TASK_MODULES, "
    "else workers.examples).",
)
@click.option(
    "--deploy",
    "deploy_paths",
    multiple=True,
    type=click.Path(exists=True),
    help="Deploy these definition files or folders once the stack is up (repeatable).",
)
@click.option(
    "--data-dir",
    default=".orchestrator-dev",
    show_default=True,
    type=click.Path(file_okay=False),
    help="The private Redis's append-only file, and every process's log.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(0),
    help="Seconds each process has to stop after Ctrl-C before it is killed "
    "(default: ORCHESTRATOR_SHUTDOWN_TIMEOUT_S + 5, at least 30).",
)
@click.pass_obj
def dev(
    env: _Env,
    redis_url: str | None,
    redis_port: int,
    pools_file: str,
    api_port: int,
    flower_port: int,
    no_flower: bool,
    task_modules: str | None,
    deploy_paths: tuple[str, ...],
    data_dir: str,
    stop_timeout: float | None,
) -> None:
    """Run the whole stack on this machine: Redis, a worker per pool, beat, the API with
    its dashboard, and Flower. Ctrl-C stops all of it.

    Starts a private redis-server (append-only file under --data-dir) unless
    ORCHESTRATOR_REDIS_URL or --redis-url names a Redis. The API binds to 127.0.0.1 in
    dev mode (no token); Flower gets a generated password, printed once.
    """
    from .devstack.dev import DevStack, pool_names

    settings = env.settings
    if redis_url is None and "redis_url" in settings.model_fields_set:
        redis_url = settings.redis_url
    pools = {name: pool_args(pools_file, name) for name in pool_names(pools_file)}
    stack = DevStack(
        settings,
        pools=pools,
        pools_file=pools_file,
        redis_url=redis_url,
        redis_port=redis_port,
        api_port=api_port,
        flower_port=flower_port,
        flower=not no_flower,
        data_dir=data_dir,
        task_modules=task_modules or settings.task_modules or "workers.examples",
        deploy=deploy_paths,
        stop_timeout=(
            stop_timeout if stop_timeout is not None else max(30.0, settings.shutdown_timeout_s + 5)
        ),
    )
    sys.exit(stack.run())


@cli.command()
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False),
    help="The liveness file (default: ORCHESTRATOR_LIVENESS_FILE).",
)
@click.option(
    "--max-age",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds since the last touch beyond which the process counts as dead.",
)
@click.pass_obj
def health(env: _Env, path: str | None, max_age: float) -> None:
    """Probe a worker or beat: exit 0 when its liveness file is fresh, else 1.

    A worker (while it consumes) and beat (while it loops) touch the file named by
    ORCHESTRATOR_LIVENESS_FILE every few seconds. For Kubernetes exec probes and
    compose health checks; it does not touch Redis.
    """
    from .health import check

    path = path or env.settings.liveness_file
    if not path:
        _fail("no liveness file: set ORCHESTRATOR_LIVENESS_FILE or pass --file", code=2)
    ok, message = check(path, max_age)
    if not ok:
        _fail(message)
    click.echo(f"ok: {message}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="orchestrator")


__all__ = ["cli", "definition_schema", "main", "parse_inputs", "pool_args"]
