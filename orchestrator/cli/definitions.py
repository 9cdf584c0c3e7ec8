"""Commands on definition files and deployed definitions: validate, deploy, schema, graph
and compile. ``validate`` and ``schema`` need neither Redis nor Celery."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import TypeAdapter
from rich.table import Table

from ..errors import DefinitionError
from ..graph import to_dot, to_mermaid
from ..model import FlowResource, format_duration
from .base import Env, cell, echo_json, json_option, out_console

SCHEMA_ID = "https://celery-orchestrator.invalid/schema/orchestrator-v1.json"


def _looks_like_path(target: str) -> bool:
    return Path(target).exists() or target.endswith((".yaml", ".yml", ".json")) or "/" in target


def _flow_from_path(env: Env, path: str, flow: str | None) -> FlowResource:
    from ..loader import load  # start-up time: only commands that read files load it

    flows = [
        lr.resource for lr in load(path, env.settings) if isinstance(lr.resource, FlowResource)
    ]
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


# -- definitions --------------------------------------------------------------------------


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
@click.pass_obj
def validate(env: Env, paths: tuple[str, ...], as_json: bool) -> None:
    """Check definition files or folders; print every problem as file:line: path: message."""
    from ..loader import load  # start-up time: only commands that read files load it

    try:
        loaded = load(list(paths), env.settings)
    except DefinitionError as exc:
        if as_json:
            echo_json({"ok": False, "problems": [p.as_dict() for p in exc.problems]})
            sys.exit(1)
        raise
    if as_json:
        resources = [
            {"kind": lr.kind, "name": lr.name, "file": lr.source.file if lr.source else None}
            for lr in loaded
        ]
        echo_json({"ok": True, "resources": resources})
        return
    for lr in loaded:
        where = f"{lr.source.file}:{lr.source.line}" if lr.source and lr.source.file else ""
        click.echo(f"OK  {lr.kind} {lr.name}  {where}".rstrip())


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
@click.pass_obj
def deploy(env: Env, paths: tuple[str, ...], as_json: bool) -> None:
    """Store definitions in Redis; runs already going keep the version they started with."""
    from ..loader import load  # start-up time: only commands that read files load it

    loaded = load(list(paths), env.settings)  # all problems reported before Redis is asked
    client = env.client
    before = {f["name"]: f.get("version") for f in client.flows()}
    results = []
    for d in client.deploy(*(lr.resource for lr in loaded)):
        same = d.kind == "Flow" and before.get(d.name) == d.version
        change = "new" if d.created else "unchanged" if same else "updated"
        results.append({"kind": d.kind, "name": d.name, "version": d.version, "change": change})
    if as_json:
        echo_json(results)
        return
    for r in results:
        prefix = "" if r["kind"] == "Flow" else f"{r['kind']} "
        click.echo(f"{prefix}{r['name']}  version {r['version']}  {r['change']}")


@click.command()
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
    from ..loader import KINDS  # start-up time: only schema needs the loader

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


# -- drawings and canvas ------------------------------------------------------------------


@click.command()
@click.argument("target", metavar="NAME|PATH", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True
)
@click.option("--run", "run_id", help="Colour the steps by their status in this run.")
@click.option("--flow", help="Which flow, when PATH holds several.")
@click.pass_obj
def graph(env: Env, target: str | None, fmt: str, run_id: str | None, flow: str | None) -> None:
    """Draw a deployed flow (NAME) or a definition file (PATH) as Mermaid or Graphviz DOT."""
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


@click.command("compile")
@click.argument("target", metavar="NAME|PATH")
@click.option("--flow", help="Which flow, when PATH holds several.")
@json_option
@click.pass_obj
def compile_(env: Env, target: str, flow: str | None, as_json: bool) -> None:
    """Show the Celery canvas a run starts with and every step's task options."""
    from ..compiler import Plan, describe, render_canvas  # Celery: validate must not import it

    if _looks_like_path(target):
        from ..app import create_app  # Celery, as above

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
        echo_json(described)
        return
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
            cell(step_id),
            cell(o["kind"]),
            cell(o.get("task")),
            cell(o.get("queue")),
            cell(o.get("priority")),
            cell(_seconds(o.get("soft_time_limit"))),
            cell(_seconds(o.get("time_limit"))),
            cell(o.get("rate_limit")),
            cell(o.get("max_retries")),
            cell(_countdown(o.get("countdown") or {}) if o.get("max_retries") else None),
            cell(o.get("on_error")),
        )
    out_console().print(table)


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:g}s"


def _countdown(c: dict[str, Any]) -> str:
    """A retry countdown policy in words: ``exponential 200ms..2s, jitter``."""
    initial = format_duration(c["initial"]) if c.get("initial") is not None else "0s"
    cap = f"..{format_duration(c['max'])}" if c.get("max") is not None else ""
    jitter = ", jitter" if c.get("jitter") else ""
    return f"{c.get('backoff') or 'fixed'} {initial}{cap}{jitter}"
