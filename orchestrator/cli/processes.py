"""The commands that run the orchestrator's processes: worker, beat, flower, api, demo, dev,
and health, the liveness probe of a worker, beat or the API."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import PoolsFileError
from ..flower import flower_argv
from ..pools import DEFAULT_POOLS_FILE, load_pools
from ..redisconn import check_eviction_once, print_warning
from .base import Env, fail


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--pool", "pool_name", metavar="NAME", help="A worker pool of the pools file.")
@click.option(
    "--pools-file",
    default=DEFAULT_POOLS_FILE,
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
    from ..worker import app  # Celery: the worker app is made on import, for this command only

    check_eviction_once(ctx.ensure_object(Env).settings, "worker", print_warning)  # or exits
    app.worker_main(argv)


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat with the orchestrator's scheduler: it sends the tick that wakes
    parked steps and fires schedules. Two beats may run; each fire time starts one run.

    Other options go to Celery's beat as they are (-l, --max-interval, ...).
    """
    from ..worker import app  # Celery: the worker app is made on import, for this command only

    check_eviction_once(ctx.ensure_object(Env).settings, "beat", print_warning)  # or exits
    app.start(["beat", "-S", "orchestrator.scheduler:Scheduler", *ctx.args])


@click.command(
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
    from ..app import create_app  # Celery: only the commands that run it import it

    settings = ctx.ensure_object(Env).settings
    try:
        argv = flower_argv(settings, address, port, ctx.args)
    except ValueError as exc:
        fail(str(exc), code=2)
    create_app(settings).start(argv)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--dev",
    is_flag=True,
    help="Skip bearer-token auth; only allowed when --host is a loopback address.",
)
@click.pass_obj
def api(env: Env, host: str, port: int, dev: bool) -> None:
    """Serve the REST API (OpenAPI at /docs) and the web dashboard (/ui) with uvicorn.

    Every endpoint but /healthz, the webhooks and the dashboard page (/ui) needs
    'Authorization: Bearer TOKEN' with a token from ORCHESTRATOR_API_TOKENS
    (comma-separated), /docs and /openapi.json included, unless --dev on a loopback
    host. With ORCHESTRATOR_LIVENESS_FILE set it touches that file while it serves,
    for 'orchestrator health'.
    """
    from ..api import create_api, is_loopback, serve, token_list  # FastAPI: only api serves

    if dev and not is_loopback(host):
        fail(f"--dev skips authentication and binds only to loopback, not {host!r}", code=2)
    if not dev and not token_list(env.settings):
        fail("set ORCHESTRATOR_API_TOKENS (comma-separated bearer tokens), or use --dev", code=2)
    check_eviction_once(env.settings, "api", print_warning)  # or exits

    base = f"http://{f'[{host}]' if ':' in host else host}:{port or 'PORT'}"
    click.echo(f"dashboard: {base}/ui   API docs: {base}/docs", err=True)
    serve(create_api(env.settings, env.client, dev=dev), host, port)


def pool_args(pools_file: str | Path, name: str) -> list[str]:
    """Celery worker options (-Q, -c, -P) for a pool of ``workers/pools.yaml``."""
    try:
        return load_pools(pools_file).worker_args(name)
    except PoolsFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--pool") from exc


@click.command()
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
def demo(env: Env, flows_dir: str, keep: bool) -> None:
    """Run every example flow on two real workers, and show what each step did.

    Uses the Redis at ORCHESTRATOR_REDIS_URL when one answers (under its own key
    prefix and queue, removed afterwards), otherwise a private redis-server. Serves
    the REST API and the dashboard on a loopback port while it runs.
    """
    from ..devstack.demo import run_demo  # a tool above the CLI: loaded only when it runs

    sys.exit(run_demo(env.settings.redis_url, flows_dir=flows_dir, keep=keep))


@click.command()
@click.option("--redis-url", help="Use this Redis (default: ORCHESTRATOR_REDIS_URL when set).")
@click.option(
    "--redis-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="Port of the private redis-server (default: a free one).",
)
@click.option(
    "--pools-file",
    default=DEFAULT_POOLS_FILE,
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
    env: Env,
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
    from ..devstack.dev import DevStack, pool_names  # a tool above the CLI, as for demo

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


@click.command()
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
def health(env: Env, path: str | None, max_age: float) -> None:
    """Probe a worker or beat: exit 0 when its liveness file is fresh, else 1.

    A worker (while it consumes) and beat (while it loops) touch the file named by
    ORCHESTRATOR_LIVENESS_FILE every few seconds. For Kubernetes exec probes and
    compose health checks; it does not touch Redis.
    """
    from ..health import check  # Celery (its bootstep): only health needs it

    path = path or env.settings.liveness_file
    if not path:
        fail("no liveness file: set ORCHESTRATOR_LIVENESS_FILE or pass --file", code=2)
    ok, message = check(path, max_age)
    if not ok:
        fail(message)
    click.echo(f"ok: {message}")
