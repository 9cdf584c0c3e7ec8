"""Prometheus metrics for ``GET /metrics``, read from Redis when Prometheus scrapes.

Steps run in worker processes on many machines and the API is a process of its own, so
nothing is counted in memory here: the Lua scripts that change run state keep counters
in ``<prefix>metrics`` (fields in :mod:`orchestrator.counters`), and this collector
turns them into metric families at scrape time, together with what can be read off
the current state: runs pending, running and waiting (the ``runs:active`` index and
each run's status) and the messages waiting in each known Celery queue.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .counters import RUN_BUCKETS, STEP_BUCKETS
from .errors import OrchestratorError, PoolsFileError
from .pools import DEFAULT_POOLS_FILE, load_pools
from .status import ACTIVE, ENDED

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("orchestrator.metrics")

#: Active runs counted per call of ``lua/count_runs.lua`` (each holds Redis about 1.5 ms).
PAGE = 1000


def metrics_registry(
    client: Client, pools_file: str | Path | None = DEFAULT_POOLS_FILE
) -> CollectorRegistry:
    """A registry holding only the orchestrator's collector (one per API app)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OrchestratorCollector(client, pools_file))
    return registry


class OrchestratorCollector(Collector):
    """Reads the counters, the active runs and the queue depths at each scrape."""

    def __init__(self, client: Client, pools_file: str | Path | None = DEFAULT_POOLS_FILE):
        self.client = client
        self.pools_file = Path(pools_file) if pools_file else None

    def collect(self) -> Iterator[Metric]:
        store = self.client.store
        flows = store.flow_names()
        yield from counter_families(store.metric_fields(), flows)
        yield from self._active_runs(flows)
        depths = self._queue_depths(self.known_queues(flows))
        if depths is not None:
            family = GaugeMetricFamily(
                "orchestrator_queue_depth",
                "Messages waiting in a Celery queue (every priority), not yet taken by a worker",
                labels=["queue"],
            )
            for queue, depth in sorted(depths.items()):
                family.add_metric([queue], depth)
            yield family

    def _active_runs(self, flows: list[str]) -> Iterator[Metric]:
        """Runs not yet ended, by flow and status (counted in Redis: ``active_counts``)."""
        counts = self.client.store.active_counts(PAGE)
        names = sorted({*flows, *(f for f, _ in counts)})
        for status in ACTIVE:
            family = GaugeMetricFamily(
                f"orchestrator_runs_{status}", f"Runs now {status}", labels=["flow"]
            )
            for flow in names:
                family.add_metric([flow], counts.get((flow, status), 0))
            yield family

    def known_queues(self, flows: Iterable[str]) -> set[str]:
        """The default queue, the queues deployed flows route steps to, and the pools'."""
        queues = {self.client.settings.default_queue}
        for name in flows:
            info = self.client.store.flow_info(name)
            if not info or not info.get("version"):
                continue
            try:
                plan = self.client.plan(name, info["version"])
            except OrchestratorError as exc:  # a stored definition that no longer loads
                log.warning("metrics: skipping the queues of flow %r: %s", name, exc)
                continue
            queues |= {n.options["queue"] for n in plan.nodes.values() if n.options.get("queue")}
        return queues | pool_queues(self.pools_file)

    def _queue_depths(self, queues: Iterable[str]) -> dict[str, int] | None:
        """Messages in each queue, asked of the broker (kombu counts a Redis queue's
        priority lists and applies the configured key prefix); None when it cannot be
        reached."""
        conn = self.client.app.connection_for_read()
        out: dict[str, int] = {}
        try:
            with conn:
                conn.ensure_connection(max_retries=1)
                channel = conn.channel()
                for queue in queues:
                    try:
                        out[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                    except conn.channel_errors:  # never declared: nothing waits in it
                        out[queue] = 0
                        channel = conn.channel()  # the error closed an AMQP channel
        except conn.connection_errors as exc:
            log.warning("metrics: cannot read queue depths from the broker: %s", exc)
            return None
        return out


def counter_families(raw: dict[str, str], flows: Iterable[str]) -> list[Metric]:
    """Metric families from the counters hash; every deployed flow appears, at 0 if need be."""
    names = set(flows)
    started: dict[str, float] = defaultdict(float)
    finished: dict[tuple[str, str], float] = defaultdict(float)
    retries: dict[str, float] = defaultdict(float)
    hist: dict[str, _Histograms] = {
        "run": _Histograms(RUN_BUCKETS),
        "step": _Histograms(STEP_BUCKETS),
    }
    for field, value in raw.items():
        kind, _, rest = field.partition("|")
        amount = float(value)
        if kind == "started":
            started[rest] += amount
            names.add(rest)
        elif kind == "finished":
            flow, _, status = rest.rpartition("|")
            finished[(flow, status)] += amount
            names.add(flow)
        elif kind == "retries":
            retries[rest] += amount
            names.add(rest)
        elif kind in hist:
            flow, _, le = rest.rpartition("|")
            hist[kind].add(flow, le, amount)
            names.add(flow)
        elif kind.endswith("_sum") and kind[:-4] in hist:
            hist[kind[:-4]].sums[rest] += amount
            names.add(rest)
    ordered = sorted(names)

    runs_started = CounterMetricFamily("orchestrator_runs_started", "Runs created", labels=["flow"])
    runs_finished = CounterMetricFamily(
        "orchestrator_runs_finished", "Runs that ended, by final status", labels=["flow", "status"]
    )
    step_retries = CounterMetricFamily(
        "orchestrator_step_retries",
        "Step attempts that failed and were scheduled again",
        labels=["flow"],
    )
    for flow in ordered:
        runs_started.add_metric([flow], started[flow])
        step_retries.add_metric([flow], retries[flow])
        statuses = {*ENDED, *(s for f, s in finished if f == flow)}
        for status in sorted(statuses):
            runs_finished.add_metric([flow, status], finished[(flow, status)])
    return [
        runs_started,
        runs_finished,
        hist["run"].family(
            "orchestrator_run_duration_seconds",
            "Run duration, from trigger to end, of runs that ended",
            ordered,
        ),
        hist["step"].family(
            "orchestrator_step_duration_seconds",
            "Duration of each attempt of a task, service or http step",
            ordered,
        ),
        step_retries,
    ]


class _Histograms:
    """Per-flow bucket counts (not cumulative, as stored) and sums of one histogram."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(bounds) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, flow: str, le: str, amount: float) -> None:
        # A bound that is no longer configured counts in the next one up, so the
        # cumulative counts stay right when the buckets change between versions.
        try:
            index = bisect_left(self.bounds, float(le))
        except ValueError:
            log.warning("metrics: ignoring a bucket with bound %r", le)
            return
        self.counts[flow][index] += amount

    def family(self, name: str, documentation: str, flows: list[str]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=["flow"])
        for flow in flows:
            counts = self.counts[flow]
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for bound, count in zip([*self.bounds, float("inf")], counts, strict=True):
                total += count
                buckets.append((floatToGoString(bound), total))
            family.add_metric([flow], buckets, self.sums[flow])
        return family


def pool_queues(pools_file: Path | None) -> set[str]:
    """Queue names of every pool in a pools file (none when it is missing or malformed:
    a scrape does not fail for it)."""
    if pools_file is None or not pools_file.is_file():
        return set()
    try:
        return load_pools(pools_file).queues()
    except OSError as exc:
        log.warning("metrics: cannot read %s: %s", pools_file, exc)
    except PoolsFileError as exc:
        log.warning("metrics: cannot read %s: %s", pools_file, exc.__cause__ or exc)
    return set()
