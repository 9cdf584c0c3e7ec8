"""Publishing canvas: sending step messages without Celery result tracking.

"Publish" here always means sending a task message; an event published to a channel is
:mod:`.events`' business. The app's result backend (``app.OrchestratorCelery``) asks
:func:`untracked_now` whether to skip tracking; the runtime and the producers send through
:func:`publish`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery

_untracked = threading.local()


@contextmanager
def results_untracked() -> Iterator[None]:
    """Publish canvas without registering its results with the result backend.

    ``group.apply_async`` (so every chord) hands each member's result to the backend's
    consumer for a readiness barrier; with the Redis backend that is a pub/sub
    subscription per member that nothing ever reads or releases (celery#4707, #5320),
    so a long-lived producer leaks channels. Steps keep no Celery results (outputs live
    in run state), so the orchestrator publishes its canvas inside this block.
    """
    before = getattr(_untracked, "on", False)
    _untracked.on = True
    try:
        yield
    finally:
        _untracked.on = before


def untracked_now() -> bool:
    """Whether this thread is inside :func:`results_untracked`."""
    return bool(getattr(_untracked, "on", False))


def publish(app: Celery, sigs: list) -> None:
    """Send canvas on one producer connection, tracking no Celery results.

    Several signatures go out in pipelined batches (kombu's ``Producer.batch``, one
    round trip per batch instead of one per message: celery#6973), which is what lets a
    forEach publish thousands of children quickly.
    """
    with results_untracked(), app.producer_or_acquire() as producer:
        batch = getattr(producer, "batch", None)
        if len(sigs) > 1 and batch is not None:
            pipelined = batch(max_size=PUBLISH_BATCH)
        else:
            pipelined = contextlib.nullcontext()
        with pipelined:
            for sig in sigs:
                sig.apply_async(producer=producer)


#: Redis commands buffered per pipelined publish.
PUBLISH_BATCH = 500
