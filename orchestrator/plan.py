"""The static shape of one flow version, and where a step instance lives.

A :class:`Plan` holds every step as a node, the block (step list) it sits in, what runs
after it, and which steps its expressions read. It is pure data derived from the model;
workers cache it per version (:class:`PlanCache`). The compiler lays a plan out as
Celery canvas; the runtime walks it to decide what runs next.

A :class:`StepAddress` names one step instance of one run. Its wire forms are
positional and must stay as they are (messages, timers and watchers written by an older
release are read by a newer one during a rolling deploy):

* a step message's arguments: ``(run, flow, version, step, path, tail)``;
* a timer (``Ptimers``) or watcher (``P{R}:watchers``) entry: the JSON list
  ``[run, flow, version, step, path]``;
* a child run's ``parent`` field: ``{"run", "flow", "version", "step", "path", "depth"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from . import expressions
from .errors import NotFound
from .model import (
    AnyStep,
    ApprovalStep,
    FlowResource,
    ForEachStep,
    HttpStep,
    RetryPolicy,
    ServiceStep,
    SleepStep,
    StepDefaults,
    SubflowStep,
    SwitchStep,
    TaskStep,
    WaitStep,
    child_blocks,
    step_kind,
)
from .policy import DEFAULT_RETRY, hard_time_limit, merged_retry
from .settings import Settings

#: Steps that do one call and end: laid out as plain canvas, never decided at run time.
LEAF_KINDS = frozenset({"task", "service", "http"})


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
        elif isinstance(step, ForEachStep):
            node.refs |= expressions.step_refs(step.for_each)
        elif isinstance(step, SwitchStep):
            for case in step.switch:
                node.refs |= _condition_refs(case.when)
        cases = 0
        for key, steps in child_blocks(step):
            if key == "parallel":
                for branch in steps:
                    self._add_block(f"{sid}/{branch.id}", [branch], sid, "branch", depth)
            elif key == "switch":
                self._add_block(f"{sid}/case{cases}", steps, sid, "case", depth)
                cases += 1
            elif key in ("steps", "do"):
                body_depth = depth + 1 if key == "do" else depth
                self._add_block(f"{sid}/body", steps, sid, "body", body_depth)
            else:  # try, catch, finally, compensate: the block is named for its key
                self._add_block(f"{sid}/{key}", steps, sid, key, depth)

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
        return opts, merged_retry(d.retry, step.retry)

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
                for leaf in self.flat_tasks(self.nodes[branch.id]):
                    if leaf is None:
                        return False
                    leaves += 1
            return 0 < leaves <= self.settings.native_chord_max
        return False

    def flat_tasks(self, node: Node) -> Iterator[Node | None]:
        """The task leaves of a chain of tasks and plain sequences; None marks anything else."""
        if node.kind in LEAF_KINDS:
            yield node
        elif node.kind == "sequence" and node.step.when is None:
            for i in self.blocks[f"{node.id}/body"].items:
                yield from self.flat_tasks(self.nodes[i])
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


def node_key(node_id: str, path: tuple[int, ...] | list[int] = ()) -> str:
    """How a step instance is recorded: ``id`` at top level, ``id[i][j]`` inside forEach."""
    return node_id + "".join(f"[{i}]" for i in path)


def parse_key(key: str) -> tuple[str, tuple[int, ...]]:
    """``load[3][1]`` -> (``load``, (3, 1)): the inverse of :func:`node_key`."""
    node_id, _, rest = key.partition("[")
    path = tuple(int(i) for i in rest.rstrip("]").split("][")) if rest else ()
    return node_id, path


#: Where ``tail`` sits in a step message's arguments (after the address).
TAIL_ARG = 5


class StepAddress(NamedTuple):
    """One step instance of one run: its run, flow version, step id and forEach path.

    A tuple in the order of the wire forms (see the module docstring), so a timer or
    watcher entry is the address itself and ``json.dumps`` writes the same list.
    """

    run: str
    flow: str
    version: str
    step: str
    path: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """The step instance's key in the run hash (``id`` or ``id[i][j]``)."""
        return node_key(self.step, self.path)

    def message_args(self, tail: bool) -> tuple[str, str, str, str, list[int], bool]:
        """The positional arguments of the ``orchestrator.step`` message for this step."""
        return (self.run, self.flow, self.version, self.step, list(self.path), tail)

    @classmethod
    def from_message_args(cls, args: Sequence[Any]) -> StepAddress:
        """The address a step message's arguments carry (``tail`` is ``args[TAIL_ARG]``)."""
        return cls(args[0], args[1], args[2], args[3], tuple(args[4]))

    @classmethod
    def from_entry(cls, entry: Sequence[Any]) -> StepAddress:
        """The address of a timer or watcher entry (a JSON list)."""
        run, flow, version, step, path = entry
        return cls(run, flow, version, step, tuple(path))

    def parent(self, depth: int) -> dict[str, Any]:
        """This step as the ``parent`` of the child run it starts, ``depth`` runs deep."""
        return {
            "run": self.run,
            "flow": self.flow,
            "version": self.version,
            "step": self.step,
            "path": list(self.path),
            "depth": depth,
        }

    @classmethod
    def from_parent(cls, parent: dict[str, Any]) -> StepAddress:
        """The subflow step that a child run's ``parent`` field names."""
        return cls(
            parent["run"], parent["flow"], parent["version"], parent["step"], tuple(parent["path"])
        )
