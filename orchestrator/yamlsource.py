"""Load definition documents safely, remembering where every value came from.

Definitions are YAML (or JSON) files, possibly several documents apart by ``---``, and every
mistake in them must be reported with its file, line, field path and what was expected.
``yaml.safe_load`` throws the positions away, keeps the last of two duplicate keys without a
word, turns a key ``on:`` into ``True`` and expands alias bombs without limit.  So this module
composes the documents with PyYAML's ``SafeLoader`` (never a loader that can build Python
objects), builds the plain values itself from the node tree while recording the line of every
mapping key and sequence item, and translates pydantic's ``ValidationError`` into
:class:`~orchestrator.errors.Problem` objects that point at the real place in the file.

What a definition may cost is bounded before anything big or recursive runs: a size limit
(``max_bytes``, checked before a file is read in full), a nesting limit
(:data:`MAX_NESTING`, checked while YAML is composed and, for JSON, by a scan of the text
before ``json.loads``), and a limit on what aliases may expand to (:data:`MAX_ALIAS_NODES`).
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pydantic
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import DefinitionError, Problem

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_NESTING",
    "SourceDoc",
    "format_path",
    "iter_definition_files",
    "load_path",
    "load_text",
    "problems_from_validation_error",
]

KeyPath = tuple[str | int, ...]

#: How many nodes alias expansion may add to one document before it is refused.
MAX_ALIAS_NODES = 10_000
#: Deepest nesting of mappings and lists in one document (the document itself is level 1).
#: Deeper ones are refused before any recursive code (composer, json, pydantic) sees them.
MAX_NESTING = 100
DEFINITION_SUFFIXES = (".yaml", ".yml", ".json")

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null")}
_TEXT_TAGS = {_TAG + "timestamp", _TAG + "value"}  # kept as written: plain data has no dates
_MERGE = _TAG + "merge"
_KEY_WORDS = {"on", "off"}  # YAML 1.1 booleans that are common key names ("on:" triggers)


@dataclass
class SourceDoc:
    """One document of a definition file: its plain data and the line of each path in it."""

    data: Any
    file: str | None
    index: int
    line: int
    lines: dict[tuple, int] = field(default_factory=dict)

    def line_of(self, path: Sequence[str | int]) -> int:
        """Line of the longest known prefix of ``path`` (a missing field: its parent's line)."""
        path = tuple(path)
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return self.lines.get((), self.line)


def format_path(path: Sequence[str | int]) -> str:
    """``("spec", "steps", 0, "with", "x")`` -> ``"spec.steps[0].with.x"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[\w$-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


# --------------------------------------------------------------------------- loading


class _SyntaxError(DefinitionError):
    """The text is not YAML at all (as opposed to YAML with a structural problem)."""


class _Refused(Exception):
    """Building this document must stop; ``problem`` says why."""

    def __init__(self, problem: Problem):
        self.problem = problem


class _TooDeep(Exception):
    """The composer reached a collection nested deeper than :data:`MAX_NESTING`."""

    def __init__(self, line: int):
        self.line = line


def _too_deep(file: str | None, line: int | None, path: str = "") -> Problem:
    return Problem(
        f"the document is nested more than {MAX_NESTING} levels deep (mappings and lists); "
        "refusing it",
        file,
        line,
        path,
    )


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` whose composer refuses to go deeper than :data:`MAX_NESTING`.

    PyYAML's parser is iterative but its composer recurses once per level, so without
    this a deep document is a ``RecursionError`` (or a crash) instead of a problem.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


class _Builder:
    """Turns one composed document into plain values and a path -> line map."""

    def __init__(self, loader: yaml.SafeLoader, file: str | None):
        self.loader, self.file = loader, file
        self.lines: dict[tuple, int] = {}
        self.problems: list[Problem] = []
        self.seen: set[int] = set()  # nodes built once; building one again is alias expansion
        self.active: set[int] = set()  # collections being built (a repeat is a recursive alias)
        self.expanded = 0

    def problem(self, message: str, node: Node, path: KeyPath) -> Problem:
        return Problem(message, self.file, node.start_mark.line + 1, format_path(path))

    def build(self, node: Node, path: KeyPath, line: int) -> Any:
        self.lines[path] = line
        if id(node) in self.seen:
            self.expanded += 1
            if self.expanded > MAX_ALIAS_NODES:
                message = f"aliases expand to over {MAX_ALIAS_NODES} nodes; refusing the document"
                raise _Refused(Problem(message, self.file, self.lines[()]))
        self.seen.add(id(node))
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            raise _Refused(self.problem("an alias refers to a node that contains it", node, path))
        if len(path) >= MAX_NESTING:  # the composer checked; an alias can still go deeper
            raise _Refused(_too_deep(self.file, node.start_mark.line + 1, format_path(path)))
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode) and node.tag == _TAG + "seq":
                return [
                    self.build(item, (*path, i), item.start_mark.line + 1)
                    for i, item in enumerate(node.value)
                ]
            if isinstance(node, MappingNode) and node.tag == _TAG + "map":
                return self.mapping(node, path)
            self.problems.append(self.unsupported(node, path))
            return None
        finally:
            self.active.discard(id(node))

    def unsupported(self, node: Node, path: KeyPath) -> Problem:
        return self.problem(
            f"unsupported tag {_tag_name(node.tag)!r}: only plain YAML values "
            "(mappings, lists, strings, numbers, booleans, null) are allowed",
            node,
            path,
        )

    def scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        if node.tag in _TEXT_TAGS:
            return node.value
        if node.tag in _SCALAR_TAGS:
            try:
                return self.loader.construct_object(node)
            except (ValueError, KeyError, yaml.YAMLError):  # e.g. "!!int abc"
                message = f"cannot read {node.value!r} as {_tag_name(node.tag)}"
                self.problems.append(self.problem(message, node, path))
                return None
        self.problems.append(self.unsupported(node, path))
        return None

    def key(self, node: Node, path: KeyPath) -> str:
        """The key as written; a key YAML reads as a non-string (``1:``, ``yes:``) is a problem."""
        if not isinstance(node, ScalarNode):
            message = "keys must be strings, not a mapping or a list"
            self.problems.append(self.problem(message, node, path))
            return f"<key at line {node.start_mark.line + 1}>"
        if node.tag in _TEXT_TAGS or node.tag == _TAG + "str":
            return node.value
        if node.style is None and node.value.lower() in _KEY_WORDS:
            return node.value  # "on:" stays "on", not True
        value = self.scalar(node, path)
        shown = f"{_kind(value)} {_show(value)}".rstrip()
        message = f"key {node.value!r} is read as {shown}; keys must be strings (quote it)"
        self.problems.append(self.problem(message, node, (*path, node.value)))
        return node.value

    def mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        # ``<<: *base`` merges first (earlier sources win), then the mapping's own keys.
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                continue
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in reversed(sources):
                if not isinstance(source, MappingNode):
                    self.problems.append(
                        self.problem(
                            "'<<' must merge a mapping or a list of mappings", source, path
                        )
                    )
                    continue
                line = self.lines.get(path, source.start_mark.line + 1)
                result.update(self.build(source, path, line) or {})
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            key, line = self.key(key_node, path), key_node.start_mark.line + 1
            if key in first_line:
                self.problems.append(
                    self.problem(
                        f"duplicate key {key!r} (first at line {first_line[key]}, again at line "
                        f"{line})",
                        key_node,
                        (*path, key),
                    )
                )
            first_line.setdefault(key, line)
            result[key] = self.build(value_node, (*path, key), line)
        return result


def _is_empty(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null" and node.value == ""


def _not_a_mapping(data: Any, file: str | None, line: int) -> Problem:
    return Problem(
        f"expected a mapping (a resource with apiVersion, kind, metadata, spec), got {_kind(data)}",
        file,
        line,
    )


def _syntax_error(err: yaml.YAMLError, file: str | None) -> _SyntaxError:
    if isinstance(err, yaml.MarkedYAMLError):
        message = f"invalid YAML: {err.problem or err.context}"
        if err.problem and err.context:
            where = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
            message += f" ({err.context}{where})"
        mark = err.problem_mark or err.context_mark
        return _SyntaxError([Problem(message, file, mark.line + 1 if mark else None)])
    return _SyntaxError([Problem(f"invalid YAML: {err}", file)])


def _size_problem(size: int, max_bytes: int, file: str | None, what: str) -> Problem:
    return Problem(
        f"the {what} is {size:,} bytes, over the limit of {max_bytes:,} "
        "(ORCHESTRATOR_MAX_DEFINITION_BYTES)",
        file,
    )


def _check_text_size(text: str, file: str | None, max_bytes: int | None) -> None:
    if max_bytes is None or len(text) * 4 <= max_bytes:  # UTF-8 is at most 4 bytes a character
        return
    size = len(text) if len(text) > max_bytes else len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise DefinitionError([_size_problem(size, max_bytes, file, "definition")])


def load_text(text: str, file: str | None = None, max_bytes: int | None = None) -> list[SourceDoc]:
    """Every non-empty document of ``text``; raises :class:`DefinitionError` with all problems.

    ``max_bytes``: a text longer than this (in UTF-8) is refused before it is parsed.
    """
    _check_text_size(text, file, max_bytes)
    loader = _Loader(text)
    docs: list[SourceDoc] = []
    problems: list[Problem] = []
    index = 0
    try:
        while loader.check_node():
            node = cast(Node, loader.get_node())  # check_node(): there is one
            index += 1
            if _is_empty(node):
                continue
            line = node.start_mark.line + 1
            builder = _Builder(loader, file)
            try:
                data = builder.build(node, (), line)
            except _Refused as refused:
                problems.append(refused.problem)
                continue
            except RecursionError:
                problems.append(Problem("the document is nested too deeply", file, line))
                continue
            problems += builder.problems
            if not isinstance(data, dict):
                problems.append(_not_a_mapping(data, file, line))
                continue
            docs.append(SourceDoc(data, file, index - 1, line, builder.lines))
    except _TooDeep as deep:
        problems.append(_too_deep(file, deep.line))
    except yaml.YAMLError as err:
        raise _syntax_error(err, file) from None
    except RecursionError:
        raise _SyntaxError([Problem("the document is nested too deeply", file)]) from None
    finally:
        loader.dispose()
    if problems:
        raise DefinitionError(problems)
    return docs


#: A JSON string (escapes included; an unterminated one runs to the end) or a bracket: what
#: the nesting scan looks at. Possessive, so no input makes it backtrack.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)


def _json_too_deep(text: str) -> int | None:
    """The line where ``text`` nests deeper than :data:`MAX_NESTING`, if it does.

    A scan of brackets outside strings, so ``json.loads`` (which recurses per level) never
    sees a document too deep for it.
    """
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return text.count("\n", 0, match.start()) + 1
        elif token in "]}":
            depth -= 1
    return None


def _load_json(text: str, file: str | None) -> list[SourceDoc]:
    """JSON through the YAML path for lines, but with JSON's own reading of the values."""
    deep_at = _json_too_deep(text)
    if deep_at is not None:
        raise DefinitionError([_too_deep(file, deep_at)])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DefinitionError([Problem(f"invalid JSON: {err.msg}", file, err.lineno)]) from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        reason = str(err).split(";")[0]
        raise DefinitionError([Problem(f"invalid JSON: {reason}", file)]) from None
    try:
        docs = load_text(text, file)  # also reports duplicate keys, which json.loads hides
    except _SyntaxError:  # YAML 1.1 misreads a little JSON (e.g. "\/"): no lines beyond line 1
        docs = [SourceDoc(data, file, 0, 1, {(): 1})]
    if not isinstance(data, dict):
        raise DefinitionError([_not_a_mapping(data, file, 1)])
    docs[0].data = data  # e.g. 1e5 is a number in JSON but a string in YAML 1.1
    return docs[:1]


def load_path(path: str | os.PathLike[str], max_bytes: int | None = None) -> list[SourceDoc]:
    """Every document of a YAML or JSON file; raises :class:`DefinitionError` if unreadable.

    ``max_bytes``: a bigger file is refused before it is read (a pipe or device, whose
    size is not known, is read up to one byte over the limit).
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
            if max_bytes is not None and regular and size > max_bytes:
                raise DefinitionError([_size_problem(size, max_bytes, file, "file")])
            raw = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(raw) > max_bytes:
            raise DefinitionError(
                [
                    Problem(
                        f"the file is over the limit of {max_bytes:,} bytes "
                        "(ORCHESTRATOR_MAX_DEFINITION_BYTES)",
                        file,
                    )
                ]
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason})"
        raise DefinitionError([Problem(f"cannot read the file: {reason}", file)]) from err
    if file.lower().endswith(".json"):
        return _load_json(text, file)
    return load_text(text, file)


def iter_definition_files(paths: Iterable[str | os.PathLike[str]]) -> list[pathlib.Path]:
    """The files named, plus the ``*.yaml``/``*.yml``/``*.json`` files under each folder named.

    Folders are searched recursively, skipping hidden files and folders, in sorted order; each
    file appears once.  A path that does not exist raises :class:`DefinitionError`.
    """
    found: dict[pathlib.Path, None] = {}
    for given in paths:
        path = pathlib.Path(given)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                parts = child.relative_to(path).parts
                if (
                    child.is_file()
                    and child.suffix.lower() in DEFINITION_SUFFIXES
                    and not any(p.startswith(".") for p in parts)
                ):
                    found[child] = None
        elif path.exists():
            found[path] = None
        else:
            raise DefinitionError([Problem("no such file or folder", os.fspath(given))])
    return list(found)


# --------------------------------------------------------------------------- validation errors

_ABSENT = object()
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean (true or false)",
    "bool_parsing": "a boolean (true or false)",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "iterable_type": "a list",
    "none_required": "null",
}
_MISSING = {"missing", "missing_keyword_argument", "missing_argument"}


def _kind(value: Any) -> str:
    """How YAML would call the type of ``value``."""
    for kind, types in (
        ("null", type(None)),
        ("a boolean", bool),
        ("an integer", int),
        ("a number", float),
        ("a string", str),
        ("a list", list),
        ("a mapping", dict),
    ):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _show(value: Any) -> str:
    """A short YAML-ish rendering of a scalar (nothing for collections and null)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, int | float):
        return repr(value)
    return ""


def _child(value: Any, key: Any) -> Any:
    if isinstance(value, dict) and isinstance(key, str) and key in value:
        return value[key]
    if (
        isinstance(value, list)
        and isinstance(key, int)
        and not isinstance(key, bool)
        and 0 <= key < len(value)
    ):
        return value[key]
    return _ABSENT


def _real_path(data: Any, loc: Sequence[str | int], keep_missing_last: bool) -> KeyPath:
    """The elements of ``loc`` that really index into ``data`` (pydantic adds union tags).

    Keeps as many elements as possible; on a tie, keeps the later ones (a tag may equal a key,
    as in ``("steps", 0, "task", "task")``).  Memoised, so it stays linear-ish in ``len(loc)``.
    """
    memo: dict[tuple[int, int], tuple[int, ...]] = {}

    def best(i: int, value: Any) -> tuple[int, ...]:
        """The best indexes of ``loc[i:]`` to keep, starting from ``value``."""
        if i == len(loc):
            return ()
        if (i, id(value)) not in memo:
            options = [best(i + 1, value)]  # drop loc[i]
            child = _child(value, loc[i])
            if child is not _ABSENT:
                options.append((i, *best(i + 1, child)))
            elif keep_missing_last and i == len(loc) - 1 and isinstance(value, dict):
                options.append((i,))  # the missing field itself
            memo[i, id(value)] = max(options, key=lambda kept: (len(kept), kept[::-1]))
        return memo[i, id(value)]

    return tuple(loc[i] for i in best(0, data))


def _one_of(expected: str) -> str:
    """Pydantic's "'a', 'b' or 'c'" -> "one of 'a', 'b', 'c'" (and "'a'" stays "'a'")."""
    head, sep, tail = expected.rpartition(" or ")
    return f"one of {head}, {tail}" if sep else expected


def _type_message(wanted: list[str], value: Any) -> str:
    message = f"expected {' or '.join(wanted)}, got {_kind(value)} {_show(value)}".rstrip()
    if "a string" in wanted and _show(value) and not isinstance(value, str):
        message += " (quote the value to keep it as text)"
    return message


def _message(
    error: Any, path: KeyPath, known: Callable[[tuple], Iterable[str]] | None
) -> tuple[str, KeyPath]:
    """A helpful message for one pydantic error, and the path it is about."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    name = str(path[-1]) if path else ""
    if kind == "extra_forbidden":
        message = f"unknown field {name!r}"
        if known is not None:
            allowed = [f for f in known(tuple(error["loc"][:-1])) if f != name]
            close = difflib.get_close_matches(name, allowed, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        return message, path
    if kind in _MISSING:
        return f"required field {name!r} is missing", path
    if kind in ("literal_error", "enum"):
        got = _show(value) or _kind(value)
        return f"expected {_one_of(ctx['expected'])}; got {got}", path
    tag_field = str(ctx.get("discriminator", "")).strip("'")
    if kind.startswith("union_tag_") and re.fullmatch(r"[\w-]+", tag_field):
        if kind == "union_tag_not_found":
            return f"required field {tag_field!r} is missing", (*path, tag_field)
        got = _show(ctx.get("tag")) or _kind(ctx.get("tag"))
        return f"expected one of {ctx['expected_tags']}; got {got}", (*path, tag_field)
    if kind in _EXPECTED:
        return _type_message([_EXPECTED[kind]], value), path
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message, path


def problems_from_validation_error(
    err: pydantic.ValidationError,
    doc: SourceDoc,
    base_path: Sequence[str | int] = (),
    known_fields: Callable[[tuple], Iterable[str]] | None = None,
) -> list[Problem]:
    """One :class:`Problem` per error, with the real path in ``doc``, its line and a clear message.

    ``err`` comes from validating the value at ``base_path`` in ``doc.data``.  ``known_fields``,
    if given, is called with pydantic's ``loc`` of the mapping holding an unknown field (union
    tags included, ``base_path`` not) and returns its allowed field names, for "did you mean".
    Type errors for the same path (the members of a plain union) are merged into one problem.
    """
    base = tuple(base_path)
    root: Any = doc.data
    for part in base:
        root = _child(root, part)
    problems: list[Problem] = []
    seen: set[tuple[KeyPath, str]] = set()
    wanted_at: dict[KeyPath, tuple[Problem, list[str]]] = {}
    for error in err.errors(include_url=False):
        kind, loc = error["type"], error["loc"]
        path = tuple(loc) if root is _ABSENT else _real_path(root, loc, kind in _MISSING)
        message, path = _message(error, path, known_fields)
        full = (*base, *path)
        if kind in _EXPECTED and full in wanted_at:  # another member of a plain union
            problem, wanted = wanted_at[full]
            if _EXPECTED[kind] not in wanted:
                wanted.append(_EXPECTED[kind])
                problem.message = _type_message(wanted, error.get("input"))
            continue
        if (full, message) in seen:
            continue
        seen.add((full, message))
        problem = Problem(message, doc.file, doc.line_of(full), format_path(full))
        if kind in _EXPECTED:
            wanted_at[full] = (problem, [_EXPECTED[kind]])
        problems.append(problem)
    return problems
