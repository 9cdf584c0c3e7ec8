"""The ``${...}`` expressions that wire a flow's steps together, and the templates holding them.

Flow definitions are data, so what they say must not be able to reach Python itself. Each
expression is parsed into an AST and checked against whitelists of node types, root names and
functions before it can run; it is then evaluated by a ``simpleeval`` subclass (:mod:`.sandbox`)
in which ``a.b`` is only ever ``a["b"]`` on a mapping (``getattr`` is never called) and only
the listed functions can be called. Templates are rendered for every step of every run, so
each distinct string is parsed once (memoised) and evaluation walks the already-checked tree.

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
    copied or compared (a character encoded as JSON costs ``ENCODE_COST``, a node evaluated
    ``NODE_COST``, both in :mod:`.budget`). One evaluation is a condition, a template, or a
    ``render()`` of a whole value (all of a step's fields).
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
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, cast

from simpleeval import DEFAULT_OPERATORS

from .budget import Evaluation, Limits, Refused, too_long
from .errors import ExpressionError
from .sandbox import FUNCTIONS, LITERALS, evaluate, evaluate_static

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
_OPENER = re.compile(r"\$\$?\{")  # "${" opens an expression; "$${" is an escaped "${"

MAX_STRING_LENGTH = 2_000_000  # characters
MAX_VALUE_SIZE = 2_000_000  # characters of its JSON text, about
MAX_INT_BITS = 14_000  # about 4214 decimal digits
MAX_WORK = 10_000_000  # units: about one per character or item
MAX_SECONDS = 1.0  # of the evaluating thread's CPU time


def configure(max_work: int | None = None, max_seconds: float | None = None) -> None:
    """Set this process's budget for one evaluation (the worker does, from its settings)."""
    global MAX_WORK, MAX_SECONDS
    if max_work is not None:
        MAX_WORK = max_work
    if max_seconds is not None:
        MAX_SECONDS = max_seconds


def _limits() -> Limits:
    """The limits as this module holds them now (``configure`` and tests change them here)."""
    return Limits(MAX_STRING_LENGTH, MAX_VALUE_SIZE, MAX_INT_BITS, MAX_WORK, MAX_SECONDS)


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
            if node.func.id not in FUNCTIONS:
                raise refuse(f"unknown function {node.func.id!r} (allowed: {_listing(FUNCTIONS)})")
            if node.keywords:
                raise refuse("keyword arguments are not allowed")
            callees.add(node.func)
        elif isinstance(node, ast.Name) and node not in callees:
            if node.id in ROOTS:
                roots.add(node.id)
            elif node.id not in LITERALS:
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
    except Refused as exc:
        raise refuse(str(exc)) from None
    return _Expression(display, tree, frozenset(roots), frozenset(refs))


def _check_static(tree: ast.expr, display: str) -> None:
    """Evaluate the parts of a tree that read no root name, raising Refused for a limit.

    Such a part has the same value on every run, so one that is over a limit now always
    will be: better refused when the definition is loaded. Its other failures (``1 / 0``)
    are left to be reported where it runs, as before.
    """
    parts = _static_parts(tree)
    if parts:
        evaluate_static(parts, display, _limits)


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
        with Evaluation(_limits) as budget:
            if self.is_expression:
                expression = cast(_Expression, self._parts[0])
                return evaluate(expression.display, expression.tree, context)
            texts = [
                part if isinstance(part, str) else evaluate(part.display, part.tree, context, True)
                for part in self._parts
            ]
            length = sum(map(len, texts))
            try:
                if length > budget.limits.MAX_STRING_LENGTH:
                    raise too_long("it", length)
                budget.charge(length)
            except Refused as exc:
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
    with Evaluation(_limits):
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
