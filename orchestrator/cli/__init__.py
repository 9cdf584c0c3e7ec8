"""The ``orchestrator`` command line (SPEC §6).

Every command reads its configuration through :class:`Settings` (``ORCHESTRATOR_*``).
Exit status: 0 on success, 1 on a failed run, an invalid definition or a refused
operation, 2 on wrong usage (Click's own usage errors included). Data goes to stdout
(``--json`` makes it machine-readable), errors to stderr.

Commands are grouped the way a reader looks for them (``flows ...``, ``runs ...``), one
module per group: :mod:`.definitions`, :mod:`.flows`, :mod:`.runs`, :mod:`.events` and
:mod:`.processes`, with what they share in :mod:`.base`. A new command is one decorated
function in the right module, added to :func:`cli` below.
"""

from __future__ import annotations

import click

from . import definitions, events, flows, processes, runs
from .base import Cli, Env
from .definitions import definition_schema
from .processes import pool_args
from .runs import parse_inputs


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="celery-orchestrator", prog_name="orchestrator")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Declarative multi-step flows on Celery workers, with run state in Redis.

    Configuration comes from ORCHESTRATOR_* environment variables (ORCHESTRATOR_REDIS_URL,
    ORCHESTRATOR_BROKER_URL, ...). Exit status: 0 success, 1 failed run or invalid
    definition, 2 wrong usage.
    """
    env = ctx.ensure_object(Env)
    ctx.call_on_close(env.close)


for command in (
    definitions.validate,
    definitions.deploy,
    definitions.schema,
    definitions.graph,
    definitions.compile_,
    flows.flows,
    runs.run,
    runs.runs,
    events.events,
    processes.worker,
    processes.beat,
    processes.flower,
    processes.api,
    processes.demo,
    processes.dev,
    processes.health,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="orchestrator")


__all__ = ["cli", "definition_schema", "main", "parse_inputs", "pool_args"]
