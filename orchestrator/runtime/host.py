"""What the mixins of :class:`~.execution.Execution` (:mod:`.kinds`, :mod:`.waits`,
:mod:`.compensation`, :mod:`.ratelimit`) use of it, for the type checker only.

The mixins derive from :class:`Host` while type checking (at run time they derive from
``object``, so ``Execution``'s MRO is unchanged); ``Execution`` implements every member,
which mypy checks where it is instantiated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from celery import Task

    from ..compiler import CanvasBuilder
    from ..plan import Node, Plan, StepAddress
    from ..store import RedisStore
    from .engine import Engine


class Host(Protocol):
    """The state and steps of one execution that its mixins' handlers rely on."""

    eng: Engine
    store: RedisStore
    task: Task
    plan: Plan
    node: Node
    run_id: str
    path: tuple[int, ...]
    tail: bool
    key: str
    deferred: int
    phase: str | None
    rindex: int
    join: bool
    attempt: int
    task_id: str
    worker: str

    @property
    def compensating(self) -> bool: ...

    @property
    def address(self) -> StepAddress: ...

    def _kwargs(self) -> dict[str, Any]: ...

    def _builder(self) -> CanvasBuilder: ...

    def _fields(self, refs: set[str], final: bool) -> list[str]: ...

    def _read(self, fields: list[str]) -> None: ...

    def _begin(self, mark: bool, fields: list[str]) -> str: ...

    def _context(self) -> dict[str, Any]: ...

    def _running_record(self) -> dict[str, Any]: ...

    def _adopt(self) -> None: ...

    def _event(self, type_: str, key: str | None = None, **data: Any) -> dict[str, Any]: ...

    def _skip_records(self, nodes: list[Node], path: tuple[int, ...]) -> list[tuple]: ...

    def _gate(self) -> bool: ...

    def _start_block(self, block: Any, path: tuple[int, ...]) -> None: ...

    def _branch_outputs(self, ctx: dict[str, Any]) -> dict[str, Any]: ...

    def _stop(self, verdict: str) -> bool: ...

    def _finish(
        self,
        status: str,
        output: Any,
        ctx: dict[str, Any] | None = None,
        error: dict | None = None,
        extra: list | None = None,
        input: Any = None,
    ) -> None: ...

    def _failed(
        self,
        exc: BaseException,
        kwargs: Any,
        ctx: dict[str, Any] | None,
        error_type: str | None = None,
    ) -> None: ...

    def _notify_parent(self) -> None: ...

    def _publish(self, sigs: list) -> None: ...

    def _rate_ok(self) -> bool: ...
