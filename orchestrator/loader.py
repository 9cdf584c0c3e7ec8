"""Definitions in, validated resources out.

Reads YAML/JSON files, folders or text (safely; see :mod:`.yamlsource`), turns each
document into a pydantic resource, then checks what a schema cannot (:mod:`.checks`):
duplicate step ids, malformed expressions, references to steps that do not exist or do
not finish before the reader starts (which is also how a cycle shows), subflow cycles,
and limits that follow from the broker (a step's time limit must stay under the
visibility timeout). Every problem carries file, line, field path and what was expected;
all of a document's problems are reported at once.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .checks import (
    MAX_STEP_NESTING,
    check_flow,
    check_service,
    check_subscription,
    find_subflow_cycle,
    subflow_calls,
    subflow_cycle_message,
)
from .errors import DefinitionError, Problem
from .model import (
    _KIND_OF_CLASS,
    API_VERSION,
    EventSubscriptionResource,
    FlowResource,
    ScheduleResource,
    ServiceResource,
    VariableResource,
)
from .settings import Settings, get_settings
from .yamlsource import (
    SourceDoc,
    format_path,
    iter_definition_files,
    load_path,
    load_text,
    problems_from_validation_error,
)

__all__ = [
    "KINDS",
    "MAX_STEP_NESTING",
    "Loaded",
    "Resource",
    "check_flow",
    "check_subscription",
    "find_subflow_cycle",
    "load",
    "load_string",
    "parse_document",
    "subflow_calls",
    "subflow_cycle_message",
    "validate_flow",
    "version_of",
]

KINDS: dict[str, type[Resource]] = {
    "Flow": FlowResource,
    "Schedule": ScheduleResource,
    "Variable": VariableResource,
    "Service": ServiceResource,
    "EventSubscription": EventSubscriptionResource,
}

Resource = (
    FlowResource | ScheduleResource | VariableResource | ServiceResource | EventSubscriptionResource
)


@dataclass
class Loaded:
    """A validated resource and the document it came from."""

    resource: Resource
    source: SourceDoc | None

    @property
    def kind(self) -> str:
        return self.resource.kind

    @property
    def name(self) -> str:
        return self.resource.metadata.name


def load(
    paths: str | os.PathLike | Iterable[str | os.PathLike], settings: Settings | None = None
) -> list[Loaded]:
    """Every resource in the given files and folders; DefinitionError lists all problems."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    try:
        files = iter_definition_files(paths)
    except FileNotFoundError as exc:
        raise DefinitionError(str(exc)) from exc
    docs: list[SourceDoc] = []
    problems: list[Problem] = []
    max_bytes = _settings(settings).max_definition_bytes
    for f in files:
        try:
            docs.extend(load_path(f, max_bytes))
        except DefinitionError as exc:
            problems.extend(exc.problems)
    return _build(docs, problems, settings)


def load_string(
    text: str, file: str | None = None, settings: Settings | None = None
) -> list[Loaded]:
    """Every resource in a YAML/JSON text."""
    return _build(load_text(text, file, _settings(settings).max_definition_bytes), [], settings)


def _settings(settings: Settings | None) -> Settings:
    """The settings given, or the process's (read when a definition is, not at import)."""
    return settings if settings is not None else get_settings()


def _build(
    docs: list[SourceDoc], problems: list[Problem], settings: Settings | None
) -> list[Loaded]:
    out: list[Loaded] = []
    seen: dict[tuple[str, str], SourceDoc] = {}
    for doc in docs:
        loaded = parse_document(doc, problems, settings)
        if loaded is None:
            continue
        ident = (loaded.kind, loaded.name)
        if ident in seen:
            first = seen[ident]
            problems.append(
                Problem(
                    f"{loaded.kind} {loaded.name!r} is defined twice (first at "
                    f"{first.file or '<text>'}:{first.line})",
                    doc.file,
                    doc.line,
                    "metadata.name",
                )
            )
            continue
        seen[ident] = doc
        out.append(loaded)
    if not problems:
        problems += _cycle_problems(out)
    if problems:
        raise DefinitionError(problems)
    return out


def _cycle_problems(loaded: list[Loaded]) -> list[Problem]:
    """A subflow cycle among flows loaded together, at the step that closes it."""
    flows = {lr.name: lr for lr in loaded if isinstance(lr.resource, FlowResource)}
    calls = {name: subflow_calls(lr.resource) for name, lr in flows.items()}  # type: ignore[arg-type]
    cycle = find_subflow_cycle({name: set(c) for name, c in calls.items()})
    if cycle is None:
        return []
    path = calls[cycle[0]][cycle[1]]
    source = flows[cycle[0]].source
    return [
        Problem(
            subflow_cycle_message(cycle),
            source.file if source else None,
            source.line_of(path) if source else None,
            format_path(path),
        )
    ]


def parse_document(
    doc: SourceDoc, problems: list[Problem], settings: Settings | None = None
) -> Loaded | None:
    """One document to a resource, appending what is wrong to ``problems``."""
    data = doc.data
    if not isinstance(data, dict):
        problems.append(
            Problem(
                "expected a mapping (a resource with apiVersion, kind, metadata, spec)",
                doc.file,
                doc.line,
            )
        )
        return None
    if data.get("apiVersion") != API_VERSION:
        problems.append(
            Problem(
                f"expected apiVersion {API_VERSION!r}, got {data.get('apiVersion')!r}",
                doc.file,
                doc.line_of(("apiVersion",)),
                "apiVersion",
            )
        )
        return None
    model = KINDS.get(data.get("kind"))  # type: ignore[arg-type]
    if model is None:
        problems.append(
            Problem(
                f"expected kind to be one of {', '.join(KINDS)}; got {data.get('kind')!r}",
                doc.file,
                doc.line_of(("kind",)),
                "kind",
            )
        )
        return None
    try:
        resource = model.model_validate(data)
    except ValidationError as exc:
        typos = _step_kind_problems(exc, doc)
        covered = {step_path for step_path, _ in typos}
        problems.extend(problem for _, problem in typos)
        problems.extend(
            p
            for p in problems_from_validation_error(
                exc, doc, known_fields=functools.partial(_known_fields, model)
            )
            if not (p.message.startswith("a step needs exactly one") and p.path in covered)
        )
        return None
    if isinstance(resource, FlowResource):
        found = check_flow(resource, settings)
    elif isinstance(resource, EventSubscriptionResource):
        found = check_subscription(resource)
    elif isinstance(resource, ServiceResource):
        found = check_service(resource)
    else:
        found = []
    for path, message in found:
        problems.append(Problem(message, doc.file, doc.line_of(path), format_path(path)))
    return None if found else Loaded(resource, doc)


def validate_flow(resource: FlowResource, settings: Settings | None = None) -> None:
    """Raise DefinitionError if a flow built in Python (the DSL) breaks a rule."""
    found = check_flow(resource, settings)
    if found:
        raise DefinitionError([Problem(m, None, None, format_path(p)) for p, m in found])


def version_of(resource: Resource) -> str:
    """A definition's version: a hash of its canonical JSON (same text, same version)."""
    doc = resource.document()
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- better messages for step typos -------------------------------------------------------

_TAG_MODELS = {tag: cls for cls, tag in _KIND_OF_CLASS.items()}
_STEP_FIELDS = {
    alias
    for cls in _TAG_MODELS.values()
    for name, info in cls.model_fields.items()
    for alias in (info.alias or name,)
}


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The fields allowed where an unknown one was found (for "did you mean").

    Walks ``loc`` (pydantic's error location, ending at the unknown field) down from the
    document's model: list indexes and dict keys are stepped over, and a step tag
    (``task``, ``http``...) right after a step list picks that step's model.
    """
    current: Any = model
    for part in loc:
        if current is _STEP or (current is None and part in _TAG_MODELS):
            current = _TAG_MODELS.get(part) if isinstance(part, str) else _STEP
            continue
        if isinstance(part, int) or current is None or not hasattr(current, "model_fields"):
            continue
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)),
            None,
        )
        current = _model_in(field.annotation) if field is not None else None
    if current is None or current is _STEP or not hasattr(current, "model_fields"):
        return []
    return [info.alias or name for name, info in current.model_fields.items()]


_STEP = object()  # "a step of some kind": the next part of the location is its tag


def _model_in(annotation: Any) -> Any:
    """The model inside a field's type (through Optional, list, dict, Annotated), or _STEP."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = typing.get_args(annotation)
    if any(a in _KIND_OF_CLASS for a in _flatten(args)):
        return _STEP
    for arg in args:
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _flatten(args: tuple) -> list[Any]:
    out: list[Any] = []
    for a in args:
        out.append(a)
        out += _flatten(typing.get_args(a))
    return out


def _step_kind_problems(exc: ValidationError, doc: SourceDoc) -> list[tuple[str, Problem]]:
    """A step with no kind usually has a misspelt kind field: name it and suggest one.

    Returns (path of the step, problem) pairs; the generic "needs exactly one kind"
    message is dropped for the steps these explain.
    """
    out = []
    for error in exc.errors(include_url=False):
        value = error["input"]
        if error["type"] != "step_kind" or not isinstance(value, dict):
            continue
        loc = tuple(error["loc"])
        for key in (k for k in value if k not in _STEP_FIELDS):
            close = difflib.get_close_matches(key, _STEP_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(
                (
                    format_path(loc),
                    Problem(
                        f"unknown field {key!r}{hint}",
                        doc.file,
                        doc.line_of((*loc, key)),
                        format_path((*loc, key)),
                    ),
                )
            )
    return out
