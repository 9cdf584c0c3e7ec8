"""The saga phase of a failed run: each compensable step that succeeded is undone by its
``compensate`` block, in reverse order of completion, then the flow's ``onFailure`` runs;
the run ends ``compensated`` when every compensation succeeded, else ``failed``.

Runs already stored name this phase ``recovery``: the step message's ``phase`` and the
run hash's ``recovery`` field (the order of compensations) keep that name."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import redis

from ..plan import node_key

if TYPE_CHECKING:
    from .host import Host
else:
    Host = object  # the mixins' typed base while type checking (.host)


class CompensationMixin(Host):
    """:class:`~.execution.Execution`'s compensation phase: start, next step, end."""

    phase: str | None  # set here when the phase begins (declared for the type checker)

    def _start_compensation(self, error: dict[str, Any]) -> None:
        """The run failed: enter the saga phase (once per run) and undo its first step."""
        done = self.store.begin_recovery(
            self.run_id, error, self._event("run.failing", key="", error=error)
        )
        if done is None:
            return
        order = [json.loads(e) for e in reversed(done)]  # undo in reverse completion order
        self.store.set_fields(self.run_id, {"recovery": order})
        self.phase = "recovery"
        self._compensation_step(order, 0)

    def _compensation_step(self, order: list, i: int) -> None:
        """Publish the ``i``-th compensation, then ``onFailure``, then end the run."""
        self.phase = "recovery"
        if i < len(order):
            step_id, path = order[i]
            comp = self.plan.first(self.plan.blocks[f"{step_id}/compensate"])
            self.rindex = i
            self._publish([self._builder().from_node(comp, tuple(path))])
        elif self.plan.on_failure is not None and self.node.block.role != "onFailure":
            self.rindex = len(order)
            self._publish([self._builder().from_node(self.plan.first(self.plan.on_failure))])
        else:
            self._end_compensation(order)

    def _end_compensation(self, order: list) -> None:
        """End the run: ``compensated`` when every compensation succeeded, else ``failed``."""
        keys = [
            node_key(self.plan.first(self.plan.blocks[f"{sid}/compensate"]).id, tuple(p))
            for sid, p in order
        ]
        raw = self.store.read_fields(self.run_id, [f"s:{k}" for k in keys]) if keys else []
        ok = bool(keys) and all(r and json.loads(r).get("status") == "succeeded" for r in raw)
        status = "compensated" if ok else "failed"
        try:
            self.store.move_run(
                self.run_id,
                ("running", "pending", "waiting"),
                status,
                self._event(f"run.{status}", key=""),
                {"finished_at": time.time()},
            )
        except redis.ResponseError:
            return  # cancelled meanwhile
        self._notify_parent()

    def _compensation_order(self) -> list:
        """The compensations to run, as :meth:`_start_compensation` stored them."""
        raw = self.store.read_fields(self.run_id, ["recovery"])[0]
        return json.loads(raw) if raw else []
