"""Retry policy and time limits of a step: how long to wait, how long to let it run.

Pure arithmetic on the model, shared by the plan (a node's options), the loader (time
limits checked against the broker's visibility timeout) and the runtime (backoff).
"""

from __future__ import annotations

import random

from .model import MAX_DURATION_S, RetryPolicy

#: Used where neither the step nor the flow's defaults name a retry policy.
DEFAULT_RETRY = RetryPolicy(
    max_attempts=1, backoff="exponential", initial_delay=1.0, max_delay=60.0, jitter=True
)


def merged_retry(*layers: RetryPolicy | None) -> RetryPolicy:
    """:data:`DEFAULT_RETRY` overlaid with each layer's fields that are set, in order."""
    merged = DEFAULT_RETRY.model_dump()
    for layer in layers:
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True))
    return RetryPolicy(**merged)


def hard_time_limit(soft: float) -> float:
    """The hard limit: a little longer than the soft one, so the step can clean up."""
    return round(soft + max(1.0, soft * 0.1), 3)


def retry_countdown(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` after attempt ``attempt`` failed.

    Exponential backoff doubles from ``initialDelay``; linear adds it; fixed repeats it.
    All are capped by ``maxDelay``; with jitter the wait is drawn uniformly from
    [0, cap] ("full jitter"), which spreads retries of many runs apart.
    """
    base = policy.initial_delay or 0.0
    if policy.backoff == "exponential":
        delay = base * (2.0 ** min(attempt - 1, 64))  # past 2**64 it is capped anyway
    elif policy.backoff == "linear":
        delay = base * attempt
    else:
        delay = base
    delay = min(delay, policy.max_delay if policy.max_delay is not None else delay, MAX_DURATION_S)
    if policy.jitter:
        delay = (rng or random).uniform(0, delay)
    return round(delay, 3)
