"""The ``${...}`` expressions that wire a flow's steps together, and the templates holding them.

Flow definitions are data, so what they say must not be able to reach Python itself. Each
expression is parsed into an AST and checked against whitelists of node types, root names and
functions before it can run; it is then evaluated by a ``simpleeval`` subclass in which ``a.b``
is only ever ``a["b"]`` on a mapping (``getattr`` is never called) and only the listed functions
can be called. Templates are rendered for every step of every run, so each distinct string is
parsed once (memoised) and evaluation walks the already-checked tree.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from simpleeval import DEFAULT_OPERATORS, EvalWithCompoundTypes, InvalidExpression

from .errors import ExpressionError

__all__ = [
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


# -- values and the whitelisted functions -------------------------------------------------


def _kind(value: Any) -> str:
    """Describe a value's type for an error message: "null", "a str", "an int"."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _text(value: Any) -> str:
    """Format a value into text: JSON-style for null, booleans, lists and dicts."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _expect(value: Any, types: type | tuple[type, ...], func: str, what: str) -> None:
    if not isinstance(value, types):
        raise TypeError(f"{func}() needs {what}, got {_kind(value)}")


def _lower(s: Any) -> str:
    _expect(s, str, "lower", "a string")
    return s.lower()


def _upper(s: Any) -> str:
    _expect(s, str, "upper", "a string")
    return s.upper()


def _join(items: Any, sep: Any) -> str:
    _expect(items, (list, tuple), "join", "a list")
    _expect(sep, str, "join", "a string separator")
    return sep.join(_text(item) for item in items)


def _keys(mapping: Any) -> list[Any]:
    _expect(mapping, Mapping, "keys", "a mapping")
    return list(mapping)


def _values(mapping: Any) -> list[Any]:
    _expect(mapping, Mapping, "values", "a mapping")
    return list(mapping.values())


def _contains(container: Any, item: Any) -> bool:
    return item in container


def _default(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


_FUNCTIONS = {
    "len": len,
    "str": _text,  # so that str(x) reads the same as "${x}" inside text
    "int": int,
    "float": float,
    "bool": bool,
    "abs": abs,
    "min": min,
    "max": max,
    "sum": sum,
    "round": round,
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
    return _Expression(display, tree, frozenset(roots), frozenset(refs))


def _is_steps(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "steps"


def _listing(names: Mapping[str, Any] | frozenset[str]) -> str:
    return ", ".join(sorted(names))


# -- evaluating one expression ------------------------------------------------------------


class _Evaluator(EvalWithCompoundTypes):
    """simpleeval, narrowed: dotted access is item lookup, only whitelisted calls by name.

    Trees reach it only through ``_compile``, so every node has been checked already.
    """

    def __init__(self) -> None:
        super().__init__(functions={}, names={})

    def _eval(self, node: ast.AST) -> Any:
        # simpleeval also scans every intermediate result for modules and forbidden functions,
        # walking whole containers (``steps`` holds every step's output) at every node. That
        # guards values that might get called or getattr'd; here none ever are.
        return self.nodes[type(node)](node)

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
            return container[key]
        except KeyError:
            problem = f"has no field {key!r}"
        except IndexError:
            problem = f"has no index {key!r} (its length is {len(container)})"
        except TypeError:
            problem = f"is {_kind(container)}, which cannot be indexed with {key!r}"
        raise ExpressionError(f"{ast.unparse(node.value)} {problem}")

    def _eval_call(self, node: ast.Call) -> Any:
        return _FUNCTIONS[node.func.id](*[self._eval(arg) for arg in node.args])


_EVAL_ERRORS = (
    ExpressionError,
    InvalidExpression,  # simpleeval's limits: NumberTooHigh, IterableTooLong
    ArithmeticError,
    LookupError,
    TypeError,
    ValueError,
    RecursionError,
)
_local = threading.local()  # one evaluator per thread: it holds the context while it runs


def _evaluate(expression: _Expression, context: Mapping[str, Any]) -> Any:
    evaluator = getattr(_local, "evaluator", None)
    if evaluator is None:
        evaluator = _local.evaluator = _Evaluator()
    evaluator.names = context
    try:
        return evaluator.eval(expression.display, previously_parsed=expression.tree)
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
        if self.is_expression:
            return _evaluate(self._parts[0], context)
        return "".join(
            part if isinstance(part, str) else _text(_evaluate(part, context))
            for part in self._parts
        )

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
    """Evaluate every string in a nested value (dict values, list items); keys stay as they are."""
    if isinstance(value, str):
        return parse_template(value).evaluate(context) if "${" in value else value
    if isinstance(value, dict):
        return {key: render(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, context) for item in value]
    if isinstance(value, tuple):
        return tuple(render(item, context) for item in value)
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
