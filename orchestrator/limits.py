"""Checks of JSON values against the size and nesting limits (README "Limits").

Every value that a client or a step hands the orchestrator (trigger inputs, step outputs,
signal payloads, decisions) is checked here before it is stored, so a value too big,
too deep or not encodable is refused with the limit's name instead of being stored and
breaking whatever reads it later (a response that cannot be serialised, a list page
that fails for everyone).

The walk is iterative: a value nested deeper than the interpreter's recursion limit is
refused, not a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import LimitExceeded

#: Where a path of a value is written as ``inputs.a[3].b``.
_Path = str


def check_value(
    value: Any, field: str, *, max_bytes: int, max_nesting: int, size_limit: str
) -> str:
    """``value`` encoded as compact JSON, after checking nesting, encoding and size.

    Raises :class:`LimitExceeded` naming the first offending place (``field`` and the
    path below it) and the setting that limits it (``max_nesting``, ``size_limit``).
    """
    _check_shape(value, field, max_nesting)
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LimitExceeded(field, f"is not JSON: {exc}") from None
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise LimitExceeded(
            field, f"is {size:,} bytes of JSON, over the limit of {max_bytes:,}", size_limit
        )
    return text


def _check_shape(value: Any, field: str, max_nesting: int) -> None:
    stack: list[tuple[Any, _Path, int]] = [(value, field, 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, dict | list | tuple):
            if depth >= max_nesting:
                raise LimitExceeded(
                    path, f"is nested more than {max_nesting} levels deep", "max_nesting"
                )
            if isinstance(v, dict):
                for k, child in v.items():
                    if not isinstance(k, str):
                        k = str(k)
                    _check_text(k, f"{path} (a key)")
                    stack.append((child, f"{path}.{k}", depth + 1))
            else:
                stack.extend((c, f"{path}[{i}]", depth + 1) for i, c in enumerate(v))
        elif isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, float) and not math.isfinite(v):
            raise LimitExceeded(path, f"is {v!r}, which JSON cannot carry")


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LimitExceeded(
            path,
            f"holds {text[exc.start : exc.end]!r}, a lone surrogate that UTF-8 cannot encode",
        ) from None
