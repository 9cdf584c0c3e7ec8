"""Tests for orchestrator.compiler (and the DSL that feeds it): canvas inspected, never run.

Celery's own canvas arithmetic folds what follows a chord into the chord's body
(``chain(chord(h, p), z)`` becomes ``chord(h, p | z)``), which runs the same way; the
``shape`` helper below reads either form as one flat order of execution.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml
from celery import chord, group
from celery.canvas import Signature, _chain

from orchestrator import Flow, step
from orchestrator.app import create_app
from orchestrator.compiler import STEP_TASK, CanvasBuilder, canvas_tree, describe, render_canvas
from orchestrator.loader import load_string
from orchestrator.model import FlowResource, ParallelStep, RetryPolicy, SequenceStep, TaskStep
from orchestrator.plan import Plan
from orchestrator.policy import hard_time_limit, retry_countdown
from orchestrator.settings import Settings

# Nothing here connects: building signatures needs an app, not a broker.
SETTINGS = Settings(redis_url="redis://127.0.0.1:1/0")


@pytest.fixture(scope="module")
def app():
    a = create_app(SETTINGS, set_as_current=False)
    yield a
    a.close()


def resource(steps: list, name: str = "demo", **spec: Any) -> FlowResource:
    doc = {
        "apiVersion": "orchestrator/v1",
        "kind": "Flow",
        "metadata": {"name": name},
        "spec": {"steps": steps, **spec},
    }
    (loaded,) = load_string(yaml.safe_dump(doc, sort_keys=False))
    return loaded.resource


def compile_flow(app, res: FlowResource, settings: Settings = SETTINGS) -> tuple[Plan, Signature]:
    plan = Plan(res, "v1", settings)
    return plan, CanvasBuilder(app, plan, "run-1").from_node(plan.first(plan.top))


def shape(sig: Signature) -> list:
    """The order of execution: step ids, ``{"chord": [branch, ...]}`` for a chord's header."""
    if isinstance(sig, chord):
        return [{"chord": [_branch(s) for s in sig.tasks]}, *shape(sig.body)]
    if isinstance(sig, _chain):
        return [x for s in sig.tasks for x in shape(s)]
    if isinstance(sig, group):
        return [{"group": [_branch(s) for s in sig.tasks]}]
    assert sig.task == STEP_TASK
    return [sig.args[3]]


def _branch(sig: Signature) -> Any:
    out = shape(sig)
    return out[0] if len(out) == 1 else out


def signatures(sig: Signature) -> list[Signature]:
    """Every step signature in a canvas, in order of execution (header before join)."""
    if isinstance(sig, chord):
        return [s for h in sig.tasks for s in signatures(h)] + signatures(sig.body)
    if isinstance(sig, _chain | group):
        return [s for t in sig.tasks for s in signatures(t)]
    return [sig]


def tails(sig: Signature) -> list[str]:
    return [s.args[3] for s in signatures(sig) if s.args[5] is True]


def task(id: str, **kw: Any) -> dict[str, Any]:
    return {"id": id, "task": f"x.{id}", **kw}


# -- sequences -------------------------------------------------------------------------


def test_sequence_is_a_chain_of_immutable_step_signatures(app) -> None:
    _plan, canvas = compile_flow(app, resource([task("a"), task("b"), task("c")]))
    assert isinstance(canvas, _chain)
    assert len(canvas.tasks) == 3
    for sig, sid in zip(canvas.tasks, "abc", strict=True):
        assert type(sig) is Signature
        assert sig.task == "orchestrator.step"
        assert sig.immutable is True
        assert sig.args == ("run-1", "demo", "v1", sid, [], sid == "c")
    assert tails(canvas) == ["c"]


def test_single_step_is_one_tail_signature(app) -> None:
    _plan, canvas = compile_flow(app, resource([task("only")]))
    assert type(canvas) is Signature
    assert canvas.args == ("run-1", "demo", "v1", "only", [], True)


def test_nested_sequence_without_when_is_laid_out_inline(app) -> None:
    res = resource([task("a"), {"id": "s", "steps": [task("b"), task("c")]}, task("d")])
    _plan, canvas = compile_flow(app, res)
    assert shape(canvas) == ["a", "b", "c", "d"]
    assert tails(canvas) == ["d"]


def test_long_sequence_is_cut_into_segments(app) -> None:
    settings = Settings(redis_url=SETTINGS.redis_url, chain_segment=32)
    res = resource([task(f"s{i}") for i in range(80)])
    plan, canvas = compile_flow(app, res, settings)
    assert isinstance(canvas, _chain)
    assert shape(canvas) == [f"s{i}" for i in range(32)]
    # The segment's last signature is the tail: its worker publishes the next segment.
    assert tails(canvas) == ["s31"]
    builder = CanvasBuilder(app, plan, "run-1")
    second = builder.from_node(plan.successor(plan.nodes["s31"]))
    assert shape(second) == [f"s{i}" for i in range(32, 64)]
    assert tails(second) == ["s63"]
    last = builder.from_node(plan.nodes["s64"])
    assert shape(last) == [f"s{i}" for i in range(64, 80)]
    assert tails(last) == ["s79"]
    assert plan.is_final(plan.nodes["s79"]) and not plan.is_final(plan.nodes["s31"])


def test_segment_messages_stay_small(app) -> None:
    """A 500-step flow's first message is no bigger than a 40-step one's (O(1) in size)."""
    settings = Settings(redis_url=SETTINGS.redis_url, chain_segment=32)
    sizes = []
    for n in (40, 500):
        _plan, canvas = compile_flow(app, resource([task(f"s{i}") for i in range(n)]), settings)
        sizes.append(len(repr(canvas_tree(canvas))))
    assert sizes[0] == sizes[1]


# -- parallel --------------------------------------------------------------------------


def test_parallel_is_a_chord_of_a_group_and_a_join(app) -> None:
    res = resource([task("a"), {"id": "p", "parallel": [task("b1"), task("b2")]}])
    _plan, canvas = compile_flow(app, res)
    assert shape(canvas) == ["a", {"chord": ["b1", "b2"]}, "p"]
    (ch,) = [t for t in canvas.tasks if isinstance(t, chord)]
    assert [s.args[3] for s in ch.tasks] == ["b1", "b2"]
    assert ch.body.task == "orchestrator.step"
    assert ch.body.args == ("run-1", "demo", "v1", "p", [], True)
    # The message says it is the chord's join (not each worker's settings), and no
    # signature keeps a Celery result: outputs live in run state.
    assert ch.body.kwargs == {"join": True}
    assert all(s.options["ignore_result"] is True for s in [*ch.tasks, ch.body])
    assert tails(canvas) == ["p"]


def test_steps_after_a_parallel_follow_the_join(app) -> None:
    res = resource([{"id": "p", "parallel": [task("b1"), task("b2")]}, task("z"), task("y")])
    _plan, canvas = compile_flow(app, res)
    assert shape(canvas) == [{"chord": ["b1", "b2"]}, "p", "z", "y"]
    assert tails(canvas) == ["y"]


def test_branch_that_is_a_sequence_is_a_chain_inside_the_group(app) -> None:
    res = resource(
        [{"id": "p", "parallel": [task("b"), {"id": "s", "steps": [task("c"), task("d")]}]}]
    )
    _plan, canvas = compile_flow(app, res)
    assert isinstance(canvas, chord)
    assert shape(canvas) == [{"chord": ["b", ["c", "d"]]}, "p"]
    inner = canvas.tasks[1]
    assert isinstance(inner, _chain)
    assert [s.options["ignore_result"] for s in inner.tasks] == [True, True]


def test_parallel_wider_than_native_chord_max_is_one_runtime_signature(app) -> None:
    settings = Settings(redis_url=SETTINGS.redis_url, native_chord_max=3)
    res = resource(
        [task("a"), {"id": "p", "parallel": [task(f"b{i}") for i in range(4)]}, task("z")]
    )
    plan, canvas = compile_flow(app, res, settings)
    assert not plan.nodes["p"].static
    assert isinstance(canvas, _chain)
    assert not any(isinstance(s, chord) for s in canvas.tasks)
    assert shape(canvas) == ["a", "p"]
    assert tails(canvas) == ["p"]  # its worker publishes the branches and counts the fan-in


def test_native_chord_max_counts_leaf_tasks_not_branches(app) -> None:
    settings = Settings(redis_url=SETTINGS.redis_url, native_chord_max=3)
    branches = [task("b"), {"id": "s", "steps": [task("c"), task("d"), task("e")]}]
    plan, canvas = compile_flow(app, resource([{"id": "p", "parallel": branches}]), settings)
    assert not plan.nodes["p"].static  # 4 leaves > 3
    assert type(canvas) is Signature and canvas.args[3] == "p"
    plan, canvas = compile_flow(app, resource([{"id": "p", "parallel": branches[1:]}]), settings)
    assert plan.nodes["p"].static
    assert isinstance(canvas, chord)


def test_nested_parallel_is_decided_at_run_time(app) -> None:
    inner = {"id": "q", "parallel": [task("c"), task("d")]}
    res = resource([{"id": "p", "parallel": [task("b"), inner]}])
    plan, canvas = compile_flow(app, res)
    assert not plan.nodes["p"].static
    assert shape(canvas) == ["p"]


def test_native_chord_max_zero_never_builds_chords(app) -> None:
    settings = Settings(redis_url=SETTINGS.redis_url, native_chord_max=0)
    res = resource([{"id": "p", "parallel": [task("b")]}])
    _plan, canvas = compile_flow(app, res, settings)
    assert type(canvas) is Signature and canvas.args[5] is True


# -- when ------------------------------------------------------------------------------


def test_when_on_a_sequence_makes_it_a_runtime_node(app) -> None:
    res = resource(
        [
            task("a"),
            {"id": "s", "when": "${inputs.go}", "steps": [task("b"), task("c")]},
            task("z"),
        ],
        inputs={"go": {"type": "boolean"}},
    )
    plan, canvas = compile_flow(app, res)
    assert not plan.nodes["s"].static
    assert shape(canvas) == ["a", "s"]  # b, c and z are published by s's worker
    assert tails(canvas) == ["s"]


def test_when_on_a_task_stays_in_the_chain(app) -> None:
    res = resource([task("a"), task("b", when="${inputs.go}"), task("c")],
                   inputs={"go": {"type": "boolean"}})  # fmt: skip
    plan, canvas = compile_flow(app, res)
    assert plan.nodes["b"].static
    assert shape(canvas) == ["a", "b", "c"]


def test_when_on_a_parallel_makes_it_a_runtime_node(app) -> None:
    res = resource([{"id": "p", "when": False, "parallel": [task("b1"), task("b2")]}, task("z")])
    plan, canvas = compile_flow(app, res)
    assert not plan.nodes["p"].static
    assert shape(canvas) == ["p"]


# -- options ---------------------------------------------------------------------------


def test_options_from_step_and_defaults(app) -> None:
    res = resource(
        [
            task("a", queue="fast", priority=7, timeout="2s"),
            task("b"),
        ],
        name="opts",
        defaults={"queue": "bulk", "priority": 3, "timeout": "30s"},
    )
    _plan, canvas = compile_flow(app, res)
    a, b = canvas.tasks
    assert a.options["queue"] == "fast"
    assert a.options["priority"] == 7
    assert a.options["soft_time_limit"] == 2.0
    assert a.options["time_limit"] == 3.0  # at least a second more than the soft limit
    assert a.options["shadow"] == "opts.a"
    assert b.options["queue"] == "bulk"
    assert b.options["priority"] == 3
    assert b.options["soft_time_limit"] == 30.0
    assert b.options["time_limit"] == 33.0  # 10% more
    assert b.options["shadow"] == "opts.b"


def test_options_fall_back_to_settings(app) -> None:
    settings = Settings(
        redis_url=SETTINGS.redis_url, default_queue="q-default", default_step_timeout_s=100
    )
    _plan, canvas = compile_flow(app, resource([task("a")]), settings)
    assert canvas.options["queue"] == "q-default"
    assert "priority" not in canvas.options
    assert canvas.options["soft_time_limit"] == 100.0
    assert canvas.options["time_limit"] == hard_time_limit(100.0) == 110.0


def test_rate_limit_is_enforced_by_the_worker_not_sent_as_an_option(app) -> None:
    plan, canvas = compile_flow(app, resource([task("a", rateLimit="10/s")]))
    assert plan.nodes["a"].options["rate_limit"] == "10/s"
    assert "rate_limit" not in canvas.options


def test_retry_policy_merges_defaults_then_step(app) -> None:
    res = resource(
        [
            task("a", retry={"maxAttempts": 5, "initialDelay": "250ms"}),
            task("b"),
            task("c", retry={"jitter": False}),
        ],
        defaults={"retry": {"maxAttempts": 3, "backoff": "linear", "maxDelay": "10s"}},
    )
    plan = Plan(res, "v1", SETTINGS)
    a, b, c = (plan.nodes[i].retry for i in "abc")
    assert a == RetryPolicy(
        max_attempts=5, backoff="linear", initial_delay=0.25, max_delay=10.0, jitter=True
    )
    assert b == RetryPolicy(
        max_attempts=3, backoff="linear", initial_delay=1.0, max_delay=10.0, jitter=True
    )
    assert c.jitter is False and c.max_attempts == 3


def test_without_a_policy_a_step_is_tried_once(app) -> None:
    plan = Plan(resource([task("a")]), "v1", SETTINGS)
    assert plan.nodes["a"].retry.max_attempts == 1


def test_on_error_from_defaults_and_step(app) -> None:
    res = resource([task("a"), task("b", onError="fail")], defaults={"onError": "continue"})
    plan = Plan(res, "v1", SETTINGS)
    assert plan.nodes["a"].on_error == "continue"
    assert plan.nodes["b"].on_error == "fail"


# -- retry countdown -------------------------------------------------------------------


def _policy(backoff: str, jitter: bool = False, max_delay: float | None = 7.0) -> RetryPolicy:
    return RetryPolicy(backoff=backoff, initial_delay=2.0, max_delay=max_delay, jitter=jitter)


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("fixed", [2.0, 2.0, 2.0, 2.0, 2.0]),
        ("linear", [2.0, 4.0, 6.0, 7.0, 7.0]),
        ("exponential", [2.0, 4.0, 7.0, 7.0, 7.0]),
    ],
)
def test_retry_countdown_backoff_capped_by_max_delay(backoff, expected) -> None:
    assert [retry_countdown(_policy(backoff), n) for n in range(1, 6)] == expected


def test_exponential_backoff_doubles_without_a_cap() -> None:
    policy = _policy("exponential", max_delay=None)
    assert [retry_countdown(policy, n) for n in range(1, 6)] == [2.0, 4.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("backoff", ["fixed", "linear", "exponential"])
def test_jitter_stays_within_zero_and_the_cap(backoff) -> None:
    plain, jittered = _policy(backoff), _policy(backoff, jitter=True)
    rng = random.Random(1234)
    for attempt in range(1, 8):
        cap = retry_countdown(plain, attempt)
        draws = [retry_countdown(jittered, attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in draws)
        assert len(set(draws)) > 100  # really spread, not a constant
        assert max(draws) > cap * 0.8 and min(draws) < cap * 0.2


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = _policy("exponential", jitter=True)
    one = [retry_countdown(policy, n, random.Random(7)) for n in range(1, 6)]
    two = [retry_countdown(policy, n, random.Random(7)) for n in range(1, 6)]
    assert one == two


# -- describe --------------------------------------------------------------------------


def test_describe(app) -> None:
    res = resource(
        [
            task("a", retry={"maxAttempts": 4, "backoff": "fixed", "initialDelay": "3s"}),
            {"id": "p", "parallel": [task("b1"), task("b2", when="${inputs.go}")]},
        ],
        inputs={"go": {"type": "boolean", "default": True}},
        defaults={"queue": "work", "onError": "continue"},
    )
    plan = Plan(res, "v1", SETTINGS)
    out = describe(plan, app)
    assert out["flow"] == "demo" and out["version"] == "v1"
    canvas = out["canvas"]
    assert canvas["chain"][0] == {
        "task": "orchestrator.step",
        "step": "a",
        "tail": False,
        "options": {
            "queue": "work",
            "soft_time_limit": 1800.0,
            "time_limit": 1980.0,
            "ignore_result": True,
        },
    }
    chord_node = canvas["chain"][1]["chord"]
    assert [h["step"] for h in chord_node["header"]] == ["b1", "b2"]
    assert chord_node["body"]["step"] == "p" and chord_node["body"]["tail"] is True
    steps = out["steps"]
    assert list(steps) == ["a", "p", "b1", "b2"]
    assert steps["a"]["kind"] == "task" and steps["a"]["task"] == "x.a"
    assert steps["a"]["max_retries"] == 3
    assert steps["a"]["countdown"] == {
        "backoff": "fixed",
        "initial": 3.0,
        "max": 60.0,
        "jitter": True,
    }
    assert steps["a"]["on_error"] == "continue"
    assert steps["p"]["kind"] == "parallel" and steps["p"]["static"] is True
    assert steps["b1"]["max_retries"] == 0
    assert steps["b2"]["when"] == "${inputs.go}"
    assert "when" not in steps["b1"]
    text = render_canvas(canvas)
    assert text.startswith("chain(")
    assert "chord(" in text and "group(" in text
    assert "orchestrator.step.si('p';" in text and "[tail: continues the run]" in text


def test_describe_a_single_step_flow(app) -> None:
    out = describe(Plan(resource([task("a")]), "v9", SETTINGS), app)
    assert out["canvas"]["step"] == "a" and out["canvas"]["tail"] is True
    assert render_canvas(out["canvas"]).startswith("orchestrator.step.si('a';")


# -- the DSL ---------------------------------------------------------------------------


def test_dsl_sequence() -> None:
    a, b = step("a", "x.a"), step("b", "x.b", args={"v": "${steps.a.output}"})
    flow = Flow("dsl", a >> b)
    steps = flow.resource.spec.steps
    assert [type(s) for s in steps] == [TaskStep, TaskStep]
    assert [s.id for s in steps] == ["a", "b"]
    assert steps[1].with_ == {"v": "${steps.a.output}"}


def test_dsl_parallel_with_and_and_with_a_list() -> None:
    a, b = step("a", "x.a"), step("b", "x.b")
    for flow in (Flow("dsl", a & b), Flow("dsl", [a, b])):
        (par,) = flow.resource.spec.steps
        assert isinstance(par, ParallelStep)
        assert [s.id for s in par.parallel] == ["a", "b"]
    assert Flow("dsl", a & b) == Flow("dsl", [a, b])


def test_dsl_fan_out_then_fan_in(app) -> None:
    a, b, c = step("a", "x.a"), step("b", "x.b"), step("c", "x.c")
    flow = Flow("dsl", (a & b) >> c)
    par, last = flow.resource.spec.steps
    assert isinstance(par, ParallelStep) and [s.id for s in par.parallel] == ["a", "b"]
    assert last.id == "c"
    _plan, canvas = compile_flow(app, flow.resource)
    assert shape(canvas) == [{"chord": ["a", "b"]}, par.id, "c"]


def test_dsl_chain_inside_a_branch_becomes_a_sequence() -> None:
    a, b, c = step("a", "x.a"), step("b", "x.b"), step("c", "x.c")
    (par,) = Flow("dsl", a & (b >> c)).resource.spec.steps
    seq = par.parallel[1]
    assert isinstance(seq, SequenceStep)
    assert [s.id for s in seq.steps] == ["b", "c"]


def test_dsl_accepts_a_celery_task_object() -> None:
    from tests.tasks import echo

    s = step("e", echo, args={"x": 1})
    assert s.model.task == "tests.echo"
    with pytest.raises(TypeError, match="task must be a task name or a Celery task"):
        step("e", 42)


def test_dsl_options_in_snake_case() -> None:
    undo = step("undo", "x.undo")
    s = step(
        "a",
        "x.a",
        when="${inputs.go}",
        on_error="continue",
        queue="q",
        priority=4,
        timeout="5s",
        rate_limit="2/s",
        retry={"maxAttempts": 2},
        compensate=undo,
    ).model
    assert (s.when, s.on_error, s.queue, s.priority, s.timeout, s.rate_limit) == (
        "${inputs.go}",
        "continue",
        "q",
        4,
        5.0,
        "2/s",
    )
    assert s.retry.max_attempts == 2
    assert s.compensate.id == "undo"


def test_dsl_yaml_round_trip() -> None:
    a = step("a", "x.a", args={"n": "${inputs.n}"}, retry={"maxAttempts": 3, "initialDelay": "1s"})
    b, c = step("b", "x.b", timeout="250ms"), step("c", "x.c", on_error="continue")
    flow = Flow(
        "round-trip",
        a >> (b & c),
        inputs={"n": {"type": "integer", "required": True}},
        outputs={"b": "${steps.b.output}"},
        initial_state="stopped",
        description="there and back",
    )
    text = flow.to_yaml()
    assert "maxAttempts: 3" in text and "onError: continue" in text and "250ms" in text
    again = Flow.from_yaml(text)
    assert again == flow
    assert again.to_yaml() == text
    assert again.resource == flow.resource


def test_spec_section_3_example(app) -> None:
    upper = step("upper", "text.upper", args={"message": "${inputs.message}"})
    rev = step(
        "reverse", "text.reverse", args={"message": "${steps.upper.output}"},
        retry={"maxAttempts": 5},
    )  # fmt: skip
    spaces = step("spaces", "text.count_spaces", args={"message": "${inputs.message}"})
    flow = Flow(
        "text",
        upper >> (rev & spaces),
        inputs={"message": {"type": "string", "required": True}},
        outputs={"message": "${steps.reverse.output}"},
        initial_state="started",
    )
    again = Flow.from_yaml(flow.to_yaml())
    assert again == flow
    doc = flow.to_dict()
    assert doc["metadata"] == {"name": "text"}
    assert doc["spec"]["initialState"] == "started"
    first, par = doc["spec"]["steps"]
    assert first["task"] == "text.upper"
    assert [b["id"] for b in par["parallel"]] == ["reverse", "spaces"]
    assert par["parallel"][0]["retry"] == {"maxAttempts": 5}
    plan, canvas = compile_flow(app, flow.resource)
    assert shape(canvas) == ["upper", {"chord": ["reverse", "spaces"]}, par["id"]]
    assert plan.nodes["reverse"].retry.max_attempts == 5
    assert plan.nodes["spaces"].retry.max_attempts == 1


def test_retry_countdown_stays_finite_for_any_attempt() -> None:
    """An exponential policy without maxDelay after 999 attempts: capped, not inf/NaN
    (a float overflow, or uniform(0, inf) under jitter, would break the retry)."""
    import math

    from orchestrator.model import RetryPolicy
    from orchestrator.policy import retry_countdown

    policy = RetryPolicy(
        maxAttempts=1000, backoff="exponential", initialDelay="36500d", jitter=True
    )
    for attempt in (1, 63, 64, 999):
        delay = retry_countdown(policy, attempt)
        assert math.isfinite(delay) and delay >= 0
