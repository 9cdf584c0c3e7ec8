"""Validation of trigger inputs against a flow's ``inputs`` schema."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import urlparse

from .errors import InputError
from .model import InputField

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TYPES: dict[str, tuple[type[Any], ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def validate_inputs(schema: dict[str, InputField], given: dict[str, Any] | None) -> dict[str, Any]:
    """The inputs a run starts with: ``given`` checked field by field, defaults filled in."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise InputError(
            "inputs", f"expected a mapping of input names to values, got {type(given).__name__}"
        )
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise InputError(
            unknown[0], f"is not an input of this flow (inputs: {', '.join(schema) or 'none'})"
        )
    out: dict[str, Any] = {}
    for name, field in schema.items():
        if name not in given or given[name] is None:
            if field.required:
                raise InputError(name, "is required")
            # An optional input without a default reads as null, so expressions can test it.
            out[name] = field.default if "default" in field.model_fields_set else None
            continue
        out[name] = _check(name, field, given[name])
    return out


def _check(name: str, field: InputField, value: Any) -> Any:
    types = _TYPES[field.type]
    if isinstance(value, bool) and field.type != "boolean" or not isinstance(value, types):
        raise InputError(name, f"expected {field.type}, got {type(value).__name__} {value!r}")
    if field.enum is not None and value not in field.enum:
        raise InputError(name, f"expected one of {field.enum}, got {value!r}")
    if field.minimum is not None and value < field.minimum:
        raise InputError(name, f"must be at least {field.minimum:g}, got {value!r}")
    if field.maximum is not None and value > field.maximum:
        raise InputError(name, f"must be at most {field.maximum:g}, got {value!r}")
    if field.format and isinstance(value, str):
        _check_format(name, field.format, value)
    return value


def _check_format(name: str, fmt: str, value: str) -> None:
    try:
        if fmt == "date":
            dt.date.fromisoformat(value)
        elif fmt == "date-time":
            dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif fmt == "email" and not _EMAIL.match(value):
            raise ValueError
        elif fmt == "uri":
            parts = urlparse(value)
            if not (parts.scheme and parts.netloc):
                raise ValueError
    except ValueError:
        example = {
            "date": "2026-01-31",
            "date-time": "2026-01-31T12:00:00Z",
            "email": "name@example.com",
            "uri": "https://example.com/x",
        }[fmt]
        raise InputError(name, f"expected a {fmt} like {example!r}, got {value!r}") from None
