"""The Celery application, configured in one place from :class:`Settings`."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, signals

from . import procgroup
from .publishing import untracked_now
from .redisconn import queue_max_priority, transport_options
from .settings import Settings, get_settings


def celery_config(settings: Settings) -> dict:
    """Celery settings derived from ours; the reasons are in the README ("Delivery")."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only, both ways: a pickle message is refused, never executed.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A step's message is acknowledged after it ran, and given back when the
        # worker process dies, so a SIGKILLed worker loses no step.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        # Redis has no real acks: an unacked message is redelivered after the
        # visibility timeout. It must exceed every step's hard time limit and every
        # retry countdown (the loader checks the definitions against it). Sentinel URLs
        # get the master's name; RabbitMQ gets publisher confirms (redisconn.py).
        "broker_transport_options": transport_options(settings.broker_url, settings),
        "result_backend_transport_options": transport_options(settings.result_backend, settings),
        # RabbitMQ honours step priorities only in queues declared with x-max-priority.
        "task_queue_max_priority": queue_max_priority(settings.broker_url),
        "result_expires": 24 * 3600,
        "task_default_queue": settings.default_queue,
        "broker_connection_retry_on_startup": True,
        # A publish (a chain's next step, a continuation) keeps trying for ~10 s, through
        # a Redis restart, rather than ~0.6 s (README "Crash recovery and shutdown").
        "task_publish_retry_policy": {
            "max_retries": 12,
            "interval_start": 0,
            "interval_step": 0.25,
            "interval_max": 1,
        },
        "worker_hijack_root_logger": False,
        "task_track_started": False,
        # Task events (received, started, succeeded...), so Flower lists every step from
        # a worker's first task on. Flower's own remote "enable events" does nothing for
        # a worker started --without-heartbeat --without-gossip (its event dispatcher is
        # off). A prefork worker buffers task events and publishes them per event-loop
        # turn (~2.4 PUBLISH per step measured). No task-sent events: those would cost
        # every publish of a step message a round trip.
        "worker_send_task_events": settings.task_events,
    }


# Each prefork pool process leads a process group of its own, so a SIGTERM to the node's
# whole group is the main process's warm shutdown, not the death of running steps
# (procgroup.py; README "Crash recovery and shutdown").
signals.worker_process_init.connect(
    procgroup.on_pool_process_init, weak=False, dispatch_uid="orchestrator.procgroup"
)


class OrchestratorCelery(Celery):
    """Celery whose result backend skips result tracking while :mod:`.publishing` asks it to,
    and whose producers are re-entrant per thread (:meth:`producer_or_acquire`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._held = threading.local()

    def producer_or_acquire(self, producer: Any = None) -> Any:
        """The given producer, else the one this thread already holds, else one from the pool.

        Celery's ``chain.run`` drops the ``producer=`` it is given, so a chain published
        with a producer in hand takes a second one from the pool for its first task. With
        ``broker_pool_limit`` threads (10) each holding one and waiting for another, every
        publisher in the process blocks for ever: an API under 30 concurrent triggers, a
        Client shared by threads. A thread that holds a producer gets that one again, so
        no thread ever waits for the pool while it holds a producer.
        """
        if producer is not None:
            return contextlib.nullcontext(producer)
        return self._thread_producer()

    @contextmanager
    def _thread_producer(self) -> Iterator[Any]:
        held = getattr(self._held, "producer", None)
        if held is not None:
            yield held
            return
        with self.producer_pool.acquire(block=True) as producer:
            self._held.producer = producer
            try:
                yield producer
            finally:
                self._held.producer = None

    def _get_backend(self) -> Any:
        backend = super()._get_backend()
        track = getattr(backend, "add_pending_result", None)
        if track is not None:

            def add_pending_result(
                result: Any, weak: bool = False, start_drainer: bool = True
            ) -> Any:
                if untracked_now():
                    return result
                return track(result, weak=weak, start_drainer=start_drainer)

            backend.add_pending_result = add_pending_result
        return backend


def create_app(
    settings: Settings | None = None, main: str = "orchestrator", set_as_current: bool = True
) -> Celery:
    """A Celery app wired to the orchestrator's step task."""
    settings = settings or get_settings()
    app = OrchestratorCelery(main, set_as_current=set_as_current)
    app.conf.update(celery_config(settings))
    app.conf.orchestrator_settings = settings
    # Registers orchestrator.step on this app (it is a shared task).
    importlib.import_module("orchestrator.runtime")
    importlib.import_module("orchestrator.scheduler")  # and orchestrator.tick
    importlib.import_module("orchestrator.recovery")  # workers' heartbeat and shutdown limit
    importlib.import_module("orchestrator.events")  # and orchestrator.event
    return app


def import_task_modules(settings: Settings) -> None:
    """Import the user's task modules so their shared tasks register."""
    for name in settings.task_module_list:
        importlib.import_module(name)
