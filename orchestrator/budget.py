"""What one evaluation of expressions may still spend, and how the size of a value is told.

An evaluation (a condition, a template, or a ``render()`` of a whole value) gets one
:class:`Budget`: the work units and CPU time it may use, the containers it built and the
sizes it measured, and the :class:`Limits` it runs under, read from
:mod:`orchestrator.expressions` when it starts (so ``configure`` and changes made there
count). :mod:`.sandbox`'s operators and functions ask it before they build anything big.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .errors import ExpressionError

NODE_COST = 50  # work units per node evaluated (it costs about what copying 50 items does)
ENCODE_COST = 2  # work units per character of JSON text encoded (the slowest per character)
_CLOCK_EVERY = 64  # nodes between looks at the clock

SEQUENCES = (list, tuple)
CONTAINERS = (list, tuple, Mapping)
TEXTS = (str, bytes)


class Limits(NamedTuple):
    """The limits of one evaluation, named as in :mod:`orchestrator.expressions`."""

    MAX_STRING_LENGTH: int
    MAX_VALUE_SIZE: int
    MAX_INT_BITS: int
    MAX_WORK: int
    MAX_SECONDS: float


class Refused(ExpressionError):
    """Over one of the limits, or an operation refused outright, whatever the values read."""


#: The limits a deployment may change (``configure``), by the setting that changes them.
_SETTINGS = {
    "MAX_WORK": "ORCHESTRATOR_EXPRESSION_MAX_WORK",
    "MAX_SECONDS": "ORCHESTRATOR_EXPRESSION_MAX_SECONDS",
}


def named_limit(name: str) -> str:
    return f"(limit: {_SETTINGS.get(name, name)} = {getattr(limits(), name)})"


def too_long(what: str, length: int) -> Refused:
    return Refused(
        f"{what} would be a string of {length} characters {named_limit('MAX_STRING_LENGTH')}"
    )


def too_big(what: str, size: int) -> Refused:
    return Refused(
        f"{what} would build a value of size {size} (about its length as JSON text) "
        f"{named_limit('MAX_VALUE_SIZE')}"
    )


def too_many_bits(what: str, bits: float) -> Refused:
    about = f"about {bits:.0f}" if bits < 10**15 else "more than 10**15"  # 2 ** 10**400
    return Refused(f"{what} would be an integer of {about} bits {named_limit('MAX_INT_BITS')}")


def brief(value: Any) -> str:
    """A short description of a value for a message, which never formats a big one."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    if isinstance(value, TEXTS) and len(value) > 20:
        return f"{kind(value)} of {len(value)} characters"
    if isinstance(value, CONTAINERS):
        return f"{kind(value)} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return repr(value)


def kind(value: Any) -> str:
    """Describe a value's type for an error message: "null", "a str", "an int"."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _scalar_size(value: Any) -> int:
    """About the length of the JSON text of a value that holds no other."""
    if isinstance(value, TEXTS):
        return len(value) + 2
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):  # at least as many digits as it has, and the sign
        return int(value.bit_length() * 0.30103) + 1 + (value < 0)
    if isinstance(value, float):
        return len(repr(value))
    return 8


def list_size(inner: int, n: int) -> int:
    """A list's JSON text from its items' text: brackets and ", " between items added."""
    return inner + 2 + 2 * max(n - 1, 0)


def items_size(size: int, n: int) -> int:
    return size - 2 - 2 * max(n - 1, 0)


class Budget:
    """What is left to one evaluation, the containers it built, and the sizes it measured."""

    __slots__ = ("limits", "work", "clock", "deadline", "sizes", "built")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.work = limits.MAX_WORK
        self.clock = _CLOCK_EVERY
        self.deadline: float | None = None  # set at the first look: most evaluations never look
        # id -> (value, size); holding the value keeps its id from being reused meanwhile
        self.sizes: dict[int, tuple[Any, int]] = {}
        # id -> container this evaluation built (literals, +, * ...): one may hold an item many
        # times, so only its size tells what reading it costs. A container read from the
        # context is a decoded document, bounded by the limits it was accepted under
        # (max_input_bytes, max_output_bytes), and holds nothing twice.
        self.built: dict[int, Any] = {}

    def charge(self, units: int) -> None:
        self.work -= units
        if self.work < 0:
            raise Refused(
                f"it needs more work than one evaluation may do {named_limit('MAX_WORK')}"
            )
        if units >= 100_000:
            self.check_clock()

    def check(self) -> None:
        """Called by the evaluator when its work ran out or the clock is due."""
        self.charge(0)
        if self.clock <= 0:
            self.clock = _CLOCK_EVERY
            self.check_clock()

    def check_clock(self) -> None:
        now = time.thread_time()  # CPU time: a busy machine slows an evaluation, not its budget
        if self.deadline is None:
            self.deadline = now + self.limits.MAX_SECONDS
        elif now > self.deadline:
            raise Refused(f"it took too long {named_limit('MAX_SECONDS')} s of CPU time")

    def size(self, value: Any) -> int:
        """About the length of a value's JSON text: what ``MAX_VALUE_SIZE`` bounds.

        Built values are sized as they are built (a literal when first needed, from its
        items'); one read from the context is encoded to find out, once per evaluation.
        """
        if not isinstance(value, CONTAINERS):
            return _scalar_size(value)
        hit = self.sizes.get(id(value))
        if hit is not None:
            return hit[1]
        if id(value) in self.built:  # a literal, whose items the expression spelled out
            if isinstance(value, Mapping):
                inner = sum(self.size(k) + self.size(v) + 2 for k, v in value.items())
            else:
                inner = sum(self.size(item) for item in value)
            size = list_size(inner, len(value))
        else:
            size = len(json.dumps(value, ensure_ascii=False, default=str))
            self.charge(size * ENCODE_COST)
        self.sizes[id(value)] = (value, size)
        return size

    def built_as(self, value: Any, size: int) -> Any:
        """Note a container this evaluation built, and its size."""
        self.built[id(value)] = value
        self.sizes[id(value)] = (value, size)
        return value

    def mark(self, value: Any) -> Any:
        """Note a literal this evaluation built; it is sized only if that is needed."""
        self.built[id(value)] = value
        return value

    def price(self, value: Any) -> int:
        """What reading all of a value (comparing it, searching it) may cost: its size if it
        was built here; for one read from the context only its length, and the clock is
        looked at sooner (many reads of big documents are bounded by MAX_SECONDS)."""
        if isinstance(value, TEXTS):
            return len(value)
        if not isinstance(value, CONTAINERS):
            return 1
        if id(value) in self.built:
            return self.size(value)
        self.clock -= 16
        return len(value)


def current() -> Budget:
    """The budget of the evaluation this thread is in."""
    return _local.budget


def limits() -> Limits:
    """The limits of the evaluation this thread is in."""
    return _local.budget.limits


class Evaluation:
    """Shares one budget among everything evaluated inside it (or, fresh, starts its own)."""

    __slots__ = ("limits", "fresh", "outer")

    def __init__(self, limits: Callable[[], Limits], fresh: bool = False) -> None:
        self.limits = limits  # read only when a budget starts
        self.fresh = fresh

    def __enter__(self) -> Budget:
        self.outer = getattr(_local, "budget", None)
        if self.outer is None or self.fresh:
            _local.budget = Budget(self.limits())
        return _local.budget

    def __exit__(self, *exc: object) -> None:
        _local.budget = self.outer


_local = threading.local()  # the budget of what this thread evaluates
