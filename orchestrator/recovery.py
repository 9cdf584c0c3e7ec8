"""Crash recovery and shutdown: no step waits on a worker that is gone.

The Redis broker has no real acknowledgements. kombu keeps every delivered message that
is not acknowledged yet in a hash (``unacked``) and its delivery time in a sorted set
(``unacked_index``), and puts a message back in its queue once it has sat there longer
than the visibility timeout. Alone, that makes the steps of a SIGKILLed worker node wait
for the whole timeout (an hour), which must be that long because a step still running
when it passes would be delivered a second time.

So every worker node runs a :class:`Heartbeat` thread in its main process (started by the
``worker_ready`` signal, stopped by ``worker_shutdown`` after the pool has drained). Every
``heartbeat_s`` seconds it

* moves the ``unacked_index`` score of every message the node holds (running, reserved,
  or waiting out a retry countdown) to now: a live node's messages never look abandoned,
  however long its steps run;
* renews the *lease* of every step its processes run (``l:<step>`` in the run hash,
  ``lua/renew_lease.lua``) and lets go of those of steps they no longer run
  (``lua/release_lease.lua``);
* sweeps: puts back in its queue every message whose score is older than ``lease_s``
  (kombu's ``restore_by_tag``, a WATCH/MULTI transaction per message, so sweeps running
  on many workers at once give a message back once).

A node that dies stops heartbeating, and within ``lease_s`` plus one heartbeat any live
worker puts its messages back: the very messages, with their chain and chord. Beat plays
no part, so recovery does not depend on it. The visibility timeout stays the last resort,
for messages of workers that do not heartbeat.

A step is alive while its lease is: ``lease_s`` past its start (the running record says
so) and then past its last heartbeat. A message delivered again while its step is alive
(the worker's broker connection dropped and Celery gave its messages back; a second copy
of a message whose holder died) finds it so: ``begin_step.lua`` answers ``held`` and the
delivery comes back after a heartbeat instead of running the step twice at once. When a
pool process dies mid-step, :class:`TaskRequest` marks its lease lapsed before Celery
gives the message back, so that redelivery runs at once.

Shutdown: SIGTERM is Celery's warm shutdown (running steps finish, nothing new starts).
After ``shutdown_timeout_s`` the node sends itself SIGQUIT, Celery's cold shutdown: the
steps still running are stopped. Once the pool is done, the node puts every message it
still holds unacknowledged back in its queue, so they run elsewhere at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery import signals
from celery.contrib.testing.worker import test_worker_started, test_worker_stopped
from celery.worker import state
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis

from . import procgroup
from .compiler import STEP_TASK
from .plan import StepAddress
from .settings import Settings
from .store import RedisStore

log = logging.getLogger("orchestrator.recovery")

#: At most this many abandoned messages go back per sweep (the rest at the next one).
SWEEP_LIMIT = 500


class Heartbeat:
    """One worker node's heartbeat, lease renewal and sweep (see the module docstring)."""

    def __init__(self, consumer: Any, settings: Settings):
        self.consumer, self.settings = consumer, settings
        self.app = consumer.app
        #: The node name, as in step records' ``worker`` (``<node>:<pid>``).
        self.node: str = consumer.hostname
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._shutdown_timer: threading.Thread | None = None
        #: Executions whose lease this node renewed: (run id, step key, task id, worker).
        self._leased: set[tuple[str, str, str, str]] = set()
        self._store = RedisStore(settings)  # connects on first use
        self._conn: Any = None
        self._channel: Any = None
        #: What the consumer's channel holds unacknowledged, tag -> message (kombu's QoS).
        self._delivered: Any = None
        #: The broker was unreachable at the last heartbeat; no sweep before _sweep_from.
        self._outage = False
        self._sweep_from = 0.0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        # kombu gives a channel's unacknowledged messages back when the channel closes,
        # which on a lost connection includes the messages of steps still running (a
        # second delivery while they run) and, with Celery 5.7, can crash the worker
        # ('NoneType' object has no attribute 'hostname' in _connparams). A node that
        # heartbeats needs neither: the sweep takes back what it stops holding, and
        # stop() gives back the rest at once.
        kombu_redis.QoS.restore_at_shutdown = False
        self._thread = threading.Thread(
            target=self._loop, name="orchestrator-heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """The pool has drained: give back what the node still holds, stop beating."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
            if not thread.is_alive():
                self._give_back()
                self.beat()  # drops the leases of the steps that ended
        self._close()

    def _give_back(self) -> None:
        """Put the messages this node holds unacknowledged back in their queues now."""
        try:
            channel = self._broker()
            if channel is None:
                return
            with channel.conn_or_acquire() as client:
                # Acknowledged ones (kombu forgets them lazily) are no longer in the hash.
                tags = [t for t in self._held_tags(()) if client.hexists(channel.unacked_key, t)]
                for tag in tags:
                    channel.qos.restore_by_tag(tag, client=client)
            if tags:
                log.warning("gave back the %d message(s) this node still held", len(tags))
        except Exception as exc:  # noqa: BLE001 - then other workers' sweeps take them back
            log.warning("could not give back this node's messages (%s); the sweep will", exc)

    def limit_shutdown(self) -> None:
        """A warm shutdown began: stop the steps still running after ``shutdown_timeout_s``."""
        limit = self.settings.shutdown_timeout_s
        if limit <= 0 or self._shutdown_timer is not None or not hasattr(signal, "SIGQUIT"):
            return
        self._shutdown_timer = threading.Thread(
            target=self._escalate, args=(limit,), name="orchestrator-shutdown", daemon=True
        )
        self._shutdown_timer.start()

    def _escalate(self, limit: float) -> None:
        if self._stopping.wait(limit):
            return  # everything finished in time
        running = len(_snapshot(state.active_requests))
        log.warning(
            "warm shutdown: %d task(s) still running after %g s "
            "(ORCHESTRATOR_SHUTDOWN_TIMEOUT_S): stopping them; their messages go back "
            "to the queue",
            running,
            limit,
        )
        # Celery's cold shutdown: it cancels the running tasks without acknowledging
        # them; stop() gives their messages back (kombu does it without heartbeats).
        os.kill(os.getpid(), signal.SIGQUIT)

    def _loop(self) -> None:
        while True:
            self.beat()
            if self._stopping.wait(self.settings.heartbeat_s):
                return

    # -- one heartbeat --------------------------------------------------------------------

    def beat(self) -> None:
        """Heartbeat held messages, sweep abandoned ones, renew and drop step leases, and
        say which queues this node consumes (``Pnodes``, read by :mod:`.sweep`)."""
        now = time.time()
        requests = _snapshot(state.active_requests)
        try:
            self._report(now)
        except Exception as exc:  # noqa: BLE001 - the thread must outlive any outage
            log.debug("heartbeat: could not report this node (%s)", exc)
        try:
            self._beat_broker(now, requests)
        except Exception as exc:  # noqa: BLE001 - the thread must outlive any outage
            log.warning("heartbeat: broker unreachable (%s); retrying", exc)
            self._close_broker()
            self._outage = True
        try:
            self._beat_leases(requests)
        except Exception as exc:  # noqa: BLE001 - the thread must outlive any outage
            log.warning("heartbeat: run state unreachable (%s); retrying", exc)

    def _report(self, now: float) -> None:
        consumer = getattr(self.consumer, "task_consumer", None)
        queues = sorted(q.name for q in getattr(consumer, "queues", None) or ())
        info = {"queues": queues, "at": now, "pid": os.getpid()}
        self._store.report_node(self.node, None if self._stopping.is_set() else info)

    def _broker(self) -> Any:
        """A channel of our own on the broker; None when it is not Redis (real acks)."""
        if self._conn is None:
            self._conn = self.app.connection_for_write()
            self._channel = None
            if self._conn.transport.driver_type == "redis":
                self._channel = self._conn.channel()
        return self._channel

    def _close_broker(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a connection that already broke
                conn.release()

    def _held_tags(self, requests: Iterable[Any]) -> set[str]:
        """Delivery tags of every message this node holds and has not acknowledged."""
        tags: set[str] = set()
        channel = getattr(getattr(self.consumer, "task_consumer", None), "channel", None)
        delivered = getattr(getattr(channel, "_qos", None), "_delivered", None)
        if delivered is not None:
            self._delivered = delivered
        else:  # the consumer let go of its channel (shutting down): its last one's
            delivered = self._delivered
        if delivered is not None:  # reserved, running and waiting-for-countdown messages
            tags.update(_snapshot(delivered))
        for req in requests:  # running ones received on an earlier connection
            tag = getattr(getattr(req, "message", None), "delivery_tag", None)
            if tag:
                tags.add(tag)
        return tags

    def _beat_broker(self, now: float, requests: tuple[Any, ...]) -> None:
        channel = self._broker()
        if channel is None:
            return
        with channel.conn_or_acquire() as client:
            tags = self._held_tags(requests)
            if tags:  # XX: never resurrect a message acknowledged meanwhile
                client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True)
            if self._outage:
                # Nobody could heartbeat during the outage: give every node a lease's
                # time to heartbeat again before taking its messages for abandoned.
                self._outage, self._sweep_from = False, now + self.settings.lease_s
            if now >= self._sweep_from:
                self.sweep(channel, client, now)

    def sweep(self, channel: Any, client: Any, now: float) -> int:
        """Put back in their queues the messages nobody heartbeated for ``lease_s``."""
        stale = client.zrange(
            channel.unacked_index_key,
            "-inf",
            now - self.settings.lease_s,
            byscore=True,
            offset=0,
            num=SWEEP_LIMIT,
            withscores=True,
        )
        for tag, score in stale:
            raw = client.hget(channel.unacked_key, tag)
            channel.qos.restore_by_tag(tag, client=client)
            if raw:
                headers = json.loads(raw)[0].get("headers") or {}
                log.warning(
                    "recovery: gave back %s[%s], not heartbeated for %.1f s",
                    headers.get("shadow") or headers.get("task"),
                    headers.get("id"),
                    now - score,
                )
        return len(stale)

    def _beat_leases(self, requests: tuple[Any, ...]) -> None:
        running = [ex for ex in map(_execution, requests) if ex is not None]
        ended = self._leased.difference(running)
        if not running and not ended:
            return
        released = [(*ex, "died") for ex in ended]
        renewed = self._store.leases(running, released, self.settings.lease_s)[: len(running)]
        # Keep what we leased until its request ends (then let go of it, above).
        self._leased = {
            ex for ex, ok in zip(running, renewed, strict=True) if ok or ex in self._leased
        }

    def release_now(self, request: Any, why: str = "died") -> None:
        """The pool process running ``request`` died: its step's lease lapses now, saying
        why (``timeout``: the hard time limit killed it), for the delivery that follows."""
        ex = _execution(request)
        if ex is None or (self.settings.heartbeat_s <= 0 and why == "died"):
            return
        run_id, key, task_id, worker = ex
        try:
            self._store.leases([], [(run_id, key, task_id, worker, why)], self.settings.lease_s)
        except Exception as exc:  # noqa: BLE001 - then the lease just runs out
            log.warning("could not release the lease of %s in run %s: %s", key, run_id, exc)

    def _close(self) -> None:
        self._close_broker()
        self._store.close()


def _snapshot(items: Iterable[Any]) -> tuple[Any, ...]:
    """A copy of a set or dict another thread changes (Celery's consumer owns them)."""
    for _ in range(10):
        try:
            return tuple(items)
        except RuntimeError:  # changed size during iteration: copy again
            continue
    return ()


def _execution(request: Any) -> tuple[str, str, str, str] | None:
    """(run id, step key, task id, worker) of a step task's request, or None."""
    if getattr(request, "type", None) != STEP_TASK or not request.worker_pid:
        return None
    try:
        address = StepAddress.from_message_args(request.args)
        return (
            address.run,
            address.key,
            request.id,
            f"{request.hostname}:{request.worker_pid}",
        )
    except (IndexError, TypeError):
        return None


class TaskRequest(Request):
    """The request of an orchestrator task (a step, the tick) in a worker's main process.

    Set as ``Task.Request``. Two things differ from Celery's:

    * when the pool process running a step dies (SIGKILL, out of memory), Celery gives
      its message back at once (``task_reject_on_worker_lost``); marking the step's lease
      lapsed first lets that delivery run the step now, not when the lease runs out;
    * a task that was running when the broker connection dropped is acknowledged, once
      it ends, on the closed channel it came from. kombu 5.7 then fails with
      ``AttributeError`` (the closed channel has no connection), which Celery treats as
      fatal and the worker exits. Treated as a lost connection instead, it is logged and
      the message stays unacknowledged: the sweep gives it back, and the redelivery finds
      the step ended and only continues the run.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._connection_errors: tuple[type[BaseException], ...] = (
            *self._connection_errors,
            AttributeError,
        )

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """The hard time limit killed the step's process: say so in its lease and give
        the message back (the step task has
        ``acks_on_timeout=False``); its next delivery records the timeout as a failed
        attempt and retries or fails the step under its policy, so the run moves on."""
        if not soft:
            hb = _nodes.get(self.hostname)
            if hb is not None:
                hb.release_now(self, why="timeout")
        super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, TimeLimitExceeded | WorkerLostError | Terminated) and self.worker_pid:
            procgroup.kill_group(self.worker_pid)  # hard limit, cancel, death: its subprocesses too
        if isinstance(exc, WorkerLostError | Terminated | SystemExit | KeyboardInterrupt):
            hb = _nodes.get(self.hostname)
            if hb is not None:
                hb.release_now(self)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )


#: The heartbeat of each worker node in this process, by node name.
_nodes: dict[str, Heartbeat] = {}


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    _start(sender)


@test_worker_started.connect
def _test_worker_started(sender: Any = None, consumer: Any = None, **_: Any) -> None:
    _start(consumer)  # celery.contrib.testing's embedded worker (orchestrator.testing)


def _start(consumer: Any) -> None:
    settings = getattr(getattr(consumer, "app", None), "conf", {}).get("orchestrator_settings")
    if settings is None:
        return  # a worker of some other app
    hb = _nodes[consumer.hostname] = Heartbeat(consumer, settings)
    if settings.heartbeat_s > 0:
        hb.start()


@signals.worker_shutting_down.connect
def _worker_shutting_down(sender: Any = None, how: str = "", **_: Any) -> None:
    hb = _nodes.get(sender)
    if hb is not None and how == "Warm":
        hb.limit_shutdown()


@signals.worker_shutdown.connect
def _worker_shutdown(sender: Any = None, **_: Any) -> None:
    _stop(sender)


@test_worker_stopped.connect
def _test_worker_stopped(sender: Any = None, worker: Any = None, **_: Any) -> None:
    _stop(worker)


def _stop(worker: Any) -> None:
    hostname = getattr(worker, "hostname", None)
    hb = None if hostname is None else _nodes.pop(hostname, None)
    if hb is not None:
        hb.stop()
