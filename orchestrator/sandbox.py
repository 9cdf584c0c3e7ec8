"""The sandbox that evaluates checked expressions: simpleeval narrowed, and every operator
and function an expression may call, each checking against the current evaluation's
:mod:`.budget` what it would build *before* building it.

Trees reach it only after :mod:`orchestrator.expressions` has checked them against its
whitelists; ``a.b`` is only ever ``a["b"]`` on a mapping (``getattr`` is never called).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from simpleeval import DEFAULT_OPERATORS, EvalWithCompoundTypes, InvalidExpression

from .budget import (
    CONTAINERS,
    ENCODE_COST,
    NODE_COST,
    SEQUENCES,
    TEXTS,
    Budget,
    Evaluation,
    Limits,
    Refused,
    brief,
    current,
    items_size,
    kind,
    limits,
    list_size,
    named_limit,
    too_big,
    too_long,
    too_many_bits,
)
from .errors import ExpressionError

LITERALS = {"true": True, "false": False, "null": None}


# -- the operators: each checks what it would build before building it ---------------------


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, TEXTS) and isinstance(b, TEXTS):
        length = len(a) + len(b)
        budget = current()
        if length > budget.limits.MAX_STRING_LENGTH:
            raise too_long(f"{brief(a)} + {brief(b)}", length)
        budget.charge(length)
    elif isinstance(a, SEQUENCES) and type(a) is type(b):
        return _joined(a, b, "+", operator.add)
    return a + b


def _joined(a: Any, b: Any, sign: str, join: Callable[[Any, Any], Any]) -> Any:
    """``a + b`` of lists or ``a | b`` of dicts, whose size is (at most) both sizes."""
    budget = current()
    size_a, size_b = budget.size(a), budget.size(b)
    items = len(a) + len(b)
    size = list_size(items_size(size_a, len(a)) + items_size(size_b, len(b)), items)
    if size > limits().MAX_VALUE_SIZE:
        raise too_big(f"{brief(a)} (size {size_a}) {sign} {brief(b)} (size {size_b})", size)
    budget.charge(items)
    return budget.built_as(join(a, b), size)


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, (*TEXTS, *SEQUENCES)):
        a, b = b, a
    if isinstance(a, (*TEXTS, *SEQUENCES)) and isinstance(b, int):
        times = max(b, 0)
        budget = current()
        if isinstance(a, TEXTS):
            length = len(a) * times
            if length > limits().MAX_STRING_LENGTH:
                raise too_long(f"{brief(a)} * {brief(b)}", length)
            budget.charge(length)
            return a * times
        size = budget.size(a)
        total = list_size(times * items_size(size, len(a)), times * len(a))
        if total > limits().MAX_VALUE_SIZE:
            raise too_big(f"{brief(a)} (size {size}) * {brief(b)}", total)
        budget.charge(len(a) * times)
        return budget.built_as(a * times, total)
    if isinstance(a, int) and isinstance(b, int):
        bits = a.bit_length() + b.bit_length()
        if bits > limits().MAX_INT_BITS:
            raise too_many_bits(f"{brief(a)} * {brief(b)}", bits)
        current().charge(bits >> 6)
    return a * b


def _pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        # |a| >= 2, so the result has at least b bits: b bounds the estimate's float first
        bits = b if b > limits().MAX_INT_BITS else b * math.log2(abs(a))
        if bits > limits().MAX_INT_BITS:
            raise too_many_bits(f"{brief(a)} ** {brief(b)}", bits)
        current().charge(int(bits) >> 6)
    return a**b


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and a and b > 0:
        bits = b if b > limits().MAX_INT_BITS else a.bit_length() + b
        if bits > limits().MAX_INT_BITS:
            raise too_many_bits(f"{brief(a)} << {brief(b)}", bits)
    return a << b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, TEXTS):
        raise Refused("%-formatting of strings is not allowed; use str() and +")
    return a % b


def _or(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return _joined(a, b, "|", operator.or_)
    return a | b


def _charge_comparison(a: Any, b: Any) -> None:
    """Comparing costs at most the smaller size, and only when both hold other values."""
    if isinstance(a, TEXTS) and isinstance(b, TEXTS):
        current().charge(min(len(a), len(b)))
    elif isinstance(a, CONTAINERS) and isinstance(b, CONTAINERS):
        budget = current()
        if id(a) in budget.built and id(b) in budget.built:
            budget.charge(min(budget.size(a), budget.size(b)))
        else:  # one read from the context: its price bounds it, and is cheaper to find out
            budget.charge(budget.price(b if id(a) in budget.built else a))


def _charge_search(item: Any, container: Any) -> None:
    """``item in container`` costs up to the container's size, or its length for a scalar."""
    budget = current()
    if isinstance(container, TEXTS):
        budget.charge(len(container) + (len(item) if isinstance(item, TEXTS) else 0))
    elif isinstance(container, Mapping):
        budget.charge(budget.price(item))  # one hash of the key
    elif isinstance(container, SEQUENCES):
        nested = isinstance(item, (*TEXTS, *CONTAINERS))
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
    if isinstance(value, int) and value.bit_length() > limits().MAX_INT_BITS:
        raise Refused(f"{brief(value)} is too big to format as text {named_limit('MAX_INT_BITS')}")
    budget = current()
    longest = budget.limits.MAX_STRING_LENGTH
    if isinstance(value, CONTAINERS) and id(value) in budget.built:
        estimate = budget.size(value)
        if estimate > longest:
            raise too_long(f"formatting {brief(value)} as text", estimate)
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    if len(text) > longest:  # the estimate does not count escapes ("\n" is 2 long)
        raise too_long(f"formatting {brief(value)} as text", len(text))
    budget.charge(len(text) * ENCODE_COST)
    return text


def _expect(value: Any, types: type | tuple[type, ...], func: str, what: str) -> None:
    if not isinstance(value, types):
        raise TypeError(f"{func}() needs {what}, got {kind(value)}")


def _cased(s: str, func: str) -> str:
    current().charge(len(s))
    result = s.lower() if func == "lower" else s.upper()  # upper() can lengthen: "ß" -> "SS"
    if len(result) > limits().MAX_STRING_LENGTH:
        raise too_long(f"{func}() of {brief(s)}", len(result))
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
    budget = current()
    # the list's size covers every item's own text; the separators come on top
    estimate = budget.size(items) + len(sep) * max(len(items) - 1, 0)
    if estimate > limits().MAX_STRING_LENGTH:
        raise too_long(f"join() of {brief(items)}", estimate)
    result = sep.join(_text(item) for item in items)
    if len(result) > limits().MAX_STRING_LENGTH:
        raise too_long(f"join() of {brief(items)}", len(result))
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
    budget = current()
    budget.charge(len(copy))
    if id(source) in budget.built:
        return budget.built_as(copy, budget.size(source))  # at most the whole of it
    return copy


def _contains(container: Any, item: Any) -> bool:
    return _in(item, container)


def _default(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _int(value: Any, *base: Any) -> int:
    if isinstance(value, TEXTS):
        # int() of a long digit string takes time quadratic in its length
        digits = int(limits().MAX_INT_BITS * math.log10(2))
        if len(value.strip()) > digits:
            raise Refused(
                f"int() of {brief(value)}: more than {digits} digits {named_limit('MAX_INT_BITS')}"
            )
        current().charge(len(value))
    return int(value, *base)


def _float(value: Any) -> float:
    if isinstance(value, TEXTS):
        current().charge(len(value))
    return float(value)


def _round(number: Any, *ndigits: Any) -> Any:
    if ndigits and isinstance(number, int) and isinstance(ndigits[0], int):
        # round(5, -10**6) would compute 10**(10**6); any ndigits below -(digits + 1) gives 0
        ndigits = (max(ndigits[0], -(int(number.bit_length() * 0.30103) + 2)),)
    return round(number, *ndigits)


def _sum(items: Any, *start: Any) -> Any:
    if start and isinstance(start[0], SEQUENCES):
        # list + list, item by item, each checked and charged (Python's sum() would not be)
        total = start[0]
        for item in items:
            total = _add(total, item)
        return total
    current().charge(len(items) if hasattr(items, "__len__") else 1)
    return sum(items, *start)  # numbers only: a list, tuple or string start is a TypeError


def _extreme(func: Callable[..., Any]) -> Callable[..., Any]:
    def charged(*args: Any) -> Any:
        budget = current()
        # comparing the items costs at most their sizes together
        budget.charge(sum(budget.price(arg) for arg in args))
        return func(*args)

    return charged


FUNCTIONS: dict[str, Callable[..., Any]] = {
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


# -- evaluating one expression ------------------------------------------------------------


class _Evaluator(EvalWithCompoundTypes):
    """simpleeval, narrowed: dotted access is item lookup, only whitelisted calls by name.

    Trees reach it only through ``expressions._compile``, so every node has been checked
    already. Every node evaluated is charged to ``budget``, and the operators check what they
    would build.
    """

    budget: Budget

    def __init__(self) -> None:
        super().__init__(operators=_OPERATORS, functions={}, names={})

    def _eval(self, node: ast.AST) -> Any:
        # simpleeval also scans every intermediate result for modules and forbidden functions,
        # walking whole containers (``steps`` holds every step's output) at every node. That
        # guards values that might get called or getattr'd; here none ever are.
        budget = self.budget
        budget.work -= NODE_COST
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
        if node.id in LITERALS:
            return LITERALS[node.id]
        try:
            return self.names[node.id]
        except KeyError:
            raise ExpressionError(f"{node.id!r} is not available here") from None

    def _eval_attribute(self, node: ast.Attribute) -> Any:
        value = self._eval(node.value)
        if not isinstance(value, Mapping):
            raise ExpressionError(
                f"{ast.unparse(node.value)} is {kind(value)}, not a mapping, "
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
            problem = f"is {kind(container)}, which cannot be indexed with {key!r}"
        else:
            if isinstance(key, slice) and isinstance(value, CONTAINERS):
                return _taken_out(container, value)
            if isinstance(key, slice):
                self.budget.charge(len(value))
            return value
        raise ExpressionError(f"{ast.unparse(node.value)} {problem}")

    def _eval_call(self, node: ast.Call) -> Any:
        func = cast(ast.Name, node.func)  # only calls by name compile (expressions._compile)
        return FUNCTIONS[func.id](*[self._eval(arg) for arg in node.args])


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
_local = threading.local()  # one evaluator per thread (and one for parse-time parts)


def evaluate(
    display: str, tree: ast.expr, context: Mapping[str, Any], as_text: bool = False
) -> Any:
    """Evaluate within the current evaluation's budget; ``as_text`` formats the value too."""
    evaluator = getattr(_local, "evaluator", None)
    if evaluator is None:
        evaluator = _local.evaluator = _Evaluator()
    evaluator.names = context
    evaluator.budget = current()
    try:
        value = evaluator.eval(display, previously_parsed=tree)
        return _text(value) if as_text else value
    except _EVAL_ERRORS as exc:
        raise ExpressionError(f"expression {display!r} failed: {exc}") from exc
    finally:
        evaluator.names = {}


def evaluate_static(
    parts: Sequence[ast.expr], display: str, read_limits: Callable[[], Limits]
) -> None:
    """Evaluate parts of a tree that read no root name, raising Refused for a limit.

    Their other failures (``1 / 0``) are left to be reported where they run, as before.
    """
    evaluator = getattr(_local, "static_evaluator", None)
    if evaluator is None:
        evaluator = _local.static_evaluator = _Evaluator()
    with Evaluation(read_limits, fresh=True) as budget:
        evaluator.budget = budget
        for part in parts:
            try:
                evaluator.eval(display, previously_parsed=part)
            except Refused:
                raise
            except _EVAL_ERRORS:
                pass
