"""Tests for orchestrator.model: durations, step kinds, strictness and round trips."""

from __future__ import annotations

import math
import typing

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from orchestrator import model
from orchestrator.model import (
    MAX_DURATION_S,
    FlowResource,
    Metadata,
    ParallelStep,
    RetryPolicy,
    SequenceStep,
    Step,
    TaskStep,
    format_duration,
    parse_duration,
    step_kind,
)

STEP = TypeAdapter(Step)


# -- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("30s", 30.0),
        ("10m", 600.0),
        ("48h", 172_800.0),
        ("2d", 172_800.0),
        ("0s", 0.0),
        (" 5 s ", 5.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (45, 45.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", ["", "ten seconds", "10x", "5 mins", "-5s", "1h30m", "s", True, None, [1], -1, -0.5]
)
def test_parse_duration_rejects(bad) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (math.nan, "a duration must be a finite number of seconds; got nan"),
        (math.inf, "a duration must be a finite number of seconds; got inf"),
        (-math.inf, "a duration must be a finite number of seconds; got -inf"),
        pytest.param(
            10**400, "at most 36500d (100 years); got a number of over 38 digits", id="1e400"
        ),
        pytest.param(
            10**5000, "at most 36500d (100 years); got a number of over 38 digits", id="1e5000"
        ),
        pytest.param("9" * 400 + "d", "at most 36500d (100 years)", id="400-digit-days"),  # inf
        ("36501d", "at most 36500d (100 years); got '36501d'"),
        (MAX_DURATION_S + 1, "at most 36500d"),
    ],
)
def test_parse_duration_rejects_nan_infinity_and_absurd_lengths(bad, message) -> None:
    with pytest.raises(ValueError) as info:  # a ValueError: pydantic reports it at the field
        parse_duration(bad)
    assert message in str(info.value)


def test_the_longest_duration_is_accepted_and_written_back() -> None:
    assert parse_duration("36500d") == MAX_DURATION_S
    assert format_duration(parse_duration("36500d")) == "36500d"


def _duration_fields() -> list[tuple[type[BaseModel], str]]:
    """Every field of every model in orchestrator.model whose type is a Duration."""
    found = []
    for cls in vars(model).values():
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        for name, info in cls.model_fields.items():
            if any(
                getattr(m, "func", None) is parse_duration
                for arg in (info.annotation, *typing.get_args(info.annotation))
                for m in (*info.metadata, *getattr(arg, "__metadata__", ()))
            ):
                found.append((cls, info.alias or name))
    return found


def test_every_duration_field_is_found() -> None:
    # The fields the next test checks; a new duration field shows up here.
    names = {(cls.__name__, field) for cls, field in _duration_fields()}
    for expected in [
        ("RetryPolicy", "initialDelay"),
        ("RetryPolicy", "maxDelay"),
        ("StepOptions", "timeout"),
        ("TaskStep", "timeout"),
        ("ApprovalSpec", "timeout"),
        ("SleepStep", "sleep"),
        ("WaitSpec", "timeout"),
        ("ServiceSpec", "timeout"),
    ]:
        assert expected in names


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1, "-1s", "36501d"])
def test_every_duration_field_refuses_nan_infinity_and_negatives(bad) -> None:
    for cls, field in _duration_fields():
        with pytest.raises(ValidationError) as info:
            cls.model_validate({field: bad})
        located = [e for e in info.value.errors() if e["loc"] == (field,)]
        assert located, (cls.__name__, field, info.value.errors())


def test_duration_error_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match=r"expected a duration like 30s, 250ms.*'10x'"):
        parse_duration("10x")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (1.5, "1500ms"), (30.0, "30s"), (600.0, "10m"), (7200.0, "2h"),
     (172_800.0, "2d"), (90.0, "90s"), (0.0001, 0.0001)],
)  # fmt: skip
def test_format_duration_is_exact_and_shortest(seconds, text) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_durations_in_a_model_parse_and_serialise_back() -> None:
    policy = RetryPolicy.model_validate({"initialDelay": "250ms", "maxDelay": "2m"})
    assert policy.initial_delay == 0.25
    assert policy.max_delay == 120.0
    assert policy.model_dump(exclude_none=True) == {"initialDelay": "250ms", "maxDelay": "2m"}


def test_bad_duration_in_a_model_names_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        TaskStep.model_validate({"id": "a", "task": "t", "timeout": "soon"})
    (error,) = info.value.errors()
    assert error["loc"] == ("timeout",)
    assert "expected a duration" in error["msg"]


# -- step kinds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        ({"id": "a", "task": "x.y"}, TaskStep),
        ({"id": "s", "steps": [{"id": "a", "task": "x.y"}]}, SequenceStep),
        ({"id": "p", "parallel": [{"id": "a", "task": "x.y"}]}, ParallelStep),
    ],
)
def test_step_kind_is_chosen_by_its_key(data, cls) -> None:
    step = STEP.validate_python(data)
    assert type(step) is cls
    assert step_kind(step) == step_kind(data)


@pytest.mark.parametrize(
    "data",
    [
        {"id": "a"},  # no kind at all
        {"id": "a", "task": "x.y", "parallel": [{"id": "b", "task": "x.y"}]},  # two kinds
        {"id": "a", "tsk": "x.y"},  # a typo leaves it kindless
    ],
)
def test_step_needs_exactly_one_kind(data) -> None:
    with pytest.raises(ValidationError) as info:
        STEP.validate_python(data)
    (error,) = info.value.errors()
    assert error["type"] == "step_kind"
    assert "a step needs exactly one of the kind fields: task," in error["msg"]
    assert all(kind in error["msg"] for kind in ("parallel", "forEach", "steps"))


def test_step_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        STEP.validate_python("x.y")
    assert info.value.errors()[0]["type"] == "step_kind"


def test_nested_steps_are_discriminated_too() -> None:
    step = STEP.validate_python(
        {"id": "p", "parallel": [{"id": "s", "steps": [{"id": "a", "task": "t"}]}]}
    )
    assert isinstance(step.parallel[0], SequenceStep)
    assert isinstance(step.parallel[0].steps[0], TaskStep)


def test_step_id_must_be_an_identifier() -> None:
    with pytest.raises(ValidationError):
        TaskStep.model_validate({"id": "has space", "task": "t"})
    with pytest.raises(ValidationError):
        TaskStep.model_validate({"id": "1st", "task": "t"})
    assert TaskStep.model_validate({"id": "load_2-b", "task": "t"}).id == "load_2-b"


# -- strictness ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "data", "field"),
    [
        (TaskStep, {"id": "a", "task": "t", "retyr": {}}, "retyr"),
        (RetryPolicy, {"maxAttempts": 2, "backof": "fixed"}, "backof"),
        (Metadata, {"name": "x", "namespace": "y"}, "namespace"),
    ],
)
def test_unknown_fields_are_forbidden(cls, data, field) -> None:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(data)
    (error,) = info.value.errors()
    assert error["type"] == "extra_forbidden"
    assert error["loc"] == (field,)


def test_unknown_top_level_field_of_a_flow_is_forbidden() -> None:
    doc = _doc()
    doc["spec"]["step"] = []
    with pytest.raises(ValidationError) as info:
        FlowResource.model_validate(doc)
    assert ("spec", "step") in [e["loc"] for e in info.value.errors()]


def test_camel_case_and_snake_case_are_both_accepted() -> None:
    a = RetryPolicy.model_validate({"maxAttempts": 3, "initialDelay": "1s"})
    b = RetryPolicy(max_attempts=3, initial_delay=1.0)
    assert a == b
    assert b.model_dump(exclude_none=True) == {"maxAttempts": 3, "initialDelay": "1s"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("priority", 10), ("priority", -1), ("onError", "ignore"), ("rateLimit", "10 per second")],
)
def test_step_option_values_are_checked(field, value) -> None:
    with pytest.raises(ValidationError) as info:
        TaskStep.model_validate({"id": "a", "task": "t", field: value})
    assert info.value.errors()[0]["loc"] == (field,)


# -- metadata.name ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "etl", "customer-sync", "v2-flow-3", "x" * 63])
def test_valid_names(name) -> None:
    assert Metadata(name=name).name == name


@pytest.mark.parametrize(
    "name", ["", "Etl", "customer_sync", "-etl", "etl-", "a.b", "a b", "x" * 64, "fl\u00f6w"]
)
def test_invalid_names(name) -> None:
    with pytest.raises(ValidationError) as info:
        Metadata(name=name)
    assert info.value.errors()[0]["loc"] == ("name",)


# -- FlowResource.document() -----------------------------------------------------------


def _doc() -> dict:
    return {
        "apiVersion": "orchestrator/v1",
        "kind": "Flow",
        "metadata": {"name": "customer-sync", "labels": {"team": "data"}},
        "spec": {
            "description": "Synchronize customers",
            "initialState": "stopped",
            "inputs": {
                "since": {"type": "string", "format": "date", "required": True},
                "dry_run": {"type": "boolean", "default": False},
            },
            "defaults": {
                "queue": "default",
                "retry": {
                    "maxAttempts": 3,
                    "backoff": "exponential",
                    "initialDelay": "1s",
                    "maxDelay": "1m",
                    "jitter": True,
                },
                "timeout": "30s",
            },
            "steps": [
                {"id": "extract", "task": "crm.extract", "with": {"since": "${inputs.since}"}},
                {
                    "id": "fan",
                    "parallel": [
                        {"id": "a", "task": "x.a", "onError": "continue", "rateLimit": "10/s"},
                        {"id": "seq", "steps": [{"id": "b", "task": "x.b", "timeout": "250ms"}]},
                    ],
                },
                {
                    "id": "each",
                    "forEach": "${steps.extract.output}",
                    "do": {"id": "one", "task": "x.one", "with": {"item": "${item}"}},
                    "concurrency": 4,
                },
                {
                    "id": "pick",
                    "switch": [
                        {"when": "${inputs.dry_run}", "steps": [{"id": "dry", "task": "x.dry"}]},
                        {"default": [{"id": "wet", "task": "x.wet"}]},
                    ],
                },
                {
                    "id": "guard",
                    "try": [{"id": "risky", "task": "x.risky", "priority": 5}],
                    "catch": [{"id": "recover", "task": "x.recover"}],
                    "finally": [{"id": "cleanup", "task": "x.cleanup"}],
                },
                {
                    "id": "load",
                    "task": "dw.load",
                    "when": "${not inputs.dry_run}",
                    "compensate": {"id": "unload", "task": "dw.unload"},
                },
            ],
            "outputs": {"count": "${steps.load.output.count}"},
            "onFailure": [{"id": "alert", "task": "ops.alert"}],
        },
    }


def test_document_round_trip_is_exact() -> None:
    doc = _doc()
    resource = FlowResource.model_validate(doc)
    assert resource.name == "customer-sync"
    assert resource.document() == doc
    assert FlowResource.model_validate(resource.document()) == resource


def test_document_leaves_defaults_out_and_uses_aliases() -> None:
    resource = FlowResource(
        metadata=Metadata(name="tiny"),
        spec={"steps": [{"id": "a", "task": "t", "with": {"x": 1}, "on_error": "continue"}]},
    )
    assert resource.document() == {
        "apiVersion": "orchestrator/v1",
        "kind": "Flow",
        "metadata": {"name": "tiny"},
        "spec": {"steps": [{"id": "a", "task": "t", "with": {"x": 1}, "onError": "continue"}]},
    }


def test_document_writes_durations_in_units() -> None:
    doc = _doc()
    doc["spec"]["defaults"]["timeout"] = 90
    doc["spec"]["defaults"]["retry"]["initialDelay"] = "0.5s"
    out = FlowResource.model_validate(doc).document()
    assert out["spec"]["defaults"]["timeout"] == "90s"
    assert out["spec"]["defaults"]["retry"]["initialDelay"] == "500ms"
