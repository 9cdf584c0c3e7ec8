"""Build flows in Python: ``a >> b`` is a sequence, ``a & b`` (or ``[a, b]``) runs at once.

The DSL produces the same :class:`~orchestrator.model.FlowResource` a YAML document
does, and a flow serialises to YAML and back; there is no second model.
"""

from __future__ import annotations

from typing import Any

import yaml

from .loader import load_string
from .model import (
    AnyStep,
    FlowResource,
    ForEachStep,
    Metadata,
    ParallelStep,
    SequenceStep,
    SwitchCase,
    SwitchStep,
    TaskStep,
    TryStep,
)

_ALIASES = {"on_error": "onError", "rate_limit": "rateLimit", "with_": "with"}


class Node:
    """Something that can be composed: a step, a chain or a parallel block."""

    def __rshift__(self, other: Node | list) -> Chain:
        return Chain([*self._chain_items(), *_as_node(other)._chain_items()])

    def __rrshift__(self, other: list) -> Chain:
        return _as_node(other) >> self

    def __and__(self, other: Node | list) -> Par:
        return Par([*self._par_items(), *_as_node(other)._par_items()])

    def _chain_items(self) -> list[Node]:
        return [self]

    def _par_items(self) -> list[Node]:
        return [self]


class StepNode(Node):
    """One step of the model, wrapped so it composes with ``>>`` and ``&``."""

    def __init__(self, model: AnyStep):
        self.model = model

    @property
    def id(self) -> str:
        return self.model.id


class Chain(Node):
    def __init__(self, items: list[Node]):
        self.items = items

    def _chain_items(self) -> list[Node]:
        return list(self.items)


class Par(Node):
    def __init__(self, branches: list[Node], id: str | None = None):
        self.branches, self.id = branches, id

    def _par_items(self) -> list[Node]:
        return list(self.branches) if self.id is None else [self]


def _as_node(value: Any) -> Node:
    if isinstance(value, Node):
        return value
    if isinstance(value, list | tuple):
        return Par([_as_node(v) for v in value])
    raise TypeError(f"cannot compose {value!r}: expected a step, a chain or a list of steps")


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, Node):
            v = _to_step(v, _Ids())
        out[_ALIASES.get(k, k)] = v
    return out


def step(id: str, task: Any, args: dict[str, Any] | None = None, **options: Any) -> StepNode:
    """A task step; ``task`` is a Celery task name or task object, ``args`` the YAML ``with``.

    Other SPEC §3 fields are keyword arguments in snake_case: ``when``, ``on_error``,
    ``compensate`` (another step), ``queue``, ``priority``, ``retry``, ``timeout``,
    ``rate_limit``.
    """
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"step {id!r}: task must be a task name or a Celery task, got {task!r}")
    return StepNode(
        TaskStep.model_validate({"id": id, "task": name, "with": args or {}, **_options(options)})
    )


def parallel(id: str, *branches: Node, **options: Any) -> StepNode:
    """A parallel step with an id of your choosing (``a & b`` names it for you)."""
    ids = _Ids()
    return StepNode(
        ParallelStep.model_validate(
            {"id": id, "parallel": [_to_step(b, ids) for b in branches], **_options(options)}
        )
    )


def sequence(id: str, *steps: Node, **options: Any) -> StepNode:
    """A named nested sequence (a chain inside a parallel branch gets one automatically)."""
    ids = _Ids()
    return StepNode(
        SequenceStep.model_validate(
            {"id": id, "steps": [s for n in steps for s in _to_steps(n, ids)], **_options(options)}
        )
    )


def for_each(
    id: str, items: str, do: Node, concurrency: int | None = None, **options: Any
) -> StepNode:
    """Run ``do`` for each item of the list the expression ``items`` gives at run time."""
    ids = _Ids()
    return StepNode(
        ForEachStep.model_validate(
            {
                "id": id,
                "forEach": items,
                "do": _to_steps(do, ids),
                "concurrency": concurrency,
                **_options(options),
            }
        )
    )


def switch(
    id: str, cases: list[tuple[str, Node]], default: Node | None = None, **options: Any
) -> StepNode:
    """The first case whose condition holds runs."""
    ids = _Ids()
    items = [SwitchCase(when=w, steps=_to_steps(n, ids)) for w, n in cases]
    if default is not None:
        items.append(SwitchCase(default=_to_steps(default, ids)))
    return StepNode(SwitchStep(id=id, switch=items, **_options(options)))


def try_(
    id: str, body: Node, catch: Node | None = None, finally_: Node | None = None, **options: Any
) -> StepNode:
    """An error boundary."""
    ids = _Ids()
    return StepNode(
        TryStep.model_validate(
            {
                "id": id,
                "try": _to_steps(body, ids),
                "catch": _to_steps(catch, ids) if catch is not None else None,
                "finally": _to_steps(finally_, ids) if finally_ is not None else None,
                **_options(options),
            }
        )
    )


class _Ids:
    """Names for the parallel and sequence steps that ``&`` and ``>>`` create."""

    def __init__(self) -> None:
        self.n = 0

    def next(self, kind: str, members: list[AnyStep]) -> str:
        self.n += 1
        return f"{kind}-{'-'.join(m.id for m in members[:2])}"[:90] + (
            f"-{self.n}" if len(members) > 2 else ""
        )


def _to_steps(node: Node, ids: _Ids) -> list[AnyStep]:
    node = _as_node(node)
    if isinstance(node, Chain):
        return [s for item in node.items for s in _to_steps(item, ids)]
    return [_to_step(node, ids)]


def _to_step(node: Node, ids: _Ids) -> AnyStep:
    node = _as_node(node)
    if isinstance(node, StepNode):
        return node.model
    if isinstance(node, Par):
        branches = [_to_step(b, ids) for b in node.branches]
        return ParallelStep(id=node.id or ids.next("parallel", branches), parallel=branches)
    steps = _to_steps(node, ids)
    if len(steps) == 1:
        return steps[0]
    return SequenceStep(id=ids.next("sequence", steps), steps=steps)


class Flow:
    """A flow built in Python; ``resource`` is the same model a YAML document gives."""

    def __init__(
        self,
        name: str,
        steps: Node | list | None = None,
        *,
        inputs: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        initial_state: str | None = None,
        description: str | None = None,
        defaults: dict[str, Any] | None = None,
        on_failure: Node | None = None,
        resource: FlowResource | None = None,
    ):
        if resource is None:
            if steps is None:
                raise TypeError("Flow needs steps")
            ids = _Ids()
            spec: dict[str, Any] = {"steps": _to_steps(_as_node(steps), ids)}
            for key, value in (
                ("inputs", inputs),
                ("outputs", outputs),
                ("initialState", initial_state),
                ("description", description),
                ("defaults", defaults),
            ):
                if value is not None:
                    spec[key] = value
            if on_failure is not None:
                spec["onFailure"] = _to_steps(on_failure, ids)
            resource = FlowResource(metadata=Metadata(name=name), spec=spec)
        self.resource = resource

    @property
    def name(self) -> str:
        return self.resource.metadata.name

    def to_dict(self) -> dict[str, Any]:
        return self.resource.document()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> Flow:
        """The one Flow document in ``text`` (validated like any deployed definition)."""
        flows = [lr.resource for lr in load_string(text) if isinstance(lr.resource, FlowResource)]
        if len(flows) != 1:
            raise ValueError(f"expected one Flow document, found {len(flows)}")
        return cls(flows[0].name, resource=flows[0])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flow) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Flow({self.name!r})"
