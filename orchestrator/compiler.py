"""From the flow model to Celery canvas.

A :class:`Plan` is the static shape of one flow version: every step as a node, the
block (step list) it sits in, what runs after it, and which steps its expressions
read. The plan is pure data derived from the model; workers cache it per version.

:func:`build_canvas` turns a stretch of the plan into canvas of the generic
``orchestrator.step`` task:

* a sequence becomes a ``chain``, cut every ``chain_segment`` steps: the last
  signature of a segment is marked ``tail`` and enqueues the next segment itself,
  so a message never carries the whole remaining flow (celery#1078, #5327);
* a flat parallel of at most ``native_chord_max`` leaf tasks becomes
  ``chord(group(branch chains), join)``;
* anything whose shape is known only at run time (a wider or nested parallel, a
  step group with ``when``, forEach, switch, try) becomes one signature that ends
  the chain: the worker that runs it publishes its children and counts their
  fan-in in Redis (see DESIGN.md, "Compilation").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature, _chain

from . import expressions
from .errors import NotFound
from .model import (
    MAX_DURATION_S,
    AnyStep,
    ApprovalStep,
    FlowResource,
    ForEachStep,
    HttpStep,
    ParallelStep,
    RetryPolicy,
    SequenceStep,
    ServiceStep,
    SleepStep,
    StepDefaults,
    SubflowStep,
    SwitchStep,
    TaskStep,
    TryStep,
    WaitStep,
    step_kind,
)
from .settings import Settings

STEP_TASK = "orchestrator.step"
#: Steps that do one call and end: laid out as plain canvas, never decided at run time.
LEAF_KINDS = frozenset({"task", "service", "http"})

#: Used where neither the step nor the flow's defaults name a retry policy.
DEFAULT_RETRY = RetryPolicy(
    max_attempts=1, backoff="exponential", initial_delay=1.0, max_delay=60.0, jitter=True
)


@dataclass
class Block:
    """An ordered list of steps: the top level, a sequence's body, a branch, a case."""

    id: str
    items: list[str]
    owner: str | None  # node id of the step that holds this block; None at flow level
    role: str  # top, body, branch, case, try, catch, finally, onFailure, compensate


@dataclass
class Node:
    """One step of a flow with everything the runtime needs to know about it statically."""

    id: str
    kind: str
    step: AnyStep
    block: Block
    pos: int
    foreach_depth: int  # how many forEach bodies enclose it (the length of its index path)
    options: dict[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=lambda: DEFAULT_RETRY)
    on_error: str = "fail"
    refs: set[str] = field(default_factory=set)
    static: bool = False  # may be laid out as plain canvas (no runtime decisions)
    #: Root names its own expressions read (``inputs``, ``item``, ...): a run's inputs or
    #: a forEach item can be large, so only steps that use them fetch them.
    names: set[str] = field(default_factory=set)
    foreach_owner: str | None = None  # innermost forEach whose body holds it (item, index)
    catch_owner: str | None = None  # innermost try whose catch holds it (error)

    @property
    def when(self) -> str | bool | None:
        return self.step.when

    @property
    def is_last(self) -> bool:
        return self.pos == len(self.block.items) - 1


class Plan:
    """The static structure of one flow version."""

    def __init__(self, resource: FlowResource, version: str, settings: Settings):
        self.resource = resource
        self.name = resource.metadata.name
        self.version = version
        self.settings = settings
        self.nodes: dict[str, Node] = {}
        self.blocks: dict[str, Block] = {}
        spec = resource.spec
        self.defaults = spec.defaults or StepDefaults()
        self.top = self._add_block("top", spec.steps, None, "top", 0)
        self.on_failure = (
            self._add_block("onFailure", spec.on_failure, None, "onFailure", 0)
            if spec.on_failure
            else None
        )
        self.output_refs = expressions.step_refs(spec.outputs)
        self.outputs_read_inputs = "inputs" in expressions.root_names(spec.outputs)
        self.compensable = {n.id for n in self.nodes.values() if n.step.compensate is not None}
        for node in self.nodes.values():
            node.static = self._is_static(node)

    # -- construction -------------------------------------------------------------------

    def _add_block(
        self, bid: str, steps: list[AnyStep], owner: str | None, role: str, depth: int
    ) -> Block:
        block = Block(bid, [s.id for s in steps], owner, role)
        self.blocks[bid] = block
        parent = self.nodes.get(owner) if owner else None
        foreach = parent.foreach_owner if parent else None
        catch = parent.catch_owner if parent else None
        if parent is not None and parent.kind == "forEach" and role == "body":
            foreach = parent.id
        if parent is not None and parent.kind == "try" and role == "catch":
            catch = parent.id
        for pos, step in enumerate(steps):
            node = self._new_node(step, block, pos, depth)
            node.foreach_owner, node.catch_owner = foreach, catch
            self._add_children(node)
        return block

    def _new_node(self, step: AnyStep, block: Block, pos: int, depth: int) -> Node:
        kind = step_kind(step)
        assert kind is not None
        node = Node(step.id, kind, step, block, pos, depth)
        node.options, node.retry = self._options(step)
        node.on_error = step.on_error or self.defaults.on_error or "fail"
        node.refs = _condition_refs(step.when)
        node.names = _names(step)
        self.nodes[step.id] = node
        return node

    def _add_children(self, node: Node) -> None:
        step, depth, sid = node.step, node.foreach_depth, node.id
        if isinstance(step, TaskStep | SubflowStep | ServiceStep):
            node.refs |= expressions.step_refs(step.with_)
        elif isinstance(step, HttpStep):
            node.refs |= expressions.step_refs(step.http.model_dump(by_alias=True))
        elif isinstance(step, ApprovalStep):
            node.refs |= expressions.step_refs(step.approval.model_dump(by_alias=True))
        elif isinstance(step, SleepStep | WaitStep):
            node.refs |= expressions.step_refs(
                step.until if isinstance(step, SleepStep) else step.wait.run
            )
        elif isinstance(step, SequenceStep):
            self._add_block(f"{sid}/body", step.steps, sid, "body", depth)
        elif isinstance(step, ParallelStep):
            for branch in step.parallel:
                self._add_block(f"{sid}/{branch.id}", [branch], sid, "branch", depth)
        elif isinstance(step, ForEachStep):
            node.refs |= expressions.step_refs(step.for_each)
            body = step.do if isinstance(step.do, list) else [step.do]
            self._add_block(f"{sid}/body", body, sid, "body", depth + 1)
        elif isinstance(step, SwitchStep):
            for i, case in enumerate(step.switch):
                node.refs |= _condition_refs(case.when)
                self._add_block(
                    f"{sid}/case{i}", case.steps or case.default or [], sid, "case", depth
                )
        elif isinstance(step, TryStep):
            for role, lst in (
                ("try", step.try_),
                ("catch", step.catch),
                ("finally", step.finally_),
            ):
                if lst:
                    self._add_block(f"{sid}/{role}", lst, sid, role, depth)
        if step.compensate is not None:
            self._add_block(f"{sid}/compensate", [step.compensate], sid, "compensate", depth)

    def _options(self, step: AnyStep) -> tuple[dict[str, Any], RetryPolicy]:
        d = self.defaults
        opts: dict[str, Any] = {
            "queue": step.queue or d.queue or self.settings.default_queue,
        }
        priority = step.priority if step.priority is not None else d.priority
        if priority is not None:
            opts["priority"] = priority
        timeout = step.timeout if step.timeout is not None else d.timeout
        timeout = timeout if timeout is not None else self.settings.default_step_timeout_s
        opts["soft_time_limit"] = timeout
        opts["time_limit"] = hard_time_limit(timeout)
        rate = step.rate_limit or d.rate_limit
        if rate:
            opts["rate_limit"] = rate
        merged = DEFAULT_RETRY.model_dump()
        for layer in (d.retry, step.retry):
            if layer is not None:
                merged.update(layer.model_dump(exclude_none=True))
        return opts, RetryPolicy(**merged)

    def _is_static(self, node: Node) -> bool:
        """Whether the node can be laid out as canvas without a decision at run time."""
        if node.kind in LEAF_KINDS:
            return True
        if node.step.when is not None:
            return False
        if node.kind == "sequence":
            return all(self._is_static(self.nodes[i]) for i in self.blocks[f"{node.id}/body"].items)
        if node.kind == "parallel":
            leaves = 0
            for branch in node.step.parallel:  # type: ignore[union-attr]
                for leaf in self._flat_tasks(self.nodes[branch.id]):
                    if leaf is None:
                        return False
                    leaves += 1
            return 0 < leaves <= self.settings.native_chord_max
        return False

    def _flat_tasks(self, node: Node):
        """The task leaves of a chain of tasks and plain sequences; None marks anything else."""
        if node.kind in LEAF_KINDS:
            yield node
        elif node.kind == "sequence" and node.step.when is None:
            for i in self.blocks[f"{node.id}/body"].items:
                yield from self._flat_tasks(self.nodes[i])
        else:
            yield None

    # -- navigation ---------------------------------------------------------------------

    def first(self, block: Block) -> Node:
        return self.nodes[block.items[0]]

    def successor(self, node: Node) -> Node | None:
        """The node that runs after ``node``, climbing out of sequences; None at a scope end."""
        n = node
        while True:
            if not n.is_last:
                return self.nodes[n.block.items[n.pos + 1]]
            owner = n.block.owner
            if owner is None or self.nodes[owner].kind != "sequence":
                return None
            n = self.nodes[owner]

    def scope_end(self, node: Node) -> tuple[Node, Block]:
        """The outermost node reached by climbing sequences from ``node``, and its block."""
        n = node
        while (
            n.is_last
            and n.block.owner is not None
            and self.nodes[n.block.owner].kind == ("sequence")
        ):
            n = self.nodes[n.block.owner]
        return n, n.block

    def completed_sequences(self, node: Node) -> list[Node]:
        """Sequences that end when ``node`` ends (it is the last step of each)."""
        done = []
        n = node
        while n.is_last and n.block.owner is not None:
            owner = self.nodes[n.block.owner]
            if owner.kind != "sequence":
                break
            done.append(owner)
            n = owner
        return done

    def is_final(self, node: Node) -> bool:
        """Whether the run ends when this node ends (it closes the top-level block)."""
        end, block = self.scope_end(node)
        return block.role == "top" and end.is_last

    def descendants(self, node: Node) -> list[Node]:
        """Nodes statically inside ``node`` (not inside a forEach body, which has no index)."""
        out = []
        for block in self.blocks.values():
            if block.owner == node.id and block.role != "compensate":
                for i in block.items:
                    child = self.nodes[i]
                    if child.foreach_depth == node.foreach_depth:
                        out.append(child)
                        out.extend(self.descendants(child))
        return out

    @cached_property
    def order(self) -> list[str]:
        """Step ids in document order (for display)."""
        return list(self.nodes)


class PlanCache:
    """Plans by flow version. A version never changes, so an entry never goes stale.

    ``load(flow, version)`` returns the stored definition document, or None.
    """

    def __init__(self, settings: Settings, load: Callable[[str, str], dict[str, Any] | None]):
        self.settings, self.load = settings, load
        self._plans: dict[tuple[str, str], Plan] = {}

    def get(self, flow: str, version: str) -> Plan:
        """The plan of ``flow`` at ``version``; NotFound if that version was never deployed."""
        plan = self._plans.get((flow, version))
        if plan is None:
            doc = self.load(flow, version)
            if doc is None:
                raise NotFound(f"flow {flow!r} has no version {version}")
            plan = Plan(FlowResource.model_validate(doc), version, self.settings)
            self._plans[(flow, version)] = plan
        return plan


def _names(step: AnyStep) -> set[str]:
    """Root names read by a step's own expressions (not those of the steps inside it)."""
    own = step.model_dump(
        by_alias=True,
        exclude={"steps", "parallel", "do", "switch", "try_", "catch", "finally_", "compensate"},
    )
    names = expressions.root_names(own)
    for when in [step.when, *(c.when for c in getattr(step, "switch", []) or [])]:
        if isinstance(when, str):
            names |= expressions.parse_condition(when).names()
    if isinstance(step, ForEachStep):
        names |= expressions.parse_condition(step.for_each).names()
    return names


def _condition_refs(when: str | bool | None) -> set[str]:
    return set() if when is None else expressions.parse_condition(when).step_refs()


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


def node_key(node_id: str, path: tuple[int, ...] | list[int] = ()) -> str:
    """How a step instance is recorded: ``id`` at top level, ``id[i][j]`` inside forEach."""
    return node_id + "".join(f"[{i}]" for i in path)


# -- canvas ----------------------------------------------------------------------------


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
        return self.app.signature(
            STEP_TASK,
            args=(self.run_id, self.plan.name, self.plan.version, node.id, list(path), tail),
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
            leaves = list(self.plan._flat_tasks(self.plan.nodes[branch.id]))
            sigs = [self.signature(leaf, path, tail=False) for leaf in leaves]
            branches.append(sigs[0] if len(sigs) == 1 else chain(*sigs))
        return chord(group(branches), self.signature(node, path, tail=False, join=True))


def _mark_tail(sig: Signature) -> None:
    """Flag the signature that ends a canvas: its worker continues the run itself."""
    target = sig.body if isinstance(sig, chord) else sig
    args = list(target.args)
    args[-1] = True
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
    _run, _flow, _ver, step_id, path, tail = sig.args
    opts = {k: v for k, v in sig.options.items() if k not in ("shadow",)}
    return {"task": sig.task, "step": node_key(step_id, path), "tail": tail, "options": opts}


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
