"""``orchestrator demo``: every example flow of ``flows/`` run on two real Celery workers.

The demo brings its own stack and leaves nothing behind: it uses the Redis at
``ORCHESTRATOR_REDIS_URL`` when one answers PING, otherwise a private ``redis-server``
in a temporary directory. On a shared Redis everything it writes, Celery's queues and
results included, sits under one fresh key prefix (``demo-<random>:``) and one fresh
queue, and those keys are deleted at the end; nothing else is touched.

Each example flow needs demo inputs in :data:`DEMO_INPUTS`; a flow without an entry
stops the demo before it starts anything, so a new example cannot be forgotten.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..api import create_api
from ..client import Client
from ..errors import DefinitionError, DemoError, RunFailed
from ..loader import load
from ..settings import Settings
from ..webhooks import sign
from .processes import (
    FLOWER_USER,
    Child,
    RedisServer,
    WorkerProcess,
    free_port,
    http_ok,
    redact,
    redis_answers,
)

#: Inputs each example flow runs with, by flow name. Add an entry with every new
#: file in flows/.
DEMO_INPUTS: dict[str, dict[str, Any]] = {
    "text": {"message": "hello big wide world"},
    "etl": {"pages": 3, "page_size": 50},
    "customer-sync": {"customer_id": "c-42"},
    "trip-booking": {"traveller": "ada", "destination": "Lisbon", "card": "4242424242424242"},
    "expense-approval": {"employee": "eve", "amount": 1200, "reason": "conference trip"},
    "nightly-report": {"day": "2026-11-22"},
    "order-pricing": {"order_id": "o-100", "sku": "widget", "quantity": 3},
}
#: Runs the demo starts the other ways: (flow, how, inputs): an event published to the
#: flow's subscribed channel, or a signed webhook sent to the demo's API over HTTP.
DEMO_TRIGGERS: list[tuple[str, str, dict[str, Any]]] = [
    ("order-pricing", "event orders.created", {"id": "o-101", "sku": "gizmo", "quantity": 1}),
    ("order-pricing", "webhook", {"order_id": "o-102", "sku": "gadget", "quantity": 5}),
]
#: Decisions the demo takes, as a person would, when a run waits for them:
#: flow -> [(step, approver, "approve" | "reject", comment)].
DEMO_DECISIONS: dict[str, list[tuple[str, str, str, str]]] = {
    "expense-approval": [
        ("manager_approval", "alice", "approve", "fine by me"),
        ("head_approval", "bob", "approve", "within budget"),
    ],
}
#: Further runs that show how a flow ends when something goes wrong: (flow, inputs, the
#: status the run must end in). A declined card makes the saga undo its bookings.
DEMO_SCENARIOS: list[tuple[str, dict[str, Any], str]] = [
    (
        "trip-booking",
        {"traveller": "bob", "destination": "Oslo", "card": "declined"},
        "compensated",
    ),
]
_STATUS_STYLES = {"succeeded": "green", "failed": "red", "skipped": "bright_black"}

WORKERS = 2
WORKER_CONCURRENCY = 2
READY_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def run_demo(
    redis_url: str | None,
    flows_dir: str | os.PathLike[str] = "flows",
    console: Console | None = None,
    keep: bool = False,
) -> int:
    """Run every flow of ``flows_dir`` (and DEMO_SCENARIOS); 0 when all ended as expected.

    With ``keep``, the stack (workers, API, dashboard) stays up until Ctrl-C.
    """
    out = console or Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False)
    try:
        return _Demo(redis_url, Path(flows_dir), out, keep).run()
    except DemoError as exc:
        err.print(Text(f"demo: {exc}", style="red"))
        return 1
    except DefinitionError as exc:
        err.print(Text(f"demo: invalid example flows in {flows_dir}:", style="red"))
        for problem in exc.problems:
            err.print(Text(str(problem)))
        return 1


class _Demo:
    def __init__(self, redis_url: str | None, flows_dir: Path, console: Console, keep: bool):
        self.keep = keep
        self.redis_url = redis_url
        self.flows_dir = flows_dir
        self.console = console
        self.tag = secrets.token_hex(4)
        self.prefix = f"demo-{self.tag}:"
        self.queue = f"demo-{self.tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="orchestrator-demo-"))

    def run(self) -> int:
        names = self._example_flows()
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
            url, where = self._redis(stack)
            self.console.print(
                f"Redis: {where}; key prefix {self.prefix}, queue {self.queue}", markup=False
            )
            stack.callback(_delete_prefixed, url, self.prefix)
            settings = self._settings(url)
            services = self._start_services(stack)
            workers = self._start_workers(settings, services, stack)
            self.console.print(f"Workers ready: {', '.join(w.name for w in workers)}")

            client = Client(settings)
            stack.callback(client.close)
            api = self._start_api(settings, client, stack)
            self.console.print(
                f"API: {api}/docs  dashboard: {api}/ui  metrics: {api}/metrics  "
                "(no token: loopback dev mode)",
                markup=False,
            )
            flower, user, password = self._start_flower(settings, services, stack)
            self.console.print(
                f"Flower: {flower}  (user {user}, password {password})", markup=False
            )
            for d in client.deploy(self.flows_dir):
                kind = "" if d.kind == "Flow" else f"{d.kind} "
                self.console.print(f"Deployed {kind}{d.name} (version {d.version})", markup=False)
            started = [
                (name, DEMO_INPUTS[name], "succeeded", client.trigger(name, DEMO_INPUTS[name]))
                for name in sorted(names)
            ]
            started += [
                (name, inputs, expect, client.trigger(name, inputs))
                for name, inputs, expect in DEMO_SCENARIOS
                if name in names
            ]
            for name, _inputs, _expect, run in started:
                self._decide(client, run.id, DEMO_DECISIONS.get(name, []))
            ok = True
            for name, inputs, expect, run in started:
                ok = self._report(client, name, run.id, inputs, expect) and ok
            for name, how, payload in DEMO_TRIGGERS:
                if name in names:
                    run_id = self._trigger_other_way(client, api, name, how, payload)
                    ok = (
                        self._report(client, f"{name} ({how})", run_id, payload, "succeeded") and ok
                    )
            self.console.print(
                Text(
                    "All example runs ended as expected."
                    if ok
                    else "Some example runs did not end as expected.",
                    style="bold green" if ok else "bold red",
                )
            )
            if self.keep:
                self._serve_until_interrupted(api)
            return 0 if ok else 1

    def _serve_until_interrupted(self, api: str) -> None:
        self.console.print(
            f"The stack stays up: dashboard {api}/ui, API {api}/docs, and Flower. Ctrl-C stops it.",
            markup=False,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)

    # -- set-up -------------------------------------------------------------------------

    def _start_services(self, stack: contextlib.ExitStack) -> dict[str, str]:
        """The example HTTP service, and the environment the example Variables read."""
        # lazy: workers/ is the repository's example package, importable from its root only
        from workers.pricing import PricingService

        token = secrets.token_hex(16)
        pricing = PricingService(token).start()
        stack.callback(pricing.stop)
        env = {
            "PRICING_URL": pricing.url,
            "PRICING_TOKEN": token,
            "ORDERS_WEBHOOK_SECRET": secrets.token_hex(16),
        }
        # The API verifies webhook signatures in this process: it reads the secret here.
        for key, value in env.items():
            stack.callback(_restore_env, key, os.environ.get(key))
            os.environ[key] = value
        self.console.print(f"Pricing service: {pricing.url}", markup=False)
        return env

    def _start_api(self, settings: Settings, client: Client, stack: contextlib.ExitStack) -> str:
        """The REST API and dashboard, served by uvicorn in a thread on a loopback port."""
        port = free_port()
        config = uvicorn.Config(
            create_api(settings, client, dev=True),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="demo-api", daemon=True)
        thread.start()

        def stop() -> None:
            server.should_exit = True
            thread.join(STOP_TIMEOUT_S)

        stack.callback(stop)
        _wait(lambda: server.started, READY_TIMEOUT_S, lambda: "the API did not start")
        return f"http://127.0.0.1:{port}"

    def _trigger_other_way(
        self, client: Client, api: str, name: str, how: str, payload: dict[str, Any]
    ) -> str:
        """Start a run from an event or a signed webhook; returns its id."""
        if how == "webhook":
            body = json.dumps(payload).encode()
            resp = httpx.post(
                f"{api}/v1/hooks/{name}",
                content=body,
                headers={
                    "X-Signature": sign(os.environ["ORDERS_WEBHOOK_SECRET"], body),
                    "Content-Type": "application/json",
                },
                timeout=10,
            )
            if resp.status_code not in (200, 201):
                raise DemoError(f"webhook to {name} answered {resp.status_code}: {resp.text}")
            self.console.print(f"{name}: signed webhook accepted ({resp.status_code})")
            return resp.json()["id"]
        channel = how.removeprefix("event ")
        event = client.publish(channel, payload, id=f"demo-{payload['id']}")
        self.console.print(f"{name}: published event {event['id']} to {channel}", markup=False)
        key = f"event:price-new-orders:{event['id']}"
        found: list[str] = []

        def started() -> bool:
            found[:] = [r.id for r in client.runs(flow=name) if r.idempotency_key == key]
            return bool(found)

        _wait(started, RUN_TIMEOUT_S, lambda: f"no run of {name} started from {event['id']}")
        return found[0]

    def _example_flows(self) -> list[str]:
        if not self.flows_dir.is_dir():
            raise DemoError(
                f"no {self.flows_dir}/ folder here: run the demo from the repository root"
            )
        names = [lr.name for lr in load(self.flows_dir) if lr.kind == "Flow"]
        missing = sorted(set(names) - set(DEMO_INPUTS))
        if missing:
            raise DemoError(
                f"{self.flows_dir}/ has flows without demo inputs: {', '.join(missing)}. "
                "Add an entry for each to DEMO_INPUTS in orchestrator/devstack/demo.py"
            )
        if not names:
            raise DemoError(f"{self.flows_dir}/ holds no flows")
        return names

    def _redis(self, stack: contextlib.ExitStack) -> tuple[str, str]:
        if self.redis_url and redis_answers(self.redis_url):
            return self.redis_url, f"{redact(self.redis_url)} (shared)"
        binary = shutil.which("redis-server")
        if binary is None:
            raise DemoError(
                f"no Redis answers at {redact(self.redis_url or '')} and redis-server is "
                "not installed: set ORCHESTRATOR_REDIS_URL or install redis-server"
            )
        server = RedisServer(self.tmp / "redis", binary=binary)
        stack.callback(server.stop)
        try:
            server.start()
        except (AssertionError, RuntimeError) as exc:
            raise DemoError(str(exc)) from None
        return server.url, f"private redis-server at {server.url}"

    def _settings(self, url: str) -> Settings:
        return Settings(
            redis_url=url,
            broker_url=url,
            result_backend=url,
            key_prefix=self.prefix,
            celery_key_prefix=self.prefix,
            default_queue=self.queue,
            task_modules="workers.examples",
        )

    def _start_workers(
        self, settings: Settings, services: dict[str, str], stack: contextlib.ExitStack
    ) -> list[WorkerProcess]:
        env = self._env(settings, services)
        workers = []
        for i in range(1, WORKERS + 1):
            w = WorkerProcess(
                self.queue,
                env=env,
                concurrency=WORKER_CONCURRENCY,
                name=f"demo{i}",
                log_dir=self.tmp,
            )
            stack.callback(w.stop, STOP_TIMEOUT_S)
            try:
                w.start(READY_TIMEOUT_S)
            except AssertionError as exc:  # it says why, with the log's tail
                raise DemoError(str(exc)) from None
            workers.append(w)
        return workers

    def _start_flower(
        self, settings: Settings, services: dict[str, str], stack: contextlib.ExitStack
    ) -> tuple[str, str, str]:
        """Flower for the demo's workers, behind basic auth: (URL, user, password)."""
        port, password = free_port(), secrets.token_urlsafe(12)
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "orchestrator", "flower",
                "--address", "127.0.0.1", "--port", str(port)]  # fmt: skip
        env = {
            **self._env(settings, services),
            # Through the environment, never on a command line (ps shows those).
            "ORCHESTRATOR_FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{password}",
        }
        flower = Child("flower", argv, env, self.tmp / "flower.log", http_ok(f"{url}/healthcheck"))
        flower.start(Path.cwd())
        stack.callback(flower.kill)
        stack.callback(flower.terminate)
        _wait(
            lambda: flower.ready() or flower.exited() is not None,
            READY_TIMEOUT_S,
            lambda: f"Flower did not start:\n{flower.tail()}",
        )
        if flower.exited() is not None:
            raise DemoError(f"Flower exited {flower.exited()}:\n{flower.tail()}")
        return url, FLOWER_USER, password

    def _env(self, settings: Settings, services: dict[str, str]) -> dict[str, str]:
        """The environment of the demo's processes: the demo's settings and services on top
        of this one (nothing of ours is configured through it but what is set here)."""
        cwd = Path.cwd()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        env.update(
            ORCHESTRATOR_REDIS_URL=settings.redis_url,
            ORCHESTRATOR_BROKER_URL=settings.broker_url,
            ORCHESTRATOR_RESULT_BACKEND=settings.result_backend,
            ORCHESTRATOR_KEY_PREFIX=settings.key_prefix,
            ORCHESTRATOR_CELERY_KEY_PREFIX=settings.celery_key_prefix,
            ORCHESTRATOR_DEFAULT_QUEUE=settings.default_queue,
            ORCHESTRATOR_TASK_MODULES=settings.task_modules,
            PYTHONPATH=os.pathsep.join(
                dict.fromkeys([str(cwd), *filter(None, env.get("PYTHONPATH", "").split(":"))])
            ),
            PYTHONUNBUFFERED="1",
            **services,
        )
        return env

    # -- results ------------------------------------------------------------------------

    def _decide(self, client: Client, run_id: str, decisions: list) -> None:
        """Act as the approvers: wait for each step to ask, then decide it."""
        for step, by, verdict, comment in decisions:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while time.monotonic() < deadline:
                run = client.get(run_id)
                state = run.steps.get(step)
                if run.done or (state is not None and state.status == "waiting"):
                    break
                time.sleep(0.1)
            if state is None or state.status != "waiting":
                continue
            decide = client.approve if verdict == "approve" else client.reject
            decide(run_id, step, by=by, comment=comment)
            self.console.print(f"{run.flow}: {by} {verdict}s {step} ({comment})", markup=False)

    def _report(
        self, client: Client, name: str, run_id: str, inputs: dict[str, Any], expect: str
    ) -> bool:
        try:
            client.wait(run_id, timeout=RUN_TIMEOUT_S)
        except RunFailed:
            pass
        except TimeoutError:
            self.console.print(
                Text(f"\n{name}: still running after {RUN_TIMEOUT_S:g}s", style="red")
            )
            return False
        run = client.get(run_id)
        total = (run.finished_at or time.time()) - (run.created_at or time.time())
        ok = run.status == expect
        self.console.print()
        self.console.print(
            Text.assemble(
                (name, "bold"),
                f"  run {run.id}  ",
                (run.status, "green" if ok else "red"),
                f"  in {total * 1000:.0f} ms",
                "" if expect == "succeeded" else f"  (expected: {expect})",
            )
        )
        self.console.print(Text(f"  inputs:  {_short(inputs)}"))
        if run.status == "succeeded":
            self.console.print(Text(f"  outputs: {_short(run.outputs)}"))
        else:
            error = run.error or {}
            self.console.print(
                Text(f"  error:   {error.get('type')}: {error.get('message')}", style="red")
            )
        order = {sid: i for i, sid in enumerate(client.plan(run.flow, run.version).order)}
        table = Table(
            "step", "status", "attempts", "duration ms", "worker", box=None, padding=(0, 2)
        )
        for key in sorted(run.steps, key=lambda k: (order.get(k.split("[")[0], 1e9), k)):
            s = run.steps[key]
            table.add_row(
                Text(key),
                Text(s.status, style=_STATUS_STYLES.get(s.status, "yellow")),
                Text(str(s.attempts)),
                Text(f"{s.duration * 1000:.0f}" if s.duration is not None else "-"),
                Text(s.worker or "-"),
            )
        self.console.print(table)
        return ok


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _delete_prefixed(url: str, prefix: str) -> None:
    """Delete every key under the demo's prefix (SCAN, never KEYS or FLUSH)."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    except (redis.RedisError, OSError):
        pass  # a private server already stopped; nothing to clean
    finally:
        client.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _wait(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise DemoError(what())
        time.sleep(0.1)
