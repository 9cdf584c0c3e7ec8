"""The orchestrator against plain Celery canvas: ``python -m benchmarks.run`` (``make bench``).

Starts its own ``redis-server`` and Celery worker processes (``-A orchestrator.worker``,
both task sets registered), and runs every scenario twice with the same tasks, broker,
worker processes and Celery settings: once as hand-written canvas sent with the
orchestrator's own Celery app, once as a deployed flow triggered through
:class:`orchestrator.Client`. The two alternate (plain, orch, orch, plain, ...) and each
number is the median of ``--repeat`` runs. Results go to ``benchmarks/results/latest.json``
and ``chart.png``; the table on stdout says which targets are met.

The plain side is the leanest canvas a Celery user would write for the same work: a
chain keeps only its last task's result (what the caller waits on), a chord's header
keeps its results (the chord needs them). The orchestrator's step tasks ignore their
Celery results (its state is in its own Redis keys). Completion: polling the stored
result of the chain's last task or the chord's body for plain Celery (see
:func:`wait_result`), ``Client.wait`` (polling the run's status) for the orchestrator,
with the same back-off.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis
import yaml
from celery import chain, chord, group

from orchestrator.client import Client
from orchestrator.settings import Settings
from tests.support import RedisServer, WorkerProcess, wait_for

RESULTS = Path(__file__).resolve().parent / "results"
TASK_MODULES = "benchmarks.tasks"
#: Plain chords as measured on this machine class before this benchmark existed, waiting
#: with ``AsyncResult.get``. Kept for comparison only: waiting by polling the stored result
#: (as this benchmark does) the 10,000-wide chord takes ~25 s, not 556 s (see README).
REFERENCE_PLAIN_CHORD_S = {1000: 6.5, 2000: 12.0, 4000: 85.0, 10000: 556.0}
ALL = ("s1", "s2", "s3", "s4", "s5", "s6", "s7")
WAIT_S = 600.0


# -- sizes ---------------------------------------------------------------------------------


class Sizes:
    """Scenario sizes; ``--quick`` shrinks them for a smoke run."""

    def __init__(self, args: argparse.Namespace):
        q = args.quick
        self.flows = 40 if q else 200  # s1, s6, s7
        self.seq_len = 5
        self.light_steps, self.light_n = 40, 10  # s2
        self.long_steps, self.long_n = (4, 27) if q else (10, 30)
        self.fan = 200 if q else 1000  # s3
        self.chords = [200, 400] if q else args.plain_chord  # s4, plain side
        self.foreach = [1000, 3000] if q else args.foreach  # s4, orchestrator only
        self.foreach_big_repeat = 1
        self.triggers = 30 if q else args.triggers  # s5
        self.repeat = 1 if q else args.repeat


# -- processes -----------------------------------------------------------------------------


class Stack:
    """A private redis-server and a set of worker processes with one configuration."""

    def __init__(self, server: RedisServer, log_dir: Path, profile_dir: Path | None):
        self.server = server
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.prefix = "bench:"
        self.queue = "bench"
        self.r = server.client(decode_responses=True)
        self.workers: list[WorkerProcess] = []
        self.all_workers: list[WorkerProcess] = []
        self.client: Client | None = None
        self.config: tuple | None = None
        self.deployed: set[str] = set()
        self.profilers: list[subprocess.Popen] = []

    @property
    def app(self):
        assert self.client is not None
        return self.client.app

    def use(self, nodes: int = 1, concurrency: int = 2, **settings: Any) -> Client:
        """Run ``nodes`` worker processes of ``-c concurrency`` with these settings."""
        config = (nodes, concurrency, tuple(sorted(settings.items())))
        if config == self.config and self.client is not None:
            return self.client
        self.stop()
        env = {
            "ORCHESTRATOR_REDIS_URL": self.server.url,
            "ORCHESTRATOR_KEY_PREFIX": self.prefix,
            "ORCHESTRATOR_DEFAULT_QUEUE": self.queue,
            "ORCHESTRATOR_TASK_MODULES": TASK_MODULES,
            # Celery task events (for Flower) cost both sides ~2.4 PUBLISH per task; the
            # published figures were taken without them, as plain Celery's default is.
            "ORCHESTRATOR_TASK_EVENTS": "false",
            **{f"ORCHESTRATOR_{k.upper()}": str(v) for k, v in settings.items()},
        }
        for i in range(nodes):
            w = WorkerProcess(
                self.queue,
                env=env,
                concurrency=concurrency,
                name=f"bench{i}",
                log_dir=self.log_dir,
            )
            w.start(timeout=60)
            self.workers.append(w)
            self.all_workers.append(w)
        self.client = Client(
            Settings(
                redis_url=self.server.url,
                key_prefix=self.prefix,
                default_queue=self.queue,
                task_modules=TASK_MODULES,
                **settings,
            )
        )
        self.deployed = set()
        self.config = config
        tag = "-".join(f"{k}{v}" for k, v in settings.items())
        self._profile_start(f"{nodes}x{concurrency}-{tag}")
        return self.client

    def stop(self) -> None:
        self._profile_stop()
        for w in self.workers:
            w.stop()
        self.workers = []
        # Collect finished AsyncResults while their backend is open: their __del__ needs it.
        gc.collect()
        if self.client is not None:
            # A plain chord leaves a pub/sub subscription per member (celery#4707); forget
            # them, or the AsyncResults' __del__ at exit tries to reach a stopped Redis.
            consumer = getattr(self.client.app.backend, "result_consumer", None)
            with contextlib.suppress(Exception):
                consumer.stop()
                consumer.subscribed_to.clear()
            self.client.close()
        self.client = None
        self.config = None

    def _profile_start(self, tag: str) -> None:
        if self.profile_dir is None or not shutil.which("py-spy", path=_venv_bin()):
            return
        for w in self.workers:
            out = self.profile_dir / f"{w.name}-{tag}.txt"
            self.profilers.append(
                subprocess.Popen(
                    [shutil.which("py-spy", path=_venv_bin()), "record", "--subprocesses",
                     "--nonblocking", "--rate", "100", "--format", "raw", "--pid", str(w.pid),
                     "-o", str(out)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip

    def _profile_stop(self) -> None:
        for p in self.profilers:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
        self.profilers = []

    def deploy(self, name: str, steps: list[dict], inputs: dict | None = None) -> str:
        if name not in self.deployed:
            assert self.client is not None
            spec: dict[str, Any] = {"initialState": "started", "steps": steps}
            if inputs:
                spec["inputs"] = inputs
            doc = {
                "apiVersion": "orchestrator/v1",
                "kind": "Flow",
                "metadata": {"name": name},
                "spec": spec,
            }
            self.client.deploy(yaml.safe_dump(doc, sort_keys=False))
            self.deployed.add(name)
        return name

    def idle(self) -> None:
        """Wait until the queue is empty and no message is unacknowledged."""
        wait_for(
            lambda: self.r.llen(self.queue) == 0 and self.r.zcard("unacked_index") == 0,
            timeout=120,
            interval=0.05,
            message="workers did not drain the queue",
        )

    def worker_problems(self) -> list[str]:
        """Distinct ERROR/CRITICAL/Traceback lines from every worker log so far."""
        seen: dict[str, int] = {}
        for w in self.all_workers:
            for line in w.log_text().splitlines():
                if re.search(r"\b(ERROR|CRITICAL)\b|Traceback|Error:", line):
                    key = re.sub(r"[0-9a-f]{16,}|\d+\.\d+s|\[\d{4}-[^\]]+\]", "…", line)[:300]
                    seen[key] = seen.get(key, 0) + 1
        return [f"{n}× {k}" for k, n in sorted(seen.items(), key=lambda kv: -kv[1])]


def _venv_bin() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# -- both sides of one piece of work --------------------------------------------------------


def sig(app, name: str, keep: bool = True, **kwargs: Any):
    """A plain immutable signature; ``keep`` False drops its result (nobody reads it)."""
    return app.signature(name, kwargs=kwargs, immutable=True, ignore_result=not keep)


def wait_result(app, task_id: str, timeout: float = WAIT_S, poll: float = 0.01) -> None:
    """Wait for a task's stored result by polling it, as ``Client.wait`` polls a run.

    Not ``AsyncResult.get``: with Celery 5.7's Redis backend it once waited forever on
    its pub/sub channel for a result that was already stored (see README). Polling
    with the same back-off as the orchestrator's ``Client.wait`` also keeps the two
    sides' completion detection alike.
    """
    backend = app.backend
    key = backend.get_key_for_task(task_id)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        raw = backend.client.get(key)
        if raw is not None:
            meta = backend.decode_result(raw)
            if meta["status"] == "SUCCESS":
                return
            if meta["status"] in ("FAILURE", "REVOKED"):
                raise RuntimeError(f"plain task {task_id} ended {meta['status']}: {meta}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"plain task {task_id} not done after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, poll)


def plain_chains(app, count: int, tasks: list[tuple[str, dict]], poll: float = 0.01) -> float:
    t0 = time.perf_counter()
    results = []
    for _ in range(count):
        sigs = [
            sig(app, name, keep=i == len(tasks) - 1, **kw) for i, (name, kw) in enumerate(tasks)
        ]
        results.append((chain(*sigs) if len(sigs) > 1 else sigs[0]).apply_async())
    for res in results:
        wait_result(app, res.id, poll=poll)
    return time.perf_counter() - t0


def plain_chord(app, width: int) -> float:
    t0 = time.perf_counter()
    header = group([sig(app, "bench.noop", x=i) for i in range(width)])
    wait_result(app, chord(header, sig(app, "bench.noop")).apply_async().id)
    return time.perf_counter() - t0


def orch_runs(
    client: Client, flow: str, count: int, inputs: dict | None = None, poll: float = 0.01
) -> float:
    t0 = time.perf_counter()
    runs = [client.trigger(flow, inputs or {}) for _ in range(count)]
    for run in runs:
        client.wait(run.id, timeout=WAIT_S, poll=poll)
    return time.perf_counter() - t0


def alternate(repeat: int, variants: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run the variants in turn, reversing the order every other round, ``repeat`` rounds."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeat):
        for n in names if i % 2 == 0 else names[::-1]:
            out[n].append(variants[n]())
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def noop_steps(n: int, prefix: str = "s") -> list[dict]:
    return [{"id": f"{prefix}{i}", "task": "bench.noop"} for i in range(n)]


# -- scenarios -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack):
        self.args, self.stack, self.sz = args, stack, Sizes(args)
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    def row(self, **kw: Any) -> dict[str, Any]:
        # The 1-minute load average when the row was done: other work on the machine shows.
        kw["loadavg_1m"] = round(os.getloadavg()[0], 2)
        self.rows.append(kw)
        print(format_row(kw), flush=True)
        if kw.get("samples"):
            print(
                "    samples: "
                + "; ".join(
                    f"{side} " + ", ".join(f"{x:.3f}" for x in xs)
                    for side, xs in kw["samples"].items()
                ),
                flush=True,
            )
        return kw

    def main_config(self) -> Client:
        return self.stack.use(nodes=1, concurrency=self.args.concurrency)

    # s1 -------------------------------------------------------------------------------

    def s1(self) -> None:
        client, sz = self.main_config(), self.sz
        flow = self.stack.deploy("bench-seq5", noop_steps(sz.seq_len))
        chain5 = [("bench.noop", {})] * sz.seq_len
        n_steps = sz.flows * sz.seq_len
        plain_chains(self.stack.app, 5, chain5)  # warm up
        orch_runs(client, flow, 5)
        self.stack.idle()
        t = alternate(
            sz.repeat,
            {
                "plain": lambda: plain_chains(self.stack.app, sz.flows, chain5),
                "orchestrator": lambda: orch_runs(client, flow, sz.flows),
            },
        )
        p, o = med(t["plain"]), med(t["orchestrator"])
        self.row(
            id="s1",
            scenario=f"{sz.flows} flows x {sz.seq_len} sequential no-op steps",
            unit="s",
            plain=p,
            orchestrator=o,
            ratio=o / p,
            metric=f"{n_steps / o:.0f} steps/s (plain {n_steps / p:.0f})",
            target="ratio <= 1.25",
            met=o / p <= 1.25,
            samples=t,
        )

    # s2 -------------------------------------------------------------------------------

    def s2(self) -> None:
        client, sz = self.main_config(), self.sz
        r = self.stack.r
        for label, steps, n in (
            ("light", sz.light_steps, sz.light_n),
            ("long", sz.long_steps, sz.long_n),
        ):
            flow = self.stack.deploy(
                f"bench-fibo-{steps}x{n}",
                [
                    {"id": f"f{i}", "task": "bench.fibo", "with": {"n": n, "key": "${inputs.key}"}}
                    for i in range(steps)
                ],
                inputs={"key": {"type": "string", "required": True}},
            )
            gaps: dict[str, list[float]] = {"plain": [], "orchestrator": []}
            counter = iter(range(1_000_000))

            def timed(side: str, fn: Callable[[str], float], gaps=gaps, counter=counter):
                def run_once() -> float:
                    key = f"bench:stamps:{side}:{next(counter)}"
                    elapsed = fn(key)
                    spans = sorted(tuple(map(float, x.split())) for x in r.lrange(key, 0, -1))
                    r.delete(key)
                    gaps[side] += [(b[0] - a[1]) * 1000 for a, b in pairwise(spans)]
                    return elapsed

                return run_once

            variants = {
                "plain": timed(
                    "plain",
                    lambda key, n=n, steps=steps: plain_chains(
                        self.stack.app, 1, [("bench.fibo", {"n": n, "key": key})] * steps, 0.002
                    ),
                ),
                "orchestrator": timed(
                    "orchestrator",
                    lambda key, flow=flow: orch_runs(client, flow, 1, {"key": key}, poll=0.002),
                ),
            }
            variants["plain"]()  # warm up
            variants["orchestrator"]()
            gaps["plain"].clear()
            gaps["orchestrator"].clear()
            self.stack.idle()
            t = alternate(max(sz.repeat, 3), variants)
            p, o = med(t["plain"]), med(t["orchestrator"])
            wall_ms = (o - p) / steps * 1000
            gp, go = med(gaps["plain"]), med(gaps["orchestrator"])
            per_step_ms = go - gp
            self.row(
                id=f"s2-{label}",
                scenario=f"1 flow of {steps} sequential steps, fibo({n}) each",
                unit="s",
                plain=p,
                orchestrator=o,
                ratio=o / p,
                metric=(
                    f"overhead {per_step_ms:.2f} ms/step: step-to-step gap {go:.2f} ms vs"
                    f" {gp:.2f} ms plain (wall-clock difference / steps: {wall_ms:.2f} ms)"
                ),
                target="overhead <= 5 ms/step",
                met=per_step_ms <= 5.0,
                overhead_ms_per_step=per_step_ms,
                wall_overhead_ms_per_step=wall_ms,
                gap_ms={
                    side: {"median": med(g), "mean": statistics.fmean(g), "n": len(g)}
                    for side, g in gaps.items()
                },
                samples=t,
            )

    # s3 -------------------------------------------------------------------------------

    def s3(self) -> None:
        sz = self.sz
        branches = [{"id": f"b{i}", "task": "bench.noop", "with": {"x": i}} for i in range(sz.fan)]
        steps = [{"id": "fan", "parallel": branches}, {"id": "join", "task": "bench.noop"}]
        for label, settings in (
            ("counted", {}),
            ("native", {"native_chord_max": max(64, sz.fan * 2)}),
        ):
            client = self.stack.use(nodes=1, concurrency=self.args.concurrency, **settings)
            flow = self.stack.deploy(f"bench-fan-{sz.fan}", steps)
            plain_chord(self.stack.app, 10)  # warm up
            orch_runs(client, flow, 1)  # warm up (every worker process caches the plan)
            self.stack.idle()
            t = alternate(
                sz.repeat,
                {
                    "plain": lambda: plain_chord(self.stack.app, sz.fan),
                    "orchestrator": lambda flow=flow, client=client: orch_runs(client, flow, 1),
                },
            )
            p, o = med(t["plain"]), med(t["orchestrator"])
            how = (
                "Redis-counted fan-in (default native_chord_max=64)"
                if label == "counted"
                else f"native chord (native_chord_max={settings.get('native_chord_max')})"
            )
            self.row(
                id=f"s3-{label}",
                scenario=f"fan-out/fan-in of {sz.fan} parallel steps: {how}",
                unit="s",
                plain=p,
                orchestrator=o,
                ratio=o / p,
                metric=f"{sz.fan / o:.0f} branches/s (plain {sz.fan / p:.0f})",
                target=f"ratio <= 1.25 vs {sz.fan}-wide chord",
                met=o / p <= 1.25,
                samples=t,
            )

    # s4 -------------------------------------------------------------------------------

    def s4(self) -> None:
        client, sz = self.main_config(), self.sz
        flow = self.stack.deploy(
            "bench-foreach",
            [
                {
                    "id": "each",
                    "forEach": "${inputs.items}",
                    "do": {"id": "body", "task": "bench.noop", "with": {"x": "${item}"}},
                },
                {"id": "join", "task": "bench.noop"},
            ],
            inputs={"items": {"type": "array", "required": True}},
        )
        rr = self.stack.r
        per_item: dict[int, float] = {}
        usage: dict[int, dict[str, float]] = {}

        def foreach(n: int) -> float:
            """One forEach run over n items; also notes Redis memory and CPU per item."""
            before, cpu0 = rr.info("memory")["used_memory"], _redis_cpu(rr)
            elapsed = orch_runs(client, flow, 1, {"items": list(range(n))})
            after, cpu1 = rr.info("memory")["used_memory"], _redis_cpu(rr)
            run = client.runs(flow=flow, limit=1)[0]
            keys = [client.store.run_key(run.id), client.store.events_key(run.id)]
            usage[n] = {
                "keys_bytes": sum(rr.memory_usage(k, samples=0) or 0 for k in keys) / n,
                "used_memory_bytes": (after - before) / n,
                "redis_cpu_us": (cpu1 - cpu0) / n * 1e6,
            }
            return elapsed

        def usage_text(n: int) -> str:
            u = usage[n]
            return (
                f"Redis per finished item: {u['keys_bytes']:.0f} B (MEMORY USAGE of the run's"
                f" keys), {u['redis_cpu_us']:.0f} us redis-server CPU"
            )

        foreach(50)  # warm up
        plain_chord(self.stack.app, 10)
        self.stack.idle()
        # Both ways at the same width, alternating.
        plain: dict[int, float] = {}
        for width in sz.chords:
            t = alternate(
                sz.repeat,
                {
                    "plain": lambda w=width: plain_chord(self.stack.app, w),
                    "orchestrator": lambda w=width: foreach(w),
                },
            )
            p, o = med(t["plain"]), med(t["orchestrator"])
            plain[width], per_item[width] = p, o / width
            row: dict[str, Any] = {
                "id": f"s4-{width}",
                "scenario": f"forEach over {width:,} items vs a {width:,}-wide chord",
                "unit": "s",
                "plain": p,
                "orchestrator": o,
                "ratio": o / p,
                "metric": (
                    f"{o / width * 1000:.2f} ms/item (plain {p / width * 1000:.2f}); "
                    + usage_text(width)
                ),
                "target": "(informational)",
                "met": None,
                "usage": usage[width],
                "samples": t,
            }
            if width == 10000:
                row["target"] = "<= 60 s and >= 9x faster than the plain 10,000-wide chord"
                row["met"] = o <= 60 and p / o >= 9
                row["metric"] += f"; {p / o:.2f}x plain's speed"
            self.row(**row)
        # forEach alone at sizes whose plain chord is not run.
        for n in sz.foreach:
            if n in per_item:
                continue
            self.stack.idle()
            times = [foreach(n) for _ in range(sz.foreach_big_repeat)]
            o = med(times)
            per_item[n] = o / n
            row = {
                "id": f"s4-foreach-{n}",
                "scenario": f"forEach over {n:,} items (runs: {len(times)})",
                "unit": "s",
                "plain": _power_fit(plain, n),
                "plain_label": "extrapolated from this run's chords",
                "orchestrator": o,
                "ratio": None,
                "metric": f"{o / n * 1000:.2f} ms/item; " + usage_text(n),
                "target": "(informational)",
                "met": None,
                "usage": usage[n],
                "samples": {"orchestrator": times},
            }
            if n == 10000:
                ref = plain[10000] if 10000 in plain else row["plain"]
                row["target"] = "<= 60 s and >= 9x faster than the plain 10,000-wide chord"
                row["met"] = o <= 60 and ref is not None and ref / o >= 9
            if row["plain"]:
                row["ratio"] = o / row["plain"]
            self.row(**row)
        if len(per_item) >= 2:
            base = 10000 if 10000 in per_item else min(per_item)
            big = max(per_item)
            lin = per_item[big] / per_item[base]
            self.row(
                id="s4-linear",
                scenario=f"forEach time per item at {big:,} vs {base:,} items",
                unit="ms/item",
                plain=None,
                orchestrator=per_item[big] * 1000,
                ratio=lin,
                metric=f"{per_item[base] * 1000:.2f} -> {per_item[big] * 1000:.2f} ms/item",
                target="<= 1.2x (linear)",
                met=lin <= 1.2,
            )
        self.extra["plain_chord"] = {
            "measured_this_run_s": plain,
            "power_law_fit_10000_s": _power_fit(plain, 10000),
            "old_reference_s": REFERENCE_PLAIN_CHORD_S,
        }

    # s5 -------------------------------------------------------------------------------

    def s5(self) -> None:
        client, sz = self.main_config(), self.sz
        flow = self.stack.deploy(
            "bench-stamp",
            [{"id": "stamp", "task": "bench.stamp", "with": {"key": "${inputs.key}"}}],
            inputs={"key": {"type": "string", "required": True}},
        )
        r, app = self.stack.r, self.stack.app
        key = "bench:latency"
        r.delete(key)

        def plain_once() -> float:
            t0 = time.time()
            sig(app, "bench.stamp", keep=False, key=key).apply_async()
            return float(r.blpop([key], timeout=30)[1]) - t0

        started: list[float] = []

        def orch_once() -> float:
            t0 = time.time()
            run = client.trigger(flow, {"key": key})
            lat = float(r.blpop([key], timeout=30)[1]) - t0
            client.wait(run.id, timeout=30, poll=0.002)
            st = client.get(run.id).steps["stamp"].started_at
            started.append(st - t0)
            return lat

        for _ in range(5):  # warm up
            plain_once()
            orch_once()
        started.clear()
        self.stack.idle()
        t = alternate(sz.triggers, {"plain": plain_once, "orchestrator": orch_once})
        pl, ol = sorted(t["plain"]), sorted(t["orchestrator"])
        p50, o50 = _pct(pl, 50) * 1000, _pct(ol, 50) * 1000
        p99, o99 = _pct(pl, 99) * 1000, _pct(ol, 99) * 1000
        rec50 = _pct(sorted(started), 50) * 1000
        self.row(
            id="s5-p50",
            scenario=f"trigger -> first step's task starts, p50 ({sz.triggers} sequential)",
            unit="ms",
            plain=p50,
            orchestrator=o50,
            ratio=o50 / p50,
            metric=f"+{o50 - p50:.2f} ms (recorded step start: {rec50:.2f} ms)",
            target="p50 <= plain + 3 ms",
            met=o50 <= p50 + 3,
            samples={"plain": t["plain"], "orchestrator": t["orchestrator"]},
        )
        self.row(
            id="s5-p99",
            scenario="trigger -> first step's task starts, p99",
            unit="ms",
            plain=p99,
            orchestrator=o99,
            ratio=o99 / p99,
            metric=f"+{o99 - p99:.2f} ms",
            target="(informational)",
            met=None,
        )

    # s6 -------------------------------------------------------------------------------

    def s6(self) -> None:
        client, sz = self.main_config(), self.sz
        flow = self.stack.deploy("bench-seq5", noop_steps(sz.seq_len))
        r = self.stack.r
        n_steps = sz.flows * sz.seq_len
        cost: dict[str, dict[str, Any]] = {}

        def plain_batch() -> tuple[Callable[[], bool], Callable[[], list[str]]]:
            results = []
            for _ in range(sz.flows):
                sigs = [
                    sig(self.stack.app, "bench.noop", keep=i == sz.seq_len - 1)
                    for i in range(sz.seq_len)
                ]
                results.append(chain(*sigs).apply_async())
            keys = [f"celery-task-meta-{res.id}" for res in results]
            return (lambda: r.exists(*keys) == len(keys)), (lambda: keys)

        def orch_batch() -> tuple[Callable[[], bool], Callable[[], list[str]]]:
            start = time.time()
            runs = [client.trigger(flow, {}) for _ in range(sz.flows)]
            idx = f"{self.stack.prefix}runs:status:succeeded"
            store = client.store
            keys = [k for run in runs for k in (store.run_key(run.id), store.events_key(run.id))]
            return (lambda: r.zcount(idx, start, "+inf") >= sz.flows), (lambda: keys)

        indexes = [
            f"{self.stack.prefix}{k}"
            for k in ("runs", "runs:active", "runs:flow:bench-seq5", "runs:status:succeeded")
        ]
        for side, batch in (("plain", plain_batch), ("orchestrator", orch_batch)):
            self.stack.idle()
            cost[side] = _redis_cost(r, batch, n_steps, sz.flows, indexes)
        p, o = cost["plain"], cost["orchestrator"]
        for key, label, unit in (
            ("reads", "Redis round trips (socket reads) per step", "trips"),
            ("commands", "Redis commands per step (incl. inside Lua)", "cmds"),
            ("bytes", "Redis bytes in+out per step", "B"),
            ("cpu_us", "redis-server CPU per step", "us"),
            ("memory_per_run", "Redis memory per finished run (MEMORY USAGE of its keys)", "B"),
            ("used_memory_per_run", "Redis used_memory growth per finished run", "B"),
        ):
            self.row(
                id=f"s6-{key}",
                scenario=label,
                unit=unit,
                plain=p[key],
                orchestrator=o[key],
                ratio=o[key] / p[key] if p[key] else None,
                metric=f"+{o[key] - p[key]:.1f} {unit} beyond Celery",
                target="(report)",
                met=None,
            )
        self.extra["redis_cost"] = cost

    # s7 -------------------------------------------------------------------------------

    def s7(self) -> None:
        sz = self.sz
        counts = _node_counts(self.args.workers)
        chain5 = [("bench.noop", {})] * sz.seq_len
        through: dict[str, dict[int, float]] = {"plain": {}, "orchestrator": {}}
        for n in counts:
            client = self.stack.use(nodes=n, concurrency=1)
            flow = self.stack.deploy("bench-seq5", noop_steps(sz.seq_len))
            plain_chains(self.stack.app, 10, chain5)
            orch_runs(client, flow, 10)
            self.stack.idle()
            t = alternate(
                sz.repeat,
                {
                    "plain": lambda: plain_chains(self.stack.app, sz.flows, chain5),
                    "orchestrator": lambda client=client, flow=flow: orch_runs(
                        client, flow, sz.flows
                    ),
                },
            )
            p, o = med(t["plain"]), med(t["orchestrator"])
            through["plain"][n] = sz.flows / p
            through["orchestrator"][n] = sz.flows / o
            eff = ""
            if n > 1:
                eo = through["orchestrator"][n] / (through["orchestrator"][1] * n)
                ep = through["plain"][n] / (through["plain"][1] * n)
                eff = f", scaling efficiency {eo:.2f} (plain {ep:.2f})"
            self.row(
                id=f"s7-{n}",
                scenario=f"s1 throughput, {n} worker process(es) x -c 1",
                unit="flows/s",
                plain=sz.flows / p,
                orchestrator=sz.flows / o,
                ratio=o / p,
                metric=f"{sz.flows * sz.seq_len / o:.0f} steps/s{eff}",
                target="(report)",
                met=None,
                samples=t,
            )
        self.extra["scaling"] = through


def _redis_cost(
    r: redis.Redis,
    start: Callable[[], tuple[Callable[[], bool], Callable[[], list[str]]]],
    n_steps: int,
    n_runs: int,
    indexes: list[str],
) -> dict[str, Any]:
    """INFO deltas over one batch, less the idle rate (worker polls, our own done-checks)."""

    def snap() -> dict[str, Any]:
        stats, cpu = r.info("stats"), r.info("cpu")
        cmds = {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}
        return {
            "t": time.monotonic(),
            "reads": stats["total_reads_processed"],
            "commands": stats["total_commands_processed"],
            "bytes": stats["total_net_input_bytes"] + stats["total_net_output_bytes"],
            "cpu_us": (cpu["used_cpu_user"] + cpu["used_cpu_sys"]) * 1e6,
            "cmds": cmds,
        }

    def delta(a: dict, b: dict) -> dict[str, Any]:
        d = {k: b[k] - a[k] for k in ("t", "reads", "commands", "bytes", "cpu_us")}
        d["cmds"] = {k: b["cmds"][k] - a["cmds"].get(k, 0) for k in b["cmds"]}
        return d

    def usage(keys: list[str]) -> int:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.memory_usage(k, samples=0)
        return sum(v or 0 for v in pipe.execute())

    # The idle rate: the same done-check polling, with nothing to do.
    a = snap()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        r.exists("bench:nothing")
        time.sleep(0.1)
    idle = delta(a, snap())
    mem0, idx0 = r.info("memory")["used_memory"], usage(indexes)
    a = snap()
    done, keys = start()
    while not done():
        time.sleep(0.1)
    busy = delta(a, snap())
    time.sleep(0.5)
    mem1 = r.info("memory")["used_memory"]
    scale = busy["t"] / idle["t"]
    out: dict[str, Any] = {}
    for k in ("reads", "commands", "bytes", "cpu_us"):
        out[k] = max(0.0, busy[k] - idle[k] * scale) / n_steps
    out["by_command"] = {
        k: round((v - idle["cmds"].get(k, 0) * scale) / n_steps, 3)
        for k, v in sorted(busy["cmds"].items(), key=lambda kv: -kv[1])
        if v - idle["cmds"].get(k, 0) * scale > n_steps * 0.05
    }
    out["memory_per_run"] = (usage(keys()) + usage(indexes) - idx0) / n_runs
    out["used_memory_per_run"] = (mem1 - mem0) / n_runs
    out["seconds"] = busy["t"]
    return out


def _redis_cpu(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"]


def _pct(sorted_xs: list[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    k = (len(sorted_xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def _power_fit(points: dict[int, float], n: int) -> float | None:
    """Least-squares t = a * n^b through the measured points, evaluated at ``n``."""
    if len(points) < 2:
        return None
    xs = [math.log(k) for k in points]
    ys = [math.log(v) for v in points.values()]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return math.exp(my + b * (math.log(n) - mx))


def _node_counts(most: int) -> list[int]:
    out, n = [], 1
    while n < most:
        out.append(n)
        n *= 2
    return [*out, most]


# -- output --------------------------------------------------------------------------------

COLS = ("scenario", "plain", "orchestrator", "ratio", "measured", "target", "met?")


def _num(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if unit in ("s",):
        return f"{v:.2f} s"
    if unit == "ms":
        return f"{v:.2f} ms"
    return f"{v:,.1f} {unit}".strip()


def format_row(row: dict[str, Any]) -> str:
    plain = _num(row.get("plain"), row.get("unit", ""))
    if row.get("plain_label"):
        plain += f" ({row['plain_label']})"
    met = row.get("met")
    cells = [
        f"{row['id']}: {row['scenario']}",
        plain,
        _num(row.get("orchestrator"), row.get("unit", "")),
        "-" if row.get("ratio") is None else f"{row['ratio']:.2f}",
        row.get("metric", ""),
        row.get("target", ""),
        "-" if met is None else ("YES" if met else "NO"),
    ]
    if "error" in row:
        cells[4] = f"ERROR: {row['error']}"
    return " | ".join(cells)


def print_table(rows: list[dict[str, Any]]) -> str:
    lines = [" | ".join(COLS), " | ".join("---" for _ in COLS)]
    lines += [format_row(r) for r in rows]
    text = "\n".join(lines)
    print("\n" + text + "\n", flush=True)
    return text


def draw(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["id"]: r for r in results["rows"]}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [3, 1.2, 1.2]})
    fig.suptitle(
        f"celery-orchestrator vs plain Celery canvas ({results['meta']['cpus']} cores, "
        f"{results['meta']['worker']}; median of {results['meta']['repeat']})"
    )
    # Times, both sides, log scale.
    ax = axes[0]
    ids = [
        i for i in rows if rows[i].get("unit") == "s" and rows[i].get("orchestrator") is not None
    ]
    labels = [_short(rows[i]) for i in ids]
    xs = range(len(ids))
    plain = [rows[i].get("plain") or 0 for i in ids]
    orch = [rows[i]["orchestrator"] for i in ids]
    w = 0.4
    bars = ax.bar([x - w / 2 for x in xs], plain, w, label="plain Celery canvas", color="#888")
    for b, i in zip(bars, ids, strict=True):
        if rows[i].get("plain_label"):
            b.set_hatch("//")
            b.set_facecolor("#ccc")
    ax.bar([x + w / 2 for x in xs], orch, w, label="orchestrator", color="#2a7ab0")
    for x, i in zip(xs, ids, strict=True):
        ratio = rows[i].get("ratio")
        if ratio:
            ax.annotate(
                f"{ratio:.2f}x",
                (x + w / 2, rows[i]["orchestrator"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8, title="hatched: extrapolated, not run", title_fontsize=7)
    ax.set_title("Wall time per scenario (label: orchestrator / plain)")
    # Latency.
    ax = axes[1]
    if "s5-p50" in rows:
        names = ["p50", "p99"]
        pl = [rows["s5-p50"]["plain"], rows["s5-p99"]["plain"]]
        orl = [rows["s5-p50"]["orchestrator"], rows["s5-p99"]["orchestrator"]]
        ax.bar([x - w / 2 for x in range(2)], pl, w, color="#888", label="plain apply_async")
        ax.bar([x + w / 2 for x in range(2)], orl, w, color="#2a7ab0", label="orchestrator trigger")
        ax.set_xticks(range(2))
        ax.set_xticklabels(names)
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    ax.set_title("Trigger -> first task starts")
    # Scaling.
    ax = axes[2]
    sc = results.get("extra", {}).get("scaling")
    if sc:
        for side, color in (("plain", "#888"), ("orchestrator", "#2a7ab0")):
            pts = sorted((int(k), v) for k, v in sc[side].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=side)
        ax.set_xlabel("worker processes (-c 1 each)")
        ax.set_ylabel("flows/s (5 no-op steps each)")
        ax.set_xticks(sorted(int(k) for k in sc["plain"]))
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    ax.set_title("Scaling (s1 throughput)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(row: dict[str, Any]) -> str:
    names = {
        "s1": "s1: 200 x 5-step flows",
        "s2-light": "s2: 40 x fibo(10)",
        "s2-long": "s2: 10 x fibo(30)",
        "s3-counted": "s3: 1000 fan-in (counted)",
        "s3-native": "s3: 1000 fan-in (native chord)",
    }
    rid = row["id"]
    if rid in names:
        return names[rid]
    if rid.startswith("s4-foreach-"):
        return f"s4: forEach {int(rid.rsplit('-', 1)[1]):,}"
    if rid.startswith("s4-"):
        return f"s4: forEach vs chord {int(rid.rsplit('-', 1)[1]):,}"
    return rid


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=(__doc__ or "").split("\n")[0]
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    ap.add_argument(
        "--workers",
        type=int,
        default=max(2, os.cpu_count() or 1),
        help="most worker processes for the scaling scenario (s7); default: cores, at least 2",
    )
    ap.add_argument("--concurrency", type=int, default=2, help="-c of the one worker (s1-s6)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the median counts")
    ap.add_argument(
        "--foreach",
        type=ints,
        default=[10000, 30000],
        help="forEach item counts; a count also in --plain-chord is measured there (repeated),"
        " the others run once, forEach only. Default 10000,30000: 100000 does not fit the"
        " 15-minute budget (it ran past 10 minutes; see benchmarks/README.md)",
    )
    ap.add_argument(
        "--plain-chord",
        type=ints,
        default=[1000, 2000, 10000],
        help="widths at which forEach and a plain chord run alternately (10,000: ~25 s each)",
    )
    ap.add_argument("--triggers", type=int, default=200, help="sequential triggers for s5")
    ap.add_argument("--only", type=lambda s: s.split(","), default=list(ALL), help="e.g. s1,s3")
    ap.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "chart.png")
    ap.add_argument("--py-spy", type=Path, default=None, help="record worker flame graphs here")
    return ap.parse_args(argv)


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = set(args.only) - set(ALL)
    if unknown:
        print(f"unknown scenario(s) {sorted(unknown)}; one of {','.join(ALL)}", file=sys.stderr)
        return 2
    # A SIGTERM (or Ctrl-C) still stops the workers and redis-server we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    load0 = round(os.getloadavg()[0], 2)
    log_dir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    print(f"worker logs: {log_dir}", flush=True)
    failures: dict[str, str] = {}
    with RedisServer() as server:
        stack = Stack(server, log_dir, args.py_spy)
        bench = Bench(args, stack)
        try:
            for name in ALL:
                if name not in args.only:
                    continue
                print(f"== {name} ({time.monotonic() - t0:.0f} s elapsed)", flush=True)
                try:
                    getattr(bench, name)()
                except Exception as exc:  # report it and go on with the other scenarios
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    bench.row(
                        id=name,
                        scenario="FAILED",
                        unit="",
                        plain=None,
                        orchestrator=None,
                        ratio=None,
                        target="",
                        met=False,
                        error=failures[name][:300],
                    )
            info = stack.r.info("memory")
            problems = stack.worker_problems()
        finally:
            stack.stop()
    elapsed = time.monotonic() - t0
    table = print_table(bench.rows)
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": _git_commit(),
            # Uncommitted changes the workers ran with (others may be editing the engine).
            "dirty": _git_dirty(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "celery": _version("celery"),
            "kombu": _version("kombu"),
            "redis_server": _redis_version(),
            "worker": f"prefork -c {args.concurrency}, prefetch 1, late acks, JSON",
            "repeat": Sizes(args).repeat,
            "quick": args.quick,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "elapsed_s": elapsed,
            "loadavg_start_end": [load0, round(os.getloadavg()[0], 2)],
            "redis_used_memory_peak": info.get("used_memory_peak"),
        },
        "rows": bench.rows,
        "extra": bench.extra,
        "worker_log_problems": problems[:50],
        "failures": failures,
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    try:
        draw(results, args.png)
    except ImportError as exc:
        print(f"no chart ({exc}): pip install -e '.[bench]'", file=sys.stderr)
    if problems:
        print("worker log problems:\n  " + "\n  ".join(problems[:20]))
    print(f"results: {args.json}, {args.png}; total {elapsed:.0f} s")
    return 1 if failures else 0


def _git_commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return ""


def _git_dirty() -> list[str]:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "orchestrator", "benchmarks/tasks.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line[3:] for line in out.splitlines() if line.strip()]
    return []


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _redis_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [os.environ.get("REDIS_SERVER_BIN", "redis-server"), "--version"],
            capture_output=True,
            text=True,
        ).stdout
        return out.split("v=")[1].split()[0]
    return ""


if __name__ == "__main__":
    sys.exit(main())
