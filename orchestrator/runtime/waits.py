"""Durable waits (``sleep``, ``wait``, ``approval``): park the step and free the worker;
a signal, a decision, a watched run's end or the timer tick wakes it (:meth:`WaitsMixin.wake`),
and it ends when its wait is over."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

from .. import expressions
from ..errors import ExpressionError
from ..status import ENDED
from .engine import PermanentError

if TYPE_CHECKING:
    from .host import Host
else:
    Host = object  # the mixins' typed base while type checking (.host)


class WaitsMixin(Host):
    """:class:`~.execution.Execution`'s wait steps: park, wake, escalate, a run's outcome."""

    def _park(self, wait: dict[str, Any], ctx: dict[str, Any]) -> None:
        """Mark the step waiting; a signal, decision, watched run or the timer tick wakes it."""
        rec = self._running_record()
        rec["status"] = "waiting"
        event = self._event(
            "step.waiting", wait={k: v for k, v in wait.items() if k not in ("kind",)}
        )
        verdict, payload = self.store.park(self.run_id, self.key, rec, wait, event, self.address)
        if verdict == "signalled":  # the signal came first and was kept for this wait
            self._finish("succeeded", payload, ctx)

    def _run_sleep(self) -> None:
        if not self._gate():
            return
        step, ctx = self.node.step, self._context()
        now = time.time()
        try:
            if step.sleep is not None:  # type: ignore[union-attr]
                due = now + step.sleep  # type: ignore[union-attr]
            else:
                due = to_epoch(expressions.render(step.until, ctx))  # type: ignore[union-attr]
        except (ExpressionError, ValueError) as exc:
            self._failed(PermanentError(f"until: {exc}"), None, ctx)
            return
        if due <= now:
            self._finish("succeeded", {"until": iso(due)}, ctx)
            return
        self._park({"kind": "sleep", "deadline": due}, ctx)

    def _run_wait(self) -> None:
        if not self._gate():
            return
        spec, ctx = self.node.step.wait, self._context()  # type: ignore[union-attr]
        deadline = time.time() + spec.timeout if spec.timeout is not None else None
        if spec.signal is not None:
            self._park({"kind": "signal", "signal": spec.signal, "deadline": deadline}, ctx)
            return
        try:
            target = str(expressions.render(spec.run, ctx))
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        wait = {
            "kind": "run",
            "run": target,
            "flow": spec.flow,
            "status": spec.status,
            "deadline": deadline,
        }
        outcome = self._run_outcome(wait)
        if outcome is not None:
            self._conclude(outcome, ctx)
            return
        self._park(wait, ctx)
        self.store.add_watcher(target, self.address)
        if self._run_outcome(wait) is not None:  # it ended while we registered: wake now
            self.wake()

    def _run_approval(self) -> None:
        if not self._gate():
            return
        spec, ctx = self.node.step.approval, self._context()  # type: ignore[union-attr]
        try:
            approvers = [str(a) for a in expressions.render(spec.approvers, ctx)]
            escalate = [str(a) for a in expressions.render(spec.escalate_to or [], ctx)]
            message = expressions.render(spec.message, ctx) if spec.message else None
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        deadline = time.time() + spec.timeout if spec.timeout is not None else None
        self._park(
            {
                "kind": "approval",
                "approvers": approvers,
                "escalateTo": escalate,
                "onTimeout": spec.on_timeout,
                "timeout": spec.timeout,
                "deadline": deadline,
                "message": message,
            },
            ctx,
        )

    def wake(self) -> None:
        """Something woke a parked step: end it if its wait is over, else leave it parked."""
        raw, decision, payload = self.store.read_fields(
            self.run_id, [f"w:{self.key}", f"d:{self.key}", f"sp:{self.key}"]
        )
        if raw is None:
            return  # not waiting (already resumed, or the run moved on)
        wait = json.loads(raw)
        now = time.time()
        due = wait.get("deadline")
        expired = due is not None and now >= due - 0.001
        kind = wait["kind"]
        outcome: tuple[str, Any] | None = None
        if kind == "sleep":
            outcome = ("succeeded", {"until": iso(due)}) if expired else None
        elif kind == "signal":
            if payload is not None:
                outcome = ("succeeded", json.loads(payload))
            elif expired:
                outcome = ("timeout", f"signal {wait['signal']!r} did not arrive in time")
        elif kind == "run":
            outcome = self._run_outcome(wait)
            if outcome is None and expired:
                outcome = ("timeout", f"run {wait['run']} did not reach {wait['status']} in time")
        elif kind == "approval":
            if decision is not None:
                outcome = ("succeeded", json.loads(decision))
            elif expired:
                if wait["onTimeout"] == "escalate" and not wait.get("escalated"):
                    self._escalate(wait, now)
                    return
                verdict = "approved" if wait["onTimeout"] == "approve" else "rejected"
                outcome = (
                    "succeeded",
                    {
                        "decision": verdict,
                        "by": None,
                        "comment": "no decision before the timeout",
                        "at": iso(now),
                        "timedOut": True,
                    },
                )
        if outcome is None:
            if due is not None and not expired:  # woken early: keep the timer
                self.store.add_timer(self.address, due)
            return
        if not self.store.unpark(self.run_id, self.key):
            return  # someone else resumed it
        self._read(
            [
                *self._fields(self.node.refs, self.tail and self.plan.is_final(self.node)),
                f"s:{self.key}",
            ]
        )
        self._adopt()
        self._conclude(outcome, self._context())

    def _conclude(self, outcome: tuple[str, Any], ctx: dict[str, Any]) -> None:
        status, value = outcome
        if status == "succeeded":
            self._finish("succeeded", value, ctx)
        else:
            self._failed(
                PermanentError(value),
                None,
                ctx,
                error_type="Timeout" if status == "timeout" else "WaitFailed",
            )

    def _run_outcome(self, wait: dict[str, Any]) -> tuple[str, Any] | None:
        """How a wait on another run ends now, or None while that run goes on."""
        flow, status, outputs = self.store.read_fields(wait["run"], ["flow", "status", "outputs"])
        if status is None:
            return ("failed", f"run {wait['run']} does not exist")
        if wait.get("flow") and flow != wait["flow"]:
            return ("failed", f"run {wait['run']} is a run of {flow}, not {wait['flow']}")
        if status == wait["status"]:
            return (
                "succeeded",
                {
                    "run": wait["run"],
                    "status": status,
                    "outputs": json.loads(outputs) if outputs else None,
                },
            )
        if status in ENDED:
            return ("failed", f"run {wait['run']} ended {status}, not {wait['status']}")
        return None

    def _escalate(self, wait: dict[str, Any], now: float) -> None:
        """No decision in time: the escalation approvers take over and the wait goes on."""
        wait.update(
            approvers=wait["escalateTo"], escalated=True, deadline=now + (wait.get("timeout") or 0)
        )
        self.store.set_fields(self.run_id, {f"w:{self.key}": wait})
        self.store.complete_step(
            self.run_id,
            [],
            [self._event("step.escalated", approvers=wait["approvers"])],
            recovery=self.compensating,
        )
        self.store.add_timer(self.address, wait["deadline"])


def to_epoch(value: Any) -> float:
    """A time given as epoch seconds or ISO 8601 (UTC when it names no zone)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a time, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return when.timestamp()
    raise ValueError(f"expected a time (ISO 8601 or epoch seconds), got {value!r}")


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in UTC, as waits and their outputs show times."""
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()
