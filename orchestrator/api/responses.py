"""How the API writes JSON: its own renderer, error bodies, and runs read back from Redis.

Responses are written by :func:`render_json`, never by FastAPI's encoder: a stored value
that JSON cannot carry (from before the limits: nested too deep to read, a lone
surrogate, NaN) is shown as a marker string and named in the run's ``notes``, so one bad
run cannot break a run list or a run page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response

from ..client import Client, Run
from ..errors import NotFound

#: ``Retry-After`` (seconds) of a 503 answered while Redis or the broker cannot be reached.
RETRY_AFTER_S = 5
#: A response nests at most this deep; anything deeper (a value stored before the
#: limits) is a marker string. It keeps json.dumps well inside the recursion limit.
RENDER_MAX_NESTING = 512

#: What json.dumps raises for a value JSON cannot carry (UnicodeEncodeError is a ValueError).
_UNRENDERABLE = (RecursionError, ValueError, TypeError)


def _dumps(value: Any) -> bytes:
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=jsonable_encoder
    ).encode("utf-8")


def _note(notes: list[dict[str, str]], path: str, why: str) -> str:
    notes.append({"field": path or "(value)", "message": f"{why}: not shown"})
    return f"<not shown: {why}>"


def _text(text: str, path: str, notes: list[dict[str, str]]) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        notes.append(
            {"field": path or "(value)", "message": "holds a lone surrogate: shown escaped"}
        )
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def sanitize(value: Any, path: str, notes: list[dict[str, str]], max_nesting: int) -> Any:
    """A copy of ``value`` that JSON can carry, each replacement named in ``notes``.

    Lists and objects nested ``max_nesting`` deep become a marker string, lone
    surrogates are written escaped (``\\ud800``), NaN and infinities become markers.
    Iterative, so no depth is too deep for it.
    """
    root: list[Any] = [None]
    stack: list[tuple[Any, str, int, Any, Any]] = [(value, path, 0, root, 0)]
    while stack:
        v, p, depth, parent, slot = stack.pop()
        if isinstance(v, dict | list | tuple):
            if depth >= max_nesting:
                parent[slot] = _note(notes, p, f"nested more than {max_nesting} levels deep")
            elif isinstance(v, dict):
                keys = [_text(str(k), f"{p} (a key)", notes) for k in v]
                child: Any = dict.fromkeys(keys)
                parent[slot] = child
                for k, item in zip(keys, v.values(), strict=True):
                    stack.append((item, f"{p}.{k}" if p else k, depth + 1, child, k))
            else:
                child = [None] * len(v)
                parent[slot] = child
                stack.extend((item, f"{p}[{i}]", depth + 1, child, i) for i, item in enumerate(v))
        elif isinstance(v, str):
            parent[slot] = _text(v, p, notes)
        elif isinstance(v, float) and not math.isfinite(v):
            parent[slot] = _note(notes, p, f"{v!r}, which JSON cannot carry")
        elif v is None or isinstance(v, bool | int | float):
            parent[slot] = v
        else:
            try:
                parent[slot] = jsonable_encoder(v)
            except Exception:  # noqa: BLE001 - whatever it is, it is not shown
                parent[slot] = _note(notes, p, f"a {type(v).__name__}, not JSON")
    return root[0]


def render_json(content: Any) -> bytes:
    """``content`` as JSON; what JSON cannot carry is replaced (see :func:`sanitize`)."""
    try:
        return _dumps(content)
    except _UNRENDERABLE:
        notes: list[dict[str, str]] = []
        clean = sanitize(content, "", notes, RENDER_MAX_NESTING)
        if isinstance(clean, dict):
            clean["notes"] = [*(clean.get("notes") or []), *notes]
        return _dumps(clean)


#: The ``response_model`` of the routes, for the docs only: handlers return a
#: :class:`JSONBody`, never a dict for FastAPI's encoder, which recurses and fails on
#: values that JSON cannot carry.
OBJ = dict[str, Any]


class JSONBody(Response):
    """A JSON response written by :func:`render_json` (bytes are sent as they are)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else render_json(content)


def error_body(
    code: int, error: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONBody:
    """The API's error body: ``{"error": ..., "message": ..., **extra}``."""
    return JSONBody({"error": error, "message": message, **extra}, code, headers=headers)


def unavailable(message: str, **extra: Any) -> JSONBody:
    """A 503 that tells the caller when to try again (Redis or the broker is down)."""
    return error_body(
        503, "unavailable", message, headers={"Retry-After": str(RETRY_AFTER_S)}, **extra
    )


#: Run hash fields the client decodes as JSON (see ``Client._run_from_hash``).
_RUN_JSON_FIELDS = ("inputs", "outputs", "error")


def _hash_field(name: str) -> str:
    """Where a run hash field shows in the run's JSON (``o:upper`` -> ``steps.upper.output``)."""
    if name.startswith("o:"):
        return f"steps.{name[2:]}.output"
    if name.startswith("s:"):
        return f"steps.{name[2:]}"
    return name


def read_run(client: Client, run_id: str) -> tuple[Run, list[dict[str, str]]]:
    """The run, and notes on stored values that could not be read back.

    A value nested deeper than ``json.loads`` can read (stored before the nesting
    limit) or not JSON at all is replaced by a marker, not raised for the whole run.
    """
    try:
        return client.get(run_id), []
    except (RecursionError, ValueError):
        pass
    raw = client.store.run_hash(run_id)
    if not raw:
        raise NotFound(f"run {run_id!r} does not exist (or has passed its retention)")
    notes: list[dict[str, str]] = []
    readable = dict(raw)
    for name, text in raw.items():
        if not text or not (name in _RUN_JSON_FIELDS or name.startswith(("s:", "o:"))):
            continue
        try:
            json.loads(text)
        except RecursionError:
            why = "stored nested too deep to read"
        except ValueError as exc:
            why = f"stored as text that is not JSON ({exc})"
        else:
            continue
        marker = _note(notes, _hash_field(name), why)
        readable[name] = json.dumps({"status": "unknown"} if name.startswith("s:") else marker)
    return client._run_from_hash(readable), notes


def run_json(run: Run, max_nesting: int, notes: list[dict[str, str]] | None = None) -> bytes:
    """One run as JSON; values JSON cannot carry become markers named in ``notes``."""
    doc = run.as_dict()
    notes = list(notes or [])
    if notes:
        doc["notes"] = notes
    try:
        return _dumps(doc)
    except _UNRENDERABLE:
        pass
    for key in _RUN_JSON_FIELDS:
        doc[key] = sanitize(doc.get(key), key, notes, max_nesting)
    for name, step in doc["steps"].items():
        for key in ("input", "output", "error"):
            step[key] = sanitize(step.get(key), f"steps.{name}.{key}", notes, max_nesting)
    doc.pop("notes", None)
    doc = sanitize(doc, "", notes, max_nesting + 4)  # the rest: ids, statuses, step records
    doc["notes"] = notes
    return _dumps(doc)
