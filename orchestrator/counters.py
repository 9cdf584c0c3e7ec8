"""What the engine counts for ``/metrics``, and how it is written in Redis.

Workers run on many machines and the API is another process, so nothing is counted
in process memory: every count is a field of one Redis hash, ``<prefix>metrics``,
bumped by the Lua script that makes the state change it counts (``lua/metrics.lua``
and its callers), so a count is exact under redelivery and costs no round trip.
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

#: The run buckets as the Lua scripts take them (they echo a bound back as ``le``).
RUN_BOUNDS_ARG = ",".join(str(b) for b in RUN_BUCKETS)


def bucket(bounds: tuple[float, ...], seconds: float) -> str:
    """The ``le`` of the bucket that holds ``seconds``: the smallest bound not below it."""
    for b in bounds:
        if seconds <= b:
            return str(b)
    return "+Inf"


def step_counts(flow: str, seconds: float | None, retried: bool = False) -> list[tuple[str, float]]:
    """Increments for one step attempt that ended: its duration (None: not a task step,
    whose duration is not observed) and whether it is retried."""
    out: list[tuple[str, float]] = []
    if seconds is not None:
        seconds = max(seconds, 0.0)
        out += [(f"step|{flow}|{bucket(STEP_BUCKETS, seconds)}", 1), (f"step_sum|{flow}", seconds)]
    if retried:
        out.append((f"retries|{flow}", 1))
    return out
