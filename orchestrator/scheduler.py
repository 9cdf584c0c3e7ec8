"""Time in the orchestrator: schedules and the timers of parked steps.

Celery beat sends one small task, ``orchestrator.tick``, every ``ORCHESTRATOR_TICK_S``
seconds (the :class:`Scheduler` class installs it, so beat needs no schedule file).
A worker runs each tick; it

* wakes parked steps whose timer is due (a sleep, an approval or wait timeout): each
  timer is a member of one sorted set, and removing it is the claim, so a timer wakes
  its step once however many ticks run;
* fires schedules: each fire time is claimed with ``SET NX``, so two beat processes (or
  a tick delivered twice) still start exactly one run per fire time, and that run has
  the idempotency key ``schedule:<name>:<fire time>`` as a second guard.

Nothing about time is kept in a process: every beat, worker and Redis (with AOF) can
restart and the next tick picks up where the last one stopped.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from celery import Task, shared_task
from celery.beat import Scheduler as _BeatScheduler
from croniter import croniter

from .errors import OrchestratorError
from .health import BeatToucher
from .inputs import validate_inputs
from .model import ScheduleSpec
from .runtime import engine_for, start_run, wake_step
from .sweep import sweep

log = logging.getLogger("orchestrator.scheduler")

TICK_TASK = "orchestrator.tick"
#: A fire time this late (seconds) still counts as on time rather than missed.
GRACE_S = 60.0


def next_fire(spec: ScheduleSpec, after: float) -> float:
    """The first fire time strictly after ``after`` (epoch seconds), in the schedule's zone."""
    start = datetime.fromtimestamp(after, ZoneInfo(spec.timezone))
    return float(croniter(spec.cron, start).get_next(float))


def upcoming(spec: ScheduleSpec, count: int = 5, after: float | None = None) -> list[float]:
    """The next ``count`` fire times (for ``flows view``)."""
    start = datetime.fromtimestamp(after or time.time(), ZoneInfo(spec.timezone))
    it = croniter(spec.cron, start)
    return [float(it.get_next(float)) for _ in range(count)]


def due_fires(spec: ScheduleSpec, next_at: float, now: float) -> tuple[list[float], float]:
    """Which fire times to run now, and the next fire time to wait for.

    A fire time reached within ``GRACE_S`` is on time and runs. Older ones were missed
    (beat or every worker was down): ``catchup: skip`` drops them, ``catchup: once``
    runs one run (for the latest missed time) for all of them.
    """
    if now < next_at:
        return [], next_at
    times = [next_at]
    while len(times) < 1000 and (n := next_fire(spec, times[-1])) <= now:
        times.append(n)
    if len(times) == 1000:  # far behind: only the latest fire time can matter
        zone = ZoneInfo(spec.timezone)
        times = [float(croniter(spec.cron, datetime.fromtimestamp(now, zone)).get_prev(float))]
    on_time = [t for t in times if now - t <= GRACE_S]
    missed = [t for t in times if now - t > GRACE_S]
    fires = on_time
    if missed and spec.catchup == "once" and not on_time:
        fires = [missed[-1]]
    return fires, next_fire(spec, now)


class Scheduler(_BeatScheduler):
    """Celery beat's in-memory scheduler with the orchestrator's tick installed.

    ``orchestrator beat`` uses it; with plain Celery:
    ``celery -A orchestrator.worker beat -S orchestrator.scheduler:Scheduler``.
    """

    def setup_schedule(self) -> None:
        super().setup_schedule()
        settings = self.app.conf.orchestrator_settings
        self.merge_inplace(
            {
                TICK_TASK: {
                    "task": TICK_TASK,
                    "schedule": settings.tick_s,
                    # A tick nobody ran in time is worthless: the next one does its work.
                    "options": {
                        "expires": max(settings.tick_s * 5, 5.0),
                        "queue": settings.default_queue,
                        "ignore_result": True,
                    },
                }
            }
        )
        self._liveness = BeatToucher(settings.liveness_file)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One pass of beat's loop; also touches ORCHESTRATOR_LIVENESS_FILE when set."""
        interval = super().tick(*args, **kwargs)
        liveness = getattr(self, "_liveness", None)  # set up with the schedule
        if liveness is not None:
            liveness()
        return interval


@shared_task(
    name=TICK_TASK, bind=True, ignore_result=True, Request="orchestrator.recovery:TaskRequest"
)
def tick(self: Task) -> dict[str, int]:
    """Wake due timers, fire due schedules, sweep (see the module docstring)."""
    eng = engine_for(self.app)
    now = time.time()
    woken = 0
    for address in eng.store.due_timers(now):
        wake_step(self.app, eng.plan, address)
        woken += 1
    fired = fire_schedules(eng, now)
    swept = sweep(eng, self, now)
    return {"woken": woken, "fired": fired, **{k: v for k, v in swept.items() if v}}


def fire_schedules(eng: Any, now: float) -> int:
    """Start the runs of every schedule that is due; returns how many started."""
    store = eng.store
    fired = 0
    for name, raw in store.schedules().items():
        spec = ScheduleSpec.model_validate(raw)
        state = store.schedule_state(name)
        next_at = float(state.get("next") or next_fire(spec, now - 1))
        fires, following = due_fires(spec, next_at, now)
        if not fires and following == next_at:
            continue
        store.set_schedule_state(name, next=following)
        info = store.flow_info(spec.flow)
        if info is None or info.get("state") == "stopped":
            continue  # a stopped flow's schedule does not fire (and does not catch up)
        for fire in fires:
            if not store.claim_fire(name, fire):
                continue
            try:
                plan = eng.plan(spec.flow, info["version"])
                inputs = validate_inputs(plan.resource.spec.inputs, spec.inputs)
                run_id, _ = start_run(
                    store, eng.app, plan, inputs, idempotency_key=f"schedule:{name}:{int(fire)}"
                )
            except OrchestratorError as exc:
                log.error("schedule %s could not start %s: %s", name, spec.flow, exc)
                store.set_schedule_state(name, error=str(exc))
                continue
            store.set_schedule_state(name, last=fire, last_run=run_id)
            fired += 1
    return fired
