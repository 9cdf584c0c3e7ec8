"""Tests for orchestrator.inputs: trigger inputs checked against a flow's schema."""

from __future__ import annotations

import pytest

from orchestrator.errors import InputError
from orchestrator.inputs import validate_inputs
from orchestrator.model import InputField


def schema(**fields: dict) -> dict[str, InputField]:
    return {name: InputField.model_validate(spec) for name, spec in fields.items()}


def refused(s: dict[str, InputField], given) -> InputError:
    with pytest.raises(InputError) as info:
        validate_inputs(s, given)
    return info.value


@pytest.mark.parametrize(
    ("type_", "good", "bad"),
    [
        ("string", "x", 1),
        ("integer", 3, 3.5),
        ("integer", -7, "7"),
        ("number", 2.5, "2.5"),
        ("number", 2, [2]),
        ("boolean", False, 0),
        ("boolean", True, "true"),
        ("object", {"a": 1}, [1]),
        ("array", [1, "a"], {"a": 1}),
    ],
)
def test_types(type_, good, bad) -> None:
    s = schema(v={"type": type_})
    assert validate_inputs(s, {"v": good}) == {"v": good}
    err = refused(s, {"v": bad})
    assert err.field == "v"
    assert f"expected {type_}" in str(err)


@pytest.mark.parametrize("type_", ["integer", "number"])
def test_a_boolean_is_not_a_number(type_) -> None:
    err = refused(schema(n={"type": type_}), {"n": True})
    assert err.field == "n"


@pytest.mark.parametrize(
    ("fmt", "good", "bad"),
    [
        ("date", "2026-01-31", "2026-02-30"),
        ("date", "2026-01-31", "31/01/2026"),
        ("date-time", "2026-01-31T12:00:00Z", "yesterday"),
        ("date-time", "2026-01-31T12:00:00+02:00", "2026-01-31T25:00:00"),
        ("email", "name@example.com", "not-an-email"),
        ("email", "a.b+c@sub.example.org", "a@b"),
        ("uri", "https://example.com/x?y=1", "example.com/x"),
        ("uri", "redis://127.0.0.1:6379/0", "/just/a/path"),
    ],
)
def test_formats(fmt, good, bad) -> None:
    s = schema(v={"type": "string", "format": fmt})
    assert validate_inputs(s, {"v": good}) == {"v": good}
    err = refused(s, {"v": bad})
    assert err.field == "v"
    assert f"expected a {fmt} like" in str(err)
    assert repr(bad) in str(err)


def test_enum() -> None:
    s = schema(mode={"type": "string", "enum": ["fast", "safe"]})
    assert validate_inputs(s, {"mode": "safe"}) == {"mode": "safe"}
    err = refused(s, {"mode": "reckless"})
    assert err.field == "mode"
    assert "one of ['fast', 'safe']" in str(err) and "'reckless'" in str(err)


def test_minimum_and_maximum() -> None:
    s = schema(pages={"type": "integer", "minimum": 1, "maximum": 100})
    assert validate_inputs(s, {"pages": 1}) == {"pages": 1}
    assert validate_inputs(s, {"pages": 100}) == {"pages": 100}
    low = refused(s, {"pages": 0})
    assert low.field == "pages" and "at least 1" in str(low)
    high = refused(s, {"pages": 101})
    assert high.field == "pages" and "at most 100" in str(high)


def test_required() -> None:
    s = schema(since={"type": "string", "required": True}, other={"type": "string"})
    err = refused(s, {"other": "x"})
    assert err.field == "since"
    assert "is required" in str(err)
    assert refused(s, {"since": None}).field == "since"
    assert refused(s, None).field == "since"


def test_defaults_are_filled_in_and_absent_optionals_read_as_null() -> None:
    s = schema(
        dry_run={"type": "boolean", "default": False},
        table={"type": "string", "default": "warehouse.customers"},
        limit={"type": "integer"},
        nothing={"type": "string", "default": None},
    )
    assert validate_inputs(s, {}) == {
        "dry_run": False,
        "table": "warehouse.customers",
        "limit": None,
        "nothing": None,
    }
    assert validate_inputs(s, {"dry_run": True, "limit": 5}) == {
        "dry_run": True,
        "table": "warehouse.customers",
        "limit": 5,
        "nothing": None,
    }


def test_unknown_field() -> None:
    s = schema(message={"type": "string"})
    err = refused(s, {"message": "hi", "mesage": "typo"})
    assert err.field == "mesage"
    assert "is not an input of this flow" in str(err) and "message" in str(err)


def test_unknown_field_when_the_flow_has_no_inputs() -> None:
    err = refused({}, {"x": 1})
    assert err.field == "x"
    assert "inputs: none" in str(err)


def test_inputs_must_be_a_mapping() -> None:
    err = refused(schema(a={}), ["a"])
    assert err.field == "inputs"


def test_error_message_names_the_field() -> None:
    err = refused(schema(count={"type": "integer"}), {"count": "many"})
    assert str(err).startswith("input 'count':")
