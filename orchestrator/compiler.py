"""From a plan to Celery canvas.

:class:`CanvasBuilder` lays out a stretch of a :class:`~orchestrator.plan.Plan` as
canvas of the generic ``orchestrator.step`` task:

* a sequence becomes a ``chain``, cut every ``chain_segment`` steps: the last
  signature of a segment is marked ``tail`` and enqueues the next segment itself,
  so a message never carries the whole remaining flow (celery#1078, #5327);
* a flat parallel of at most ``native_chord_max`` leaf tasks becomes
  ``chord(group(branch chains), join)``;
* anything whose shape is known only at run time (a wider or nested parallel, a
  step group with ``when``, forEach, switch, try) becomes one signature that ends
  the chain: the worker that runs it publishes its children and counts their
  fan-in in Redis (see DESIGN.md, "Compilation").

The plan and the retry policy live in :mod:`.plan` and :mod:`.policy` (no Celery
there); their names stay importable from here for code written against this module.
"""

from __future__ import annotations

from typing import Any, cast

from celery import Celery, chain, chord, group
from celery.canvas import Signature, _chain

from .plan import (
    LEAF_KINDS,
    TAIL_ARG,
    Block,
    Node,
    Plan,
    PlanCache,
    StepAddress,
    node_key,
)
from .policy import DEFAULT_RETRY, hard_time_limit, retry_countdown

STEP_TASK = "orchestrator.step"

__all__ = [
    "DEFAULT_RETRY",
    "LEAF_KINDS",
    "STEP_TASK",
    "Block",
    "CanvasBuilder",
    "Node",
    "Plan",
    "PlanCache",
    "StepAddress",
    "canvas_tree",
    "describe",
    "hard_time_limit",
    "node_key",
    "render_canvas",
    "retry_countdown",
]


class CanvasBuilder:
    """Lays out a stretch of a plan as Celery canvas for one run."""

    def __init__(self, app: Celery, plan: Plan, run_id: str, kwargs: dict[str, Any] | None = None):
        self.app, self.plan, self.run_id = app, plan, run_id
        self.kwargs = kwargs or {}  # e.g. the recovery phase, carried by every signature

    def signature(
        self, node: Node, path: tuple[int, ...], tail: bool, join: bool = False
    ) -> Signature:
        opts = {k: v for k, v in node.options.items() if k != "rate_limit"}
        opts["shadow"] = f"{self.plan.name}.{node_key(node.id, path)}"
        # No step keeps a Celery result: outputs live in run state. Chord members report
        # to the chord all the same (the backend's on_chord_part_return runs whether or not
        # the result is stored), and the producer subscribes to no result channel.
        opts["ignore_result"] = True
        kwargs = dict(self.kwargs)
        if join:  # said in the message: the worker may be configured differently
            kwargs["join"] = True
        address = StepAddress(self.run_id, self.plan.name, self.plan.version, node.id, path)
        return self.app.signature(
            STEP_TASK,
            args=address.message_args(tail),
            kwargs=kwargs,
            immutable=True,
            **opts,
        )

    def from_node(self, start: Node, path: tuple[int, ...] = ()) -> Signature:
        """Canvas running ``start`` and what follows it in its scope, up to one segment."""
        limit = self.plan.settings.chain_segment
        parts: list[Signature] = []
        count = 0
        node: Node | None = start
        while node is not None:
            if node.kind == "sequence" and node.step.when is None:
                node = self.plan.first(self.plan.blocks[f"{node.id}/body"])
                continue
            if node.kind == "parallel" and node.static:
                parts.append(self._chord(node, path))
                count += 1 + len(node.step.parallel)  # type: ignore[union-attr]
            elif node.kind in LEAF_KINDS:
                parts.append(self.signature(node, path, tail=False))
                count += 1
            else:  # decided at run time: its worker publishes what comes next
                parts.append(self.signature(node, path, tail=True))
                break
            nxt = self.plan.successor(node)
            if nxt is None or count >= limit:
                _mark_tail(parts[-1])
                break
            node = nxt
        return parts[0] if len(parts) == 1 else chain(*parts)

    def _chord(self, node: Node, path: tuple[int, ...]) -> Signature:
        branches = []
        for branch in node.step.parallel:  # type: ignore[union-attr]
            # a static parallel: every leaf is a task (Plan._is_static), none is None
            leaves = cast(list[Node], list(self.plan.flat_tasks(self.plan.nodes[branch.id])))
            sigs = [self.signature(leaf, path, tail=False) for leaf in leaves]
            branches.append(sigs[0] if len(sigs) == 1 else chain(*sigs))
        return chord(group(branches), self.signature(node, path, tail=False, join=True))


def _mark_tail(sig: Signature) -> None:
    """Flag the signature that ends a canvas: its worker continues the run itself."""
    target = sig.body if isinstance(sig, chord) else sig
    args = list(target.args)
    args[TAIL_ARG] = True
    target.args = tuple(args)


def describe(plan: Plan, app: Celery) -> dict[str, Any]:
    """The canvas a new run would start with and every step's task options (for ``compile``)."""
    canvas = CanvasBuilder(app, plan, "<run-id>").from_node(plan.first(plan.top))
    steps = {}
    for node in plan.nodes.values():
        r = node.retry
        entry: dict[str, Any] = {"kind": node.kind, **node.options, "static": node.static}
        if node.kind == "task":
            entry["task"] = node.step.task  # type: ignore[union-attr]
        elif node.kind == "service":
            entry["service"] = node.step.service  # type: ignore[union-attr]
        elif node.kind == "http":
            http = node.step.http  # type: ignore[union-attr]
            entry["http"] = f"{http.method} {http.url}"
        entry["max_retries"] = (r.max_attempts or 1) - 1
        entry["countdown"] = {
            "backoff": r.backoff,
            "initial": r.initial_delay,
            "max": r.max_delay,
            "jitter": r.jitter,
        }
        entry["on_error"] = node.on_error
        if node.when is not None:
            entry["when"] = node.when
        steps[node.id] = entry
    return {
        "flow": plan.name,
        "version": plan.version,
        "canvas": canvas_tree(canvas),
        "steps": steps,
    }


def canvas_tree(sig: Signature) -> Any:
    """A JSON-able view of a canvas: chains, groups and chords with each signature's options."""
    if isinstance(sig, chord):
        return {
            "chord": {"header": [canvas_tree(s) for s in sig.tasks], "body": canvas_tree(sig.body)}
        }
    if isinstance(sig, _chain):  # chain(...) builds a _chain, not a chain instance
        return {"chain": [canvas_tree(s) for s in sig.tasks]}
    if isinstance(sig, group):
        return {"group": [canvas_tree(s) for s in sig.tasks]}
    address, tail = StepAddress.from_message_args(sig.args), sig.args[TAIL_ARG]
    opts = {k: v for k, v in sig.options.items() if k not in ("shadow",)}
    return {"task": sig.task, "step": address.key, "tail": tail, "options": opts}


def render_canvas(tree: Any, indent: int = 0) -> str:
    """Canvas as indented text, in Celery's own words."""
    pad = "  " * indent
    if "chain" in tree:
        return "\n".join(
            [f"{pad}chain("] + [render_canvas(t, indent + 1) for t in tree["chain"]] + [f"{pad})"]
        )
    if "group" in tree:
        return "\n".join(
            [f"{pad}group("] + [render_canvas(t, indent + 1) for t in tree["group"]] + [f"{pad})"]
        )
    if "chord" in tree:
        c = tree["chord"]
        return "\n".join(
            [f"{pad}chord(", f"{pad}  group("]
            + [render_canvas(t, indent + 2) for t in c["header"]]
            + [f"{pad}  ),", render_canvas(c["body"], indent + 1), f"{pad})"]
        )
    opts = ", ".join(f"{k}={v!r}" for k, v in tree["options"].items())
    tail = " [tail: continues the run]" if tree["tail"] else ""
    return f"{pad}{tree['task']}.si({tree['step']!r}; {opts}){tail}"
