"""A step's ``rate_limit`` (``10/s``, ``100/m``, ``0.5/h``): fixed windows counted in Redis;
a step over its limit is held back with a Celery retry that spends no attempt."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .host import Host
else:
    Host = object  # the mixins' typed base while type checking (.host)


def rate_window(rate: str) -> tuple[float, int]:
    """The window in seconds and how many steps it admits: ``0.5/s`` is one per 2 s."""
    count, unit = rate.split("/")
    per = {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    n = float(count)
    return (per, int(n)) if n >= 1 else (per / n, 1)


class RateLimitMixin(Host):
    """:class:`~.execution.Execution`'s rate limit check, before a task step begins."""

    def _rate_ok(self) -> bool:
        """Hold a step back (without spending an attempt) while its rate limit is used up."""
        rate = self.node.options.get("rate_limit")
        if not rate:
            return True
        window, limit = rate_window(rate)
        now = time.time()
        slot = int(now // window)
        if self.store.rate_hit(self.plan.name, self.node.id, slot, window) <= limit:
            return True
        self.deferred += 1
        raise self.task.retry(
            countdown=round((slot + 1) * window - now, 3) + 0.001,
            max_retries=None,
            kwargs=self._kwargs(),
        )
