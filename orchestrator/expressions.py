"""The ``${...}`` expressions that wire a flow's steps together, and the templates holding them.

Flow definitions are data, so what they say must not be able to reach Python itself. Each
expression is parsed into an AST and checked against whitelists of node types, root names and
functions before it can run; it is then evaluated by a ``simpleeval`` subclass in which ``a.b``
is only ever ``a["b"]`` on a mapping (``getattr`` is never called) and only the listed functions
can be called. Templates are rendered for every step of every run, so each distinct string is
parsed once (memoised) and evaluation walks the already-checked tree.

Nor may an expression exhaust the worker's CPU or memory, as a few characters such as
``[[0]*100000]*100000`` or ``4000000**4000000`` would. Every operation that can build something
big checks the size of what it would build *before* building it, against these limits; beyond
one, an :class:`~orchestrator.errors.ExpressionError` names it (and the step fails):

``MAX_STRING_LENGTH``
    the longest string an expression may build: by ``+``, ``*``, ``str()``, ``join()``,
    ``upper()``/``lower()``, or as text with ``${...}`` in it (all of that text).
``MAX_VALUE_SIZE``
    the biggest list, tuple or dict ``+``, ``*``, ``|`` or ``sum()`` may build, its size being
    about the length of its JSON text (an item held twice counts twice, so ``[[0]*1000]*1000``
    has size about 3 million). Formatting a list or dict it built is refused the same way
    before the text is made.
``MAX_INT_BITS``
    the biggest integer ``*``, ``**`` and ``<<`` may build (``**`` estimates the result from
    the operands' bits first), and the biggest that ``str()`` formats or ``int()`` parses. It
    keeps below Python's own 4300-digit limit on formatting integers.
``MAX_WORK``
    the work one evaluation may do in all, in units of about one character or item built,
    copied or compared (a character encoded as JSON costs ``_ENCODE_COST``, a node evaluated
    ``_NODE_COST``). One evaluation is a
    condition, a template, or a ``render()`` of a whole value (all of a step's fields).
``MAX_SECONDS``
    the CPU time one evaluation may take: a backstop for work the units do not count, such
    as comparing two big documents read from the context (those are bounded where they were
    accepted: ``max_input_bytes``, ``max_output_bytes``). It and ``MAX_WORK`` are settings
    (``ORCHESTRATOR_EXPRESSION_MAX_WORK``, ``_MAX_SECONDS``) that :func:`configure` applies.

``%`` on a string (printf-style formatting, whose widths can ask for gigabytes) is refused.
An expression, or part of one, that reads no root name (``inputs``, ``steps`` ...) has the
same value on every run, so it is evaluated once when it is parsed: one bound to exceed a
limit is refused then (validate and deploy report it), not when a run gets to it.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from simpleeval import DEFAULT_OPERATORS, EvalWithCompoundTypes, InvalidExpression

from .errors import ExpressionError

__all__ = [
    "MAX_INT_BITS",
    "MAX_SECONDS",
    "MAX_STRING_LENGTH",
    "MAX_VALUE_SIZE",
    "MAX_WORK",
    "ROOTS",
    "Template",
    "check",
    "evaluate_condition",
    "parse_condition",
    "parse_template",
    "render",
    "root_names",
    "step_refs",
]

ROOTS = frozenset({"inputs", "steps", "vars", "item", "index", "run", "error", "event"})
_LITERALS = {"true": True, "false": False, "null": None}
_OPENER = re.compile(r"\$\$?\{")  # "${" opens an expression; "$${" is an escaped "${"

MAX_STRING_LENGTH = 2_000_000  # characters
MAX_VALUE_SIZE = 2_000_000  # characters of its JSON text, about
MAX_INT_BITS = 14_000  # about 4214 decimal digits
MAX_WORK = 10_000_000  # units: about one per character or item
MAX_SECONDS = 1.0  # of the evaluating thread's CPU time
_NODE_COST = 50  # work units per node evaluated (it costs about what copying 50 items does)
_ENCODE_COST = 2  # work units per character of JSON text encoded (the slowest per character)
_CLOCK_EVERY = 64  # nodes between looks at the clock
_MAX_INT_DIGITS = int(MAX_INT_BITS * math.log10(2))

_SEQUENCES = (list, tuple)
_CONTAINERS = (list, tuple, Mapping)
_TEXTS = (str, bytes)


# -- limits -------------------------------------------------------------------------------


class _Refused(ExpressionError):
    """Over one of the limits, or an operation refused outright, whatever the values read."""


#: The limits a deployment may change (``configure``), by the setting that changes them.
_SETTINGS = {
    "MAX_WORK": "ORCHESTRATOR_EXPRESSION_MAX_WORK",
    "MAX_SECONDS": "ORCHESTRATOR_EXPRESSION_MAX_SECONDS",
}


def configure(max_work: int | None = None, max_seconds: float | None = None) -> None:
    """Set this process's budget for one evaluation (the worker does, from its settings)."""
    global MAX_WORK, MAX_SECONDS
    if max_work is not None:
        MAX_WORK = max_work
    if max_seconds is not None:
        MAX_SECONDS = max_seconds


def _limit(name: str) -> str:
    return f"(limit: {_SETTINGS.get(name, name)} = {globals()[name]})"


def _too_long(what: str, length: int) -> _Refused:
    return _Refused(
        f"{what} would be a string of {length} characters {_limit('MAX_STRING_LENGTH')}"
    )


def _too_big(what: str, size: int) -> _Refused:
    return _Refused(
        f"{what} would build a value of size {size} (about its length as JSON text) "
        f"{_limit('MAX_VALUE_SIZE')}"
    )


def _too_many_bits(what: str, bits: float) -> _Refused:
    about = f"about {bits:.0f}" if bits < 10**15 else "more than 10**15"  # 2 ** 10**400
    return _Refused(f"{what} would be an integer of {about} bits {_limit('MAX_INT_BITS')}")


def _brief(value: Any) -> str:
    """A short description of a value for a message, which never formats a big one."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    if isinstance(value, _TEXTS) and len(value) > 20:
        return f"{_kind(value)} of {len(value)} characters"
    if isinstance(value, _CONTAINERS):
        return f"{_kind(value)} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return repr(value)


def _scalar_size(value: Any) -> int:
    """About the length of the JSON text of a value that holds no other."""
    if isinstance(value, _TEXTS):
        return len(value) + 2
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):  # at least as many digits as it has, and the sign
        return int(value.bit_length() * 0.30103) + 1 + (value < 0)
    if isinstance(value, float):
        return len(repr(value))
    return 8


def _outer(inner: int, n: int) -> int:
    """A list's JSON text from its items' text: brackets and ", " between items added."""
    return inner + 2 + 2 * max(n - 1, 0)


def _inner(size: int, n: int) -> int:
    return size - 2 - 2 * max(n - 1, 0)


class _Budget:
    """What is left to one evaluation, the containers it built, and the sizes it measured."""

    __slots__ = ("work", "clock", "deadline", "sizes", "built")

    def __init__(self) -> None:
        self.work = MAX_WORK
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
            raise _Refused(f"it needs more work than one evaluation may do {_limit('MAX_WORK')}")
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
            self.deadline = now + MAX_SECONDS
        elif now > self.deadline:
            raise _Refused(f"it took too long {_limit('MAX_SECONDS')} s of CPU time")

    def size(self, value: Any) -> int:
        """About the length of a value's JSON text: what ``MAX_VALUE_SIZE`` bounds.

        Built values are sized as they are built (a literal when first needed, from its
        items'); one read from the context is encoded to find out, once per evaluation.
        """
        if not isinstance(value, _CONTAINERS):
            return _scalar_size(value)
        hit = self.sizes.get(id(value))
        if hit is not None:
            return hit[1]
        if id(value) in self.built:  # a literal, whose items the expression spelled out
            if isinstance(value, Mapping):
                inner = sum(self.size(k) + self.size(v) + 2 for k, v in value.items())
            else:
                inner = sum(self.size(item) for item in value)
            size = _outer(inner, len(value))
        else:
            size = len(json.dumps(value, ensure_ascii=False, default=str))
            self.charge(size * _ENCODE_COST)
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
        if isinstance(value, _TEXTS):
            return len(value)
        if not isinstance(value, _CONTAINERS):
            return 1
        if id(value) in self.built:
            return self.size(value)
        self.clock -= 16
        return len(value)


def _budget() -> _Budget:
    return _local.budget


class _Evaluation:
    """Shares one budget among everything evaluated inside it (or, fresh, starts its own)."""

    __slots__ = ("fresh", "outer")

    def __init__(self, fresh: bool = False) -> None:
        self.fresh = fresh

    def __enter__(self) -> _Budget:
        self.outer = getattr(_local, "budget", None)
        if self.outer is None or self.fresh:
            _local.budget = _Budget()
        return _local.budget

    def __exit__(self, *exc: object) -> None:
        _local.budget = self.outer


# -- the operators: each checks what it would build before building it ---------------------


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, _TEXTS) and isinstance(b, _TEXTS):
        length = len(a) + len(b)
        if length > MAX_STRING_LENGTH:
            raise _too_long(f"{_brief(a)} + {_brief(b)}", length)
        _budget().charge(length)
    elif isinstance(a, _SEQUENCES) and type(a) is type(b):
        return _joined(a, b, "+", operator.add)
    return a + b


def _joined(a: Any, b: Any, sign: str, join: Callable[[Any, Any], Any]) -> Any:
    """``a + b`` of lists or ``a | b`` of dicts, whose size is (at most) both sizes."""
    budget = _budget()
    size_a, size_b = budget.size(a), budget.size(b)
    items = len(a) + len(b)
    size = _outer(_inner(size_a, len(a)) + _inner(size_b, len(b)), items)
    if size > MAX_VALUE_SIZE:
        raise _too_big(f"{_brief(a)} (size {size_a}) {sign} {_brief(b)} (size {size_b})", size)
    budget.charge(items)
    return budget.built_as(join(a, b), size)


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, (*_TEXTS, *_SEQUENCES)):
        a, b = b, a
    if isinstance(a, (*_TEXTS, *_SEQUENCES)) and isinstance(b, int):
        times = max(b, 0)
        budget = _budget()
        if isinstance(a, _TEXTS):
            length = len(a) * times
            if length > MAX_STRING_LENGTH:
                raise _too_long(f"{_brief(a)} * {_brief(b)}", length)
            budget.charge(length)
            return a * times
        size = budget.size(a)
        total = _outer(times * _inner(size, len(a)), times * len(a))
        if total > MAX_VALUE_SIZE:
            raise _too_big(f"{_brief(a)} (size {size}) * {_brief(b)}", total)
        budget.charge(len(a) * times)
        return budget.built_as(a * times, total)
    if isinstance(a, int) and isinstance(b, int):
        bits = a.bit_length() + b.bit_length()
        if bits > MAX_INT_BITS:
            raise _too_many_bits(f"{_brief(a)} * {_brief(b)}", bits)
        _budget().charge(bits >> 6)
    return a * b


def _pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        # |a| >= 2, so the result has at least b bits: b bounds the estimate's float first
        bits = b if b > MAX_INT_BITS else b * math.log2(abs(a))
        if bits > MAX_INT_BITS:
            raise _too_many_bits(f"{_brief(a)} ** {_brief(b)}", bits)
        _budget().charge(int(bits) >> 6)
    return a**b


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and a and b > 0:
        bits = b if b > MAX_INT_BITS else a.bit_length() + b
        if bits > MAX_INT_BITS:
            raise _too_many_bits(f"{_brief(a)} << {_brief(b)}", bits)
    return a << b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, _TEXTS):
        raise _Refused("%-formatting of strings is not allowed; use str() and +")
    return a % b


def _or(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return _joined(a, b, "|", operator.or_)
    return a | b


def _charge_comparison(a: Any, b: Any) -> None:
    """Comparing costs at most the smaller size, and only when both hold other values."""
    if isinstance(a, _TEXTS) and isinstance(b, _TEXTS):
        _budget().charge(min(len(a), len(b)))
    elif isinstance(a, _CONTAINERS) and isinstance(b, _CONTAINERS):
        budget = _budget()
        if id(a) in budget.built and id(b) in budget.built:
            budget.charge(min(budget.size(a), budget.size(b)))
        else:  # one read from the context: its price bounds it, and is cheaper to find out
            budget.charge(budget.price(b if id(a) in budget.built else a))


def _charge_search(item: Any, container: Any) -> None:
    """``item in container`` costs up to the container's size, or its length for a scalar."""
    budget = _budget()
    if isinstance(container, _TEXTS):
        budget.charge(len(container) + (len(item) if isinstance(item, _TEXTS) else 0))
    elif isinstance(container, Mapping):
        budget.charge(budget.price(item))  # one hash of the key
    elif isinstance(container, _SEQUENCES):
        nested = isinstance(item, (*_TEXTS, *_CONTAINERS))
        budget.charge(budget.price(container) if nested else len(container))


def _compared(compare: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def charged(a: Any, b: Any) -> Any:
        _charge_comparison(a, b)
        return compare(a, b)

    return charged


def _in(item: Any, container: Any) -> bool:
    _charge_search(item, container)
    return item in container


def _not_in(item: Any, container: Any) -> bool:
    return not _in(item, container)


_OPERATORS = {
    **DEFAULT_OPERATORS,
    ast.Add: _add,
    ast.Mult: _mul,
    ast.Pow: _pow,
    ast.LShift: _lshift,
    ast.RShift: operator.rshift,  # shrinks: no limit needed (simpleeval's would refuse 1 >> 10**5)
    ast.Mod: _mod,
    ast.BitOr: _or,
    ast.Eq: _compared(operator.eq),
    ast.NotEq: _compared(operator.ne),
    ast.Lt: _compared(operator.lt),
    ast.LtE: _compared(operator.le),
    ast.Gt: _compared(operator.gt),
    ast.GtE: _compared(operator.ge),
    ast.In: _in,
    ast.NotIn: _not_in,
}


# -- values and the whitelisted functions -------------------------------------------------


def _kind(value: Any) -> str:
    """Describe a value's type for an error message: "null", "a str", "an int"."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _text(value: Any) -> str:
    """Format a value into text: JSON-style for null, booleans, lists and dicts.

    Within the limits: a built value whose text would be too long is refused before it is
    formatted (``[s] * 1000`` is small in memory, its text is not).
    """
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused(f"{_brief(value)} is too big to format as text {_limit('MAX_INT_BITS')}")
    budget = _budget()
    if isinstance(value, _CONTAINERS) and id(value) in budget.built:
        estimate = budget.size(value)
        if estimate > MAX_STRING_LENGTH:
            raise _too_long(f"formatting {_brief(value)} as text", estimate)
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    if len(text) > MAX_STRING_LENGTH:  # the estimate does not count escapes ("\n" is 2 long)
        raise _too_long(f"formatting {_brief(value)} as text", len(text))
    budget.charge(len(text) * _ENCODE_COST)
    return text


def _expect(value: Any, types: type | tuple[type, ...], func: str, what: str) -> None:
    if not isinstance(value, types):
        raise TypeError(f"{func}() needs {what}, got {_kind(value)}")


def _cased(s: str, func: str) -> str:
    _budget().charge(len(s))
    result = s.lower() if func == "lower" else s.upper()  # upper() can lengthen: "ß" -> "SS"
    if len(result) > MAX_STRING_LENGTH:
        raise _too_long(f"{func}() of {_brief(s)}", len(result))
    return result


def _lower(s: Any) -> str:
    _expect(s, str, "lower", "a string")
    return _cased(s, "lower")


def _upper(s: Any) -> str:
    _expect(s, str, "upper", "a string")
    return _cased(s, "upper")


def _join(items: Any, sep: Any) -> str:
    _expect(items, (list, tuple), "join", "a list")
    _expect(sep, str, "join", "a string separator")
    budget = _budget()
    # the list's size covers every item's own text; the separators come on top
    estimate = budget.size(items) + len(sep) * max(len(items) - 1, 0)
    if estimate > MAX_STRING_LENGTH:
        raise _too_long(f"join() of {_brief(items)}", estimate)
    result = sep.join(_text(item) for item in items)
    if len(result) > MAX_STRING_LENGTH:
        raise _too_long(f"join() of {_brief(items)}", len(result))
    budget.charge(len(result))
    return result


def _keys(mapping: Any) -> list[Any]:
    _expect(mapping, Mapping, "keys", "a mapping")
    return _taken_out(mapping, list(mapping))


def _values(mapping: Any) -> list[Any]:
    _expect(mapping, Mapping, "values", "a mapping")
    return _taken_out(mapping, list(mapping.values()))


def _taken_out(source: Any, copy: Any) -> Any:
    """Charge a copy of (some of) source's items; one out of a built value is built too."""
    budget = _budget()
    budget.charge(len(copy))
    if id(source) in budget.built:
        return budget.built_as(copy, budget.size(source))  # at most the whole of it
    return copy


def _contains(container: Any, item: Any) -> bool:
    return _in(item, container)


def _default(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _int(value: Any, *base: Any) -> int:
    if isinstance(value, _TEXTS):
        # int() of a long digit string takes time quadratic in its length
        if len(value.strip()) > _MAX_INT_DIGITS:
            raise _Refused(
                f"int() of {_brief(value)}: more than {_MAX_INT_DIGITS} digits "
                f"{_limit('MAX_INT_BITS')}"
            )
        _budget().charge(len(value))
    return int(value, *base)


def _float(value: Any) -> float:
    if isinstance(value, _TEXTS):
        _budget().charge(len(value))
    return float(value)


def _round(number: Any, *ndigits: Any) -> Any:
    if ndigits and isinstance(number, int) and isinstance(ndigits[0], int):
        # round(5, -10**6) would compute 10**(10**6); any ndigits below -(digits + 1) gives 0
        ndigits = (max(ndigits[0], -(int(number.bit_length() * 0.30103) + 2)),)
    return round(number, *ndigits)


def _sum(items: Any, *start: Any) -> Any:
    if start and isinstance(start[0], _SEQUENCES):
        # list + list, item by item, each checked and charged (Python's sum() would not be)
        total = start[0]
        for item in items:
            total = _add(total, item)
        return total
    _budget().charge(len(items) if hasattr(items, "__len__") else 1)
    return sum(items, *start)  # numbers only: a list, tuple or string start is a TypeError


def _extreme(func: Callable[..., Any]) -> Callable[..., Any]:
    def charged(*args: Any) -> Any:
        budget = _budget()
        # comparing the items costs at most their sizes together
        budget.charge(sum(budget.price(arg) for arg in args))
        return func(*args)

    return charged


_FUNCTIONS = {
    "len": len,
    "str": _text,  # so that str(x) reads the same as "${x}" inside text
    "int": _int,
    "float": _float,
    "bool": bool,
    "abs": abs,
    "min": _extreme(min),
    "max": _extreme(max),
    "sum": _sum,
    "round": _round,
    "lower": _lower,
    "upper": _upper,
    "join": _join,
    "keys": _keys,
    "values": _values,
    "contains": _contains,
    "default": _default,
}


# -- parsing and checking one expression --------------------------------------------------

_ALLOWED_NODES = (
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.Attribute,
    ast.Subscript,
    ast.Slice,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.Compare,
    ast.IfExp,
    ast.Call,
    ast.List,
    ast.Tuple,
    ast.Dict,
    *DEFAULT_OPERATORS,
)
_REFUSED = {
    ast.Lambda: "lambdas are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are",
    ast.JoinedStr: "f-strings are",
    ast.Starred: "*-unpacking is",
    ast.NamedExpr: "assignment expressions (:=) are",
    ast.Set: "set literals are",
}


class _Expression(NamedTuple):
    """One checked expression: how it was written, its tree, and what it refers to."""

    display: str  # as written, for error messages: "${steps.a.output}" or a bare condition
    tree: ast.expr
    roots: frozenset[str]
    step_refs: frozenset[str]


def _compile(source: str, display: str) -> _Expression:
    """Parse and check one expression; raise ExpressionError naming it if it is not allowed."""

    def refuse(problem: str) -> ExpressionError:
        return ExpressionError(f"invalid expression {display!r}: {problem}")

    if not source.strip():
        raise refuse("it is empty")
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as exc:
        raise refuse(exc.msg) from None
    except (ValueError, RecursionError) as exc:  # null bytes; absurdly deep nesting
        raise refuse(str(exc)) from None

    roots: set[str] = set()
    refs: set[str] = set()
    callees: set[ast.AST] = set()
    for node in ast.walk(tree):  # breadth-first: a Call is seen before its function's Name
        if not isinstance(node, _ALLOWED_NODES):
            what = _REFUSED.get(type(node), f"{type(node).__name__} is")
            raise refuse(f"{what} not allowed")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise refuse("only the listed functions can be called, by name")
            if node.func.id not in _FUNCTIONS:
                raise refuse(f"unknown function {node.func.id!r} (allowed: {_listing(_FUNCTIONS)})")
            if node.keywords:
                raise refuse("keyword arguments are not allowed")
            callees.add(node.func)
        elif isinstance(node, ast.Name) and node not in callees:
            if node.id in ROOTS:
                roots.add(node.id)
            elif node.id not in _LITERALS:
                raise refuse(f"unknown name {node.id!r} (allowed: {_listing(ROOTS)})")
        elif isinstance(node, ast.Dict) and None in node.keys:
            raise refuse("**-unpacking is not allowed")
        elif isinstance(node, (ast.Attribute, ast.Subscript)) and _is_steps(node.value):
            if isinstance(node, ast.Attribute):
                refs.add(node.attr)
            elif isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                refs.add(node.slice.value)
    try:
        _check_static(tree, display)
    except _Refused as exc:
        raise refuse(str(exc)) from None
    return _Expression(display, tree, frozenset(roots), frozenset(refs))


def _check_static(tree: ast.expr, display: str) -> None:
    """Evaluate the parts of a tree that read no root name, raising _Refused for a limit.

    Such a part has the same value on every run, so one that is over a limit now always
    will be: better refused when the definition is loaded. Its other failures (``1 / 0``)
    are left to be reported where it runs, as before.
    """
    parts = _static_parts(tree)
    if not parts:
        return
    evaluator = getattr(_local, "static_evaluator", None)
    if evaluator is None:
        evaluator = _local.static_evaluator = _Evaluator()
    with _Evaluation(fresh=True) as budget:
        evaluator.budget = budget
        for part in parts:
            try:
                evaluator.eval(display, previously_parsed=part)
            except _Refused:
                raise
            except _EVAL_ERRORS:
                pass


def _static_parts(tree: ast.expr) -> list[ast.expr]:
    """The largest subtrees that read no root name, lone literals and names aside."""
    order: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:  # iteratively: a tree may be nested deeper than Python's recursion limit
        node = stack.pop()
        order.append(node)
        stack.extend(ast.iter_child_nodes(node))
    reads: dict[ast.AST, bool] = {}
    for node in reversed(order):  # every child before its parent
        reads[node] = (isinstance(node, ast.Name) and node.id in ROOTS) or any(
            reads[child] for child in ast.iter_child_nodes(node)
        )
    parts: list[ast.expr] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if reads[node]:
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.expr) and not isinstance(node, (ast.Constant, ast.Name)):
            parts.append(node)
    return parts


def _is_steps(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "steps"


def _listing(names: Mapping[str, Any] | frozenset[str]) -> str:
    return ", ".join(sorted(names))


# -- evaluating one expression ------------------------------------------------------------


class _Evaluator(EvalWithCompoundTypes):
    """simpleeval, narrowed: dotted access is item lookup, only whitelisted calls by name.

    Trees reach it only through ``_compile``, so every node has been checked already. Every
    node evaluated is charged to ``budget``, and the operators check what they would build.
    """

    budget: _Budget

    def __init__(self) -> None:
        super().__init__(operators=_OPERATORS, functions={}, names={})

    def _eval(self, node: ast.AST) -> Any:
        # simpleeval also scans every intermediate result for modules and forbidden functions,
        # walking whole containers (``steps`` holds every step's output) at every node. That
        # guards values that might get called or getattr'd; here none ever are.
        budget = self.budget
        budget.work -= _NODE_COST
        budget.clock -= 1
        if budget.work < 0 or budget.clock <= 0:
            budget.check()
        return self.nodes[type(node)](node)

    @staticmethod
    def _eval_constant(node: ast.Constant) -> Any:
        return node.value  # already in the definition, whose size is limited where it is read

    def _eval_list(self, node: ast.List) -> Any:
        return self.budget.mark(super()._eval_list(node))

    def _eval_tuple(self, node: ast.Tuple) -> Any:
        return self.budget.mark(super()._eval_tuple(node))

    def _eval_dict(self, node: ast.Dict) -> Any:
        return self.budget.mark(super()._eval_dict(node))

    def _eval_name(self, node: ast.Name) -> Any:
        if node.id in _LITERALS:
            return _LITERALS[node.id]
        try:
            return self.names[node.id]
        except KeyError:
            raise ExpressionError(f"{node.id!r} is not available here") from None

    def _eval_attribute(self, node: ast.Attribute) -> Any:
        value = self._eval(node.value)
        if not isinstance(value, Mapping):
            raise ExpressionError(
                f"{ast.unparse(node.value)} is {_kind(value)}, not a mapping, "
                f"so it has no field {node.attr!r}"
            )
        try:
            return value[node.attr]
        except KeyError:
            raise ExpressionError(f"{ast.unparse(node.value)} has no field {node.attr!r}") from None

    def _eval_subscript(self, node: ast.Subscript) -> Any:
        container = self._eval(node.value)
        key = self._eval(node.slice)
        try:
            value = container[key]
        except KeyError:
            problem = f"has no field {key!r}"
        except IndexError:
            problem = f"has no index {key!r} (its length is {len(container)})"
        except TypeError:
            problem = f"is {_kind(container)}, which cannot be indexed with {key!r}"
        else:
            if isinstance(key, slice) and isinstance(value, _CONTAINERS):
                return _taken_out(container, value)
            if isinstance(key, slice):
                self.budget.charge(len(value))
            return value
        raise ExpressionError(f"{ast.unparse(node.value)} {problem}")

    def _eval_call(self, node: ast.Call) -> Any:
        return _FUNCTIONS[node.func.id](*[self._eval(arg) for arg in node.args])


_EVAL_ERRORS = (
    ExpressionError,
    InvalidExpression,
    ArithmeticError,
    LookupError,
    TypeError,
    ValueError,  # int("x"); also Python's own 4300-digit limit, should a value reach it
    RecursionError,
    MemoryError,
)
_local = threading.local()  # one evaluator per thread, and the budget of what it evaluates


def _evaluate(expression: _Expression, context: Mapping[str, Any], as_text: bool = False) -> Any:
    """Evaluate within the current evaluation's budget; ``as_text`` formats the value too."""
    evaluator = getattr(_local, "evaluator", None)
    if evaluator is None:
        evaluator = _local.evaluator = _Evaluator()
    evaluator.names = context
    evaluator.budget = _budget()
    try:
        value = evaluator.eval(expression.display, previously_parsed=expression.tree)
        return _text(value) if as_text else value
    except _EVAL_ERRORS as exc:
        raise ExpressionError(f"expression {expression.display!r} failed: {exc}") from exc
    finally:
        evaluator.names = {}


# -- templates ----------------------------------------------------------------------------


class Template:
    """A parsed string: literal text and ``${...}`` expressions, ready to evaluate."""

    __slots__ = ("source", "is_expression", "_parts", "_names", "_step_refs")

    def __init__(self, source: str, parts: tuple[str | _Expression, ...]):
        expressions = [part for part in parts if isinstance(part, _Expression)]
        self.source = source
        self.is_expression = len(parts) == 1 and len(expressions) == 1
        self._parts = parts
        self._names = frozenset().union(*(e.roots for e in expressions))
        self._step_refs = frozenset().union(*(e.step_refs for e in expressions))

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """The value of a lone expression as is; otherwise the text with each value formatted."""
        with _Evaluation() as budget:
            if self.is_expression:
                return _evaluate(self._parts[0], context)
            texts = [
                part if isinstance(part, str) else _evaluate(part, context, as_text=True)
                for part in self._parts
            ]
            length = sum(map(len, texts))
            try:
                if length > MAX_STRING_LENGTH:
                    raise _too_long("it", length)
                budget.charge(length)
            except _Refused as exc:
                shown = self.source if len(self.source) <= 80 else self.source[:77] + "..."
                raise ExpressionError(f"text {shown!r} failed: {exc}") from None
            return "".join(texts)

    def step_refs(self) -> set[str]:
        """Step ids referenced literally, as ``steps.ID`` or ``steps["ID"]``."""
        return set(self._step_refs)

    def names(self) -> set[str]:
        """Root names used, e.g. ``{"inputs", "steps"}``."""
        return set(self._names)


@functools.lru_cache(maxsize=4096)
def parse_template(text: str) -> Template:
    """Parse a string holding ``${...}`` expressions (``$${`` is a literal ``${``); memoised."""
    parts: list[str | _Expression] = []
    literal: list[str] = []
    pos = 0
    while (match := _OPENER.search(text, pos)) is not None:
        literal.append(text[pos : match.start()])
        pos = match.end()
        if match.group() == "$${":
            literal.append("${")
            continue
        end = _closing_brace(text, pos)
        if chunk := "".join(literal):
            parts.append(chunk)
        literal = []
        parts.append(_compile(text[pos:end], text[match.start() : end + 1]))
        pos = end + 1
    literal.append(text[pos:])
    if chunk := "".join(literal):
        parts.append(chunk)
    return Template(text, tuple(parts))


def _closing_brace(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` before ``start``, skipping braces in quotes."""
    depth, quote, i = 1, "", start
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ExpressionError(f"unterminated '${{' at position {start - 2} in {text!r}")


def parse_condition(text: str | bool) -> Template:
    """Parse a ``when:``: one ``${...}``, a bare expression such as ``inputs.x > 3``, or a bool."""
    if isinstance(text, bool):
        text = "true" if text else "false"
    elif not isinstance(text, str):
        raise ExpressionError(f"a condition must be a string or a boolean, not {text!r}")
    return _parse_condition(text.strip())


@functools.lru_cache(maxsize=4096)
def _parse_condition(text: str) -> Template:
    if "${" not in text:
        return Template(text, (_compile(text, text),))
    template = parse_template(text)
    if not template.is_expression:
        raise ExpressionError(
            f"condition {text!r} must be a single ${{...}} or a bare expression, "
            "not text with expressions in it"
        )
    return template


def evaluate_condition(text: str | bool, context: Mapping[str, Any]) -> bool:
    """Whether a ``when:`` holds in ``context``."""
    return bool(parse_condition(text).evaluate(context))


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Evaluate every string in a nested value (dict values, list items); keys stay as they are.

    All of it is one evaluation: its templates share one budget (see the module's limits).
    """
    with _Evaluation():
        return _render(value, context)


def _render(value: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return parse_template(value).evaluate(context) if "${" in value else value
    if isinstance(value, dict):
        return {key: _render(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, context) for item in value]
    if isinstance(value, tuple):
        return tuple(_render(item, context) for item in value)
    return value


def _templates(value: Any) -> Iterator[str]:
    """Every string holding ``${`` in a nested value."""
    if isinstance(value, str):
        if "${" in value:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _templates(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _templates(item)


def step_refs(value: Any) -> set[str]:
    """Step ids referenced by any template in a nested value."""
    refs: set[str] = set()
    for text in _templates(value):
        refs |= parse_template(text)._step_refs
    return refs


def root_names(value: Any) -> set[str]:
    """Root names (``inputs``, ``steps``, ``item``...) read by any template in a nested value."""
    names: set[str] = set()
    for text in _templates(value):
        names |= parse_template(text).names()
    return names


def check(value: Any) -> None:
    """Parse every template in a nested value, raising ExpressionError for the first bad one."""
    for text in _templates(value):
        parse_template(text)
