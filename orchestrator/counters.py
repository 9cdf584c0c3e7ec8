"""What the engine counts for ``/metrics``, and how it is written in Redis.

Workers run on many machines and the API is another process, so nothing is counted
in process memory: every count is a field of one Redis hash, ``<prefix>metrics``,
incremented in the pipeline that runs the Lua script making the state change it counts
(no round trip of its own) and taken back in the rare case that the script refuses the
change (a redelivered step that had ended, an idempotent trigger): counts are exact,
but for a scrape that falls between the two.
:mod:`orchestrator.metrics` reads the hash when Prometheus scrapes.

Fields are ``<name>|<flow>[|<label>]`` (flow names have no ``|``):

==============================  ======================================================
``started|<flow>``              runs created (an idempotent re-trigger is not counted)
``finished|<flow>|<status>``    runs that ended with ``status``
``run|<flow>|<le>``             runs whose duration (created to finished) falls in the
                                bucket with upper bound ``le`` (``+Inf`` past the last
                                one); buckets are not cumulative here
``run_sum|<flow>``              total seconds of those runs
``step|<flow>|<le>``            attempts of task steps by duration (start to end),
``step_sum|<flow>``             and their total seconds
``retries|<flow>``              step attempts that failed and were scheduled again
==============================  ======================================================
"""

from __future__ import annotations

from typing import Any

#: Upper bounds (seconds) of the run duration buckets: runs last from milliseconds to
#: days (an approval waits for people).
RUN_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 604800,
)  # fmt: skip
#: Upper bounds (seconds) of the step attempt duration buckets, up to the default
#: step timeout.
STEP_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800,
)  # fmt: skip

#: Metric increments: (field, amount) pairs.
Counts = list[tuple[str, float]] | tuple[()]


def bucket(bounds: tuple[float, ...], seconds: float) -> str:
    """The ``le`` of the bucket that holds ``seconds``: the smallest bound not below it."""
    for b in bounds:
        if seconds <= b:
            return str(b)
    return "+Inf"


def step_counts(flow: str, seconds: float | None, retried: bool = False) -> Counts:
    """Increments for one step attempt that ended: its duration (None: not a task step,
    whose duration is not observed) and whether it is retried."""
    out: list[tuple[str, float]] = []
    if seconds is not None:
        seconds = max(seconds, 0.0)
        out += [(f"step|{flow}|{bucket(STEP_BUCKETS, seconds)}", 1), (f"step_sum|{flow}", seconds)]
    if retried:
        out.append((f"retries|{flow}", 1))
    return out


def run_counts(flow: str, status: str, created_at: Any, finished_at: Any) -> Counts:
    """Increments for a run that ended with ``status``; its duration is observed when both
    times are known (epoch seconds, as numbers or as Redis returns them)."""
    out: list[tuple[str, float]] = [(f"finished|{flow}|{status}", 1)]
    if created_at is not None and finished_at is not None:
        seconds = max(float(finished_at) - float(created_at), 0.0)
        out += [(f"run|{flow}|{bucket(RUN_BUCKETS, seconds)}", 1), (f"run_sum|{flow}", seconds)]
    return out
