"""The engine end to end: definitions deployed to a private Redis, run by real Celery workers.

Every test deploys its own flow (a unique name) and drives it through the public
client; waits are bounded polls on run state (``run.wait``, ``wait_for``). The
module's worker (prefork, concurrency 2) runs everything except the wide-parallel
test, which needs a worker configured with a small ``native_chord_max``.
"""

from __future__ import annotations

import gc
import json
import re
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from orchestrator import (
    Client,
    Deployed,
    Flow,
    FlowStopped,
    InputError,
    NotFound,
    RunFailed,
    step,
)
from orchestrator.compiler import CanvasBuilder, describe
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A flow name unique to the test."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_")).strip("-")
    return f"{base[:48].strip('-')}-{uuid.uuid4().hex[:6]}"


def deploy(client: Client, name: str, spec: str) -> Deployed:
    """Deploy a Flow whose ``spec`` is the given YAML."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    text = f"apiVersion: orchestrator/v1\nkind: Flow\nmetadata:\n  name: {name}\nspec:\n{body}\n"
    (deployed,) = client.deploy(text)
    assert deployed.name == name
    return deployed


def event_types(client: Client, run_id: str, step: str | None = None) -> list[str]:
    return [e["type"] for e in client.events(run_id) if step is None or e.get("step") == step]


# -- sequence and parallel -------------------------------------------------------------


def test_sequence_passes_outputs_step_to_step(client, name) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          n: {type: integer, required: true}
        steps:
          - {id: one, task: tests.add, with: {a: "${inputs.n}", b: 1}}
          - {id: two, task: tests.add, with: {a: "${steps.one.output}", b: 10}}
          - id: three
            task: tests.echo
            with:
              total: "${steps.two.output}"
              text: "n=${inputs.n} two=${steps.two.output}"
        outputs:
          total: "${steps.three.output.total}"
          text: "${steps.three.output.text}"
        """,
    )
    run = client.trigger(name, inputs={"n": 5})
    assert run.wait(timeout=30) == {"total": 16, "text": "n=5 two=16"}
    assert run.status == "succeeded"
    assert {k: s.output for k, s in run.steps.items()} == {
        "one": 6,
        "two": 16,
        "three": {"total": 16, "text": "n=5 two=16"},
    }


def test_parallel_fan_out_and_fan_in(client, name) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          n: {type: integer, default: 4}
        steps:
          - {id: start, task: tests.add, with: {a: "${inputs.n}", b: 0}}
          - id: fan
            parallel:
              - id: double
                task: tests.add
                with: {a: "${steps.start.output}", b: "${steps.start.output}"}
              - {id: plus_one, task: tests.add, with: {a: "${steps.start.output}", b: 1}}
              - {id: label, task: tests.echo, with: {name: "n${steps.start.output}"}}
          - id: after
            task: tests.echo
            with:
              all: "${steps.fan.output}"
              sum: "${steps.fan.output.double + steps.fan.output.plus_one}"
        outputs:
          fan: "${steps.fan.output}"
          sum: "${steps.after.output.sum}"
        """,
    )
    run = client.trigger(name)
    fan = {"double": 8, "plus_one": 5, "label": {"name": "n4"}}
    assert run.wait(timeout=30) == {"fan": fan, "sum": 13}
    assert run.steps["fan"].status == "succeeded"
    assert run.steps["fan"].output == fan
    assert run.steps["after"].output == {"all": fan, "sum": 13}
    for branch in fan:
        assert run.steps[branch].status == "succeeded"
    # The join ran after every branch had ended, and "after" after the join.
    assert run.steps["fan"].finished_at >= max(run.steps[b].finished_at for b in fan)
    assert run.steps["after"].started_at >= run.steps["fan"].finished_at


def test_parallel_with_a_nested_sequence_branch(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - id: fan
            parallel:
              - {id: single, task: tests.add, with: {a: 1, b: 1}}
              - id: chained
                steps:
                  - {id: c1, task: tests.add, with: {a: 10, b: 1}}
                  - {id: c2, task: tests.add, with: {a: "${steps.c1.output}", b: 1}}
          - {id: after, task: tests.echo, with: {fan: "${steps.fan.output}"}}
        outputs:
          fan: "${steps.fan.output}"
          c2: "${steps.c2.output}"
        """,
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"fan": {"single": 2, "chained": 12}, "c2": 12}
    assert run.steps["chained"].status == "succeeded"
    assert run.steps["chained"].output == 12  # a sequence's output is its last step's
    assert run.steps["c2"].started_at >= run.steps["c1"].finished_at
    assert run.steps["after"].output == {"fan": {"single": 2, "chained": 12}}


def test_long_sequence_continues_across_segments(client, name, settings) -> None:
    n = settings.chain_segment + 8  # the first segment's tail publishes the rest

    def output_of(i: int) -> str:
        return "${steps.s" + str(i) + ".output}"

    steps = [{"id": "s0", "task": "tests.add", "with": {"a": 0, "b": 1}}]
    for i in range(1, n):
        steps.append({"id": f"s{i}", "task": "tests.add", "with": {"a": output_of(i - 1), "b": 1}})
    outputs = {"n": output_of(n - 1)}
    deploy(client, name, yaml.safe_dump({"steps": steps, "outputs": outputs}))
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"n": n}
    assert [run.steps[f"s{i}"].output for i in range(n)] == list(range(1, n + 1))


def test_parallel_of_one_branch(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - id: fan
            parallel:
              - {id: only, task: tests.add, with: {a: 1, b: 2}}
          - {id: after, task: tests.echo, with: {fan: "${steps.fan.output}"}}
        outputs:
          after: "${steps.after.output}"
        """,
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"after": {"fan": {"only": 3}}}


def test_when_on_a_parallel(client, name) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          go: {type: boolean, required: true}
        steps:
          - id: fan
            when: "${inputs.go}"
            parallel:
              - {id: a, task: tests.add, with: {a: 1, b: 1}}
              - {id: b, task: tests.add, with: {a: 2, b: 2}}
          - {id: after, task: tests.echo, with: {fan: "${steps.fan.output}"}}
        outputs:
          fan: "${steps.after.output.fan}"
        """,
    )
    taken = client.trigger(name, inputs={"go": True})
    assert taken.wait(timeout=30) == {"fan": {"a": 2, "b": 4}}
    skipped = client.trigger(name, inputs={"go": False})
    assert skipped.wait(timeout=30) == {"fan": None}
    assert {k: skipped.steps[k].status for k in ("fan", "a", "b", "after")} == {
        "fan": "skipped",
        "a": "skipped",
        "b": "skipped",
        "after": "succeeded",
    }


def test_wide_parallel_fans_in_through_the_redis_counter(
    settings, name, worker_factory, orch_env
) -> None:
    queue = f"{orch_env['ORCHESTRATOR_DEFAULT_QUEUE']}-wide"
    worker_factory(queues=[queue], env={"ORCHESTRATOR_NATIVE_CHORD_MAX": "2"}, name="wide")
    with Client(settings.model_copy(update={"native_chord_max": 2})) as narrow:
        deploy(
            narrow,
            name,
            f"""
            defaults: {{queue: {queue}}}
            steps:
              - {{id: start, task: tests.add, with: {{a: 1, b: 1}}}}
              - id: fan
                parallel:
                  - {{id: b1, task: tests.add, with: {{a: "${{steps.start.output}}", b: 1}}}}
                  - {{id: b2, task: tests.add, with: {{a: "${{steps.start.output}}", b: 2}}}}
                  - {{id: b3, task: tests.add, with: {{a: "${{steps.start.output}}", b: 3}}}}
                  - id: b4
                    steps:
                      - {{id: b4a, task: tests.add, with: {{a: 100, b: 0}}}}
                      - {{id: b4b, task: tests.add, with: {{a: "${{steps.b4a.output}}", b: 4}}}}
              - {{id: after, task: tests.echo, with: {{fan: "${{steps.fan.output}}"}}}}
            outputs:
              fan: "${{steps.after.output.fan}}"
            """,
        )
        info, _ = narrow.flow(name)
        plan = narrow.plan(name, info["version"])
        assert not plan.nodes["fan"].static
        assert "chord" not in repr(describe(plan, narrow.app)["canvas"])
        run = narrow.trigger(name)
        outputs = run.wait(timeout=30)
        assert outputs == {"fan": {"b1": 3, "b2": 4, "b3": 5, "b4": 104}}
        assert run.steps["fan"].output == outputs["fan"]
        assert all(run.steps[k].status == "succeeded" for k in ("b1", "b2", "b3", "b4", "b4b"))
        # The last arrival at the counter took the flag that continues the run, once.
        assert narrow.store.r.hget(narrow.store.run_key(run.id), "f:fan") == "1"
        assert event_types(narrow, run.id, "fan").count("step.succeeded") == 1
        assert event_types(narrow, run.id, "after") == ["step.started", "step.succeeded"]


def test_producer_and_worker_disagreeing_on_native_chord_max(settings, name) -> None:
    with Client(settings.model_copy(update={"native_chord_max": 2})) as producer:
        deploy(
            producer,
            name,
            """
            steps:
              - id: fan
                parallel:
                  - {id: a, task: tests.add, with: {a: 1, b: 1}}
                  - {id: b, task: tests.add, with: {a: 2, b: 2}}
                  - {id: c, task: tests.add, with: {a: 3, b: 3}}
            outputs:
              fan: "${steps.fan.output}"
            """,
        )
        run = producer.trigger(name)  # the module's worker has the default (64)
        assert run.wait(timeout=30) == {"fan": {"a": 2, "b": 4, "c": 6}}


def test_trigger_leaves_no_result_subscriptions_behind(settings, name, r) -> None:
    with Client(settings) as producer:
        deploy(
            producer,
            name,
            """
            steps:
              - id: fan
                parallel:
                  - {id: a, task: tests.noop}
                  - {id: b, task: tests.noop}
            """,
        )
        before = set(r.pubsub_channels("celery-task-meta-*"))
        runs = [producer.trigger(name) for _ in range(3)]
        for run in runs:
            run.wait(timeout=30)
        gc.collect()
        leaked = set(r.pubsub_channels("celery-task-meta-*")) - before
        assert leaked == set(), f"{len(leaked)} result channels still subscribed"


# -- when and onError ------------------------------------------------------------------


def test_when_false_skips_the_step_and_the_run_goes_on(client, name) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          go: {type: boolean, default: false}
        steps:
          - {id: first, task: tests.add, with: {a: 1, b: 1}}
          - {id: maybe, task: tests.add, when: "${inputs.go}", with: {a: 100, b: 0}}
          - id: last
            task: tests.echo
            with: {maybe: "${steps.maybe.output}", status: "${steps.maybe.status}"}
        outputs:
          last: "${steps.last.output}"
        """,
    )
    skipped = client.trigger(name)
    assert skipped.wait(timeout=30) == {"last": {"maybe": None, "status": "skipped"}}
    assert skipped.steps["maybe"].status == "skipped"
    assert skipped.steps["maybe"].output is None
    assert skipped.steps["last"].status == "succeeded"
    assert "step.skipped" in event_types(client, skipped.id, "maybe")
    taken = client.trigger(name, inputs={"go": True})
    assert taken.wait(timeout=30) == {"last": {"maybe": 100, "status": "succeeded"}}


def test_when_on_a_nested_sequence_skips_all_its_steps(client, name) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          n: {type: integer}
        steps:
          - {id: first, task: tests.add, with: {a: "${inputs.n}", b: 0}}
          - id: group
            when: "${steps.first.output > 5}"
            steps:
              - {id: g1, task: tests.add, with: {a: 1, b: 1}}
              - {id: g2, task: tests.add, with: {a: "${steps.g1.output}", b: 1}}
          - id: last
            task: tests.echo
            with: {group: "${steps.group.status}", g2: "${steps.g2.output}"}
        outputs:
          last: "${steps.last.output}"
        """,
    )
    small = client.trigger(name, inputs={"n": 1})
    assert small.wait(timeout=30) == {"last": {"group": "skipped", "g2": None}}
    assert {k: small.steps[k].status for k in ("group", "g1", "g2", "last")} == {
        "group": "skipped",
        "g1": "skipped",
        "g2": "skipped",
        "last": "succeeded",
    }
    big = client.trigger(name, inputs={"n": 9})
    assert big.wait(timeout=30) == {"last": {"group": "succeeded", "g2": 3}}
    assert big.steps["group"].output == 3


def test_skipped_sequence_at_the_end_ends_the_run(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - {id: first, task: tests.add, with: {a: 1, b: 1}}
          - id: tail
            when: false
            steps:
              - {id: t1, task: tests.noop}
        outputs:
          first: "${steps.first.output}"
        """,
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"first": 2}
    assert run.steps["tail"].status == "skipped" and run.steps["t1"].status == "skipped"


def test_on_error_continue(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - {id: ok, task: tests.add, with: {a: 1, b: 2}}
          - {id: bad, task: tests.fail, onError: continue, with: {message: kaput}}
          - id: after
            task: tests.echo
            with:
              status: "${steps.bad.status}"
              output: "${steps.bad.output}"
              error: "${steps.bad.error.message}"
        outputs:
          after: "${steps.after.output}"
        """,
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"after": {"status": "failed", "output": None, "error": "kaput"}}
    assert run.status == "succeeded" and run.error is None
    bad = run.steps["bad"]
    assert bad.status == "failed"
    assert bad.output is None
    assert bad.error["type"] == "ValueError"
    assert bad.error["message"] == "kaput"
    assert bad.error["step"] == "bad"
    assert run.steps["after"].status == "succeeded"


def test_on_error_continue_in_a_parallel_branch(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - id: fan
            parallel:
              - {id: good, task: tests.add, with: {a: 2, b: 2}}
              - {id: bad, task: tests.fail, onError: continue}
          - {id: after, task: tests.echo, with: {fan: "${steps.fan.output}"}}
        outputs:
          fan: "${steps.fan.output}"
        """,
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"fan": {"good": 4, "bad": None}}
    assert run.steps["bad"].status == "failed"
    assert run.steps["after"].status == "succeeded"


# -- failures and retries --------------------------------------------------------------


def test_failing_step_fails_the_run(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - {id: ok, task: tests.add, with: {a: 1, b: 2}}
          - {id: boom, task: tests.fail, with: {message: "disk full"}}
          - {id: never, task: tests.noop}
        """,
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=30)
    failed = info.value.run
    assert failed.id == run.id
    assert failed.status == "failed" == run.status
    assert failed.error["step"] == "boom"
    assert failed.error["type"] == "ValueError"
    assert failed.error["message"] == "disk full"
    assert f"run {run.id} of {name} ended failed: disk full" == str(info.value)
    assert failed.finished_at is not None
    assert failed.steps["ok"].status == "succeeded"
    assert failed.steps["boom"].status == "failed"
    assert failed.steps["boom"].error["message"] == "disk full"
    assert "never" not in failed.steps
    types = event_types(client, run.id)
    assert types[-1] == "run.failed"
    assert types.count("step.failed") == 1
    assert types.index("step.failed") < types.index("run.failed")
    assert client.get(run.id).status == "failed"
    assert run.id in [x.id for x in client.runs(flow=name, status="failed")]


def test_failing_branch_fails_the_run_without_hanging_the_chord(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - id: fan
            parallel:
              - {id: good, task: tests.add, with: {a: 1, b: 1}}
              - {id: bad, task: tests.fail}
          - {id: never, task: tests.noop}
        """,
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=30)
    assert info.value.run.error["step"] == "bad"
    assert "never" not in info.value.run.steps
    assert info.value.run.steps["good"].status == "succeeded"
    assert info.value.run.steps["fan"].status == "failed"


def test_retries_with_backoff(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - id: flaky
            task: tests.flaky
            with: {succeed_on: 3}
            retry: {maxAttempts: 4, backoff: exponential, initialDelay: 100ms, maxDelay: 150ms,
                    jitter: false}
        outputs:
          attempt: "${steps.flaky.output.attempt}"
          attempts: "${steps.flaky.attempts}"
        """,
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"attempt": 3, "attempts": 3}
    flaky = run.steps["flaky"]
    assert flaky.status == "succeeded" and flaky.attempts == 3
    events = [e for e in client.events(run.id) if e["step"] == "flaky"]
    assert [e["type"] for e in events] == [
        "step.started",
        "step.retrying",
        "step.started",
        "step.retrying",
        "step.started",
        "step.succeeded",
    ]
    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert [e["delay"] for e in retrying] == [0.1, 0.15]  # doubled, then capped by maxDelay
    assert all(e["error"]["type"] == "ConnectionError" for e in retrying)
    assert [e["attempt"] for e in events if e["type"] == "step.started"] == [1, 2, 3]
    # The retry waited at least its countdown.
    started = [e["ts"] for e in events if e["type"] == "step.started"]
    assert started[1] - started[0] >= 0.1 - 0.01


def test_retries_exhausted_fail_the_run(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - id: flaky
            task: tests.flaky
            with: {succeed_on: 5}
            retry: {maxAttempts: 2, backoff: fixed, initialDelay: 50ms}
        """,
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed):
        run.wait(timeout=30)
    assert run.steps["flaky"].status == "failed"
    assert run.steps["flaky"].attempts == 2
    assert run.error["type"] == "ConnectionError"
    assert event_types(client, run.id, "flaky").count("step.retrying") == 1


def test_unknown_task_fails_without_retries(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - id: ghost
            task: tests.does_not_exist
            retry: {maxAttempts: 5, initialDelay: 50ms}
        """,
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed):
        run.wait(timeout=30)
    ghost = run.steps["ghost"]
    assert ghost.status == "failed"
    assert ghost.attempts == 1
    assert "tests.does_not_exist" in ghost.error["message"]
    assert "not registered" in ghost.error["message"]
    assert "step.retrying" not in event_types(client, run.id)


def test_non_json_output_fails_the_step_clearly(client, name) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - {id: weird, task: tests.not_json, retry: {maxAttempts: 3, initialDelay: 50ms}}
        """,
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed):
        run.wait(timeout=30)
    weird = run.steps["weird"]
    assert weird.status == "failed"
    assert weird.attempts == 1  # retrying cannot make it JSON
    assert "output of step 'weird' is not JSON" in weird.error["message"]
    assert "set" in weird.error["message"]


# -- triggering ------------------------------------------------------------------------


def test_idempotent_trigger(client, name) -> None:
    deploy(client, name, "steps:\n  - {id: a, task: tests.add, with: {a: 1, b: 1}}")
    first = client.trigger(name, idempotency_key="order-1")
    again = client.trigger(name, idempotency_key="order-1")
    assert again.id == first.id
    other = client.trigger(name, idempotency_key="order-2")
    assert other.id != first.id
    first.wait(timeout=30)
    other.wait(timeout=30)
    late = client.trigger(name, idempotency_key="order-1")  # after it ended: still the same
    assert late.id == first.id and late.status == "succeeded"
    assert late.idempotency_key == "order-1"
    assert sorted(x.id for x in client.runs(flow=name)) == sorted([first.id, other.id])
    created = [e for e in client.events(first.id) if e["type"] == "run.created"]
    assert len(created) == 1


def test_bad_inputs_are_rejected_and_nothing_is_stored(client, name) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          since: {type: string, format: date, required: true}
          limit: {type: integer, minimum: 1}
        steps:
          - {id: a, task: tests.echo, with: {since: "${inputs.since}"}}
        """,
    )
    cases = [
        ({}, "since"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-01", "limit": 0}, "limit"),
        ({"since": "2026-01-01", "limit": "ten"}, "limit"),
        ({"since": "2026-01-01", "sinse": "2026-01-01"}, "sinse"),
    ]
    for inputs, field in cases:
        with pytest.raises(InputError) as info:
            client.trigger(name, inputs=inputs, idempotency_key="k")
        assert info.value.field == field
        assert repr(field) in str(info.value)
    assert client.runs(flow=name) == []
    # The idempotency key was not claimed by the refused triggers.
    run = client.trigger(name, inputs={"since": "2026-01-01"}, idempotency_key="k")
    assert run.wait(timeout=30) == {}
    assert run.steps["a"].output == {"since": "2026-01-01"}
    assert [x.id for x in client.runs(flow=name)] == [run.id]


def test_stopped_flow_refuses_triggers(client, name) -> None:
    deploy(
        client,
        name,
        "initialState: stopped\nsteps:\n  - {id: a, task: tests.add, with: {a: 1, b: 1}}",
    )
    with pytest.raises(FlowStopped, match=name):
        client.trigger(name)
    client.start_flow(name)
    run = client.trigger(name)
    run.wait(timeout=30)
    client.stop_flow(name)
    with pytest.raises(FlowStopped):
        client.trigger(name)
    assert [x.id for x in client.runs(flow=name)] == [run.id]
    # Redeploying does not restart a stopped flow.
    deploy(client, name, "initialState: started\nsteps:\n  - {id: a, task: tests.noop}")
    assert client.flow(name)[0]["state"] == "stopped"
    with pytest.raises(NotFound):
        client.trigger(f"{name}-never-deployed")


# -- run state -------------------------------------------------------------------------


def test_run_state_after_completion(client, name, worker) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          n: {type: integer, required: true}
          label: {type: string, default: sum}
        steps:
          - {id: one, task: tests.add, with: {a: "${inputs.n}", b: 1}}
          - id: two
            task: tests.echo
            with: {label: "${inputs.label}", value: "${steps.one.output}"}
        outputs:
          value: "${steps.two.output.value}"
        """,
    )
    t0 = time.time()
    run = client.trigger(name, inputs={"n": 41})
    assert run.status == "pending"
    run.wait(timeout=30)
    t1 = time.time()
    got = client.get(run.id)
    assert got.id == run.id and got.flow == name
    assert got.version == client.flow(name)[0]["version"]
    assert got.status == "succeeded"
    assert got.inputs == {"n": 41, "label": "sum"}
    assert got.outputs == {"value": 42}
    assert got.error is None
    assert t0 <= got.created_at <= got.started_at <= got.finished_at <= t1
    assert set(got.steps) == {"one", "two"}
    expected = {
        "one": ({"a": 41, "b": 1}, 42),
        "two": ({"label": "sum", "value": 42}, {"label": "sum", "value": 42}),
    }
    for key, (inputs, output) in expected.items():
        s = got.steps[key]
        assert s.status == "succeeded"
        assert s.attempts == 1
        assert s.input == inputs
        assert s.output == output
        assert s.error is None
        assert got.created_at <= s.started_at <= s.finished_at <= got.finished_at
        assert s.duration is not None and s.duration >= 0
        assert s.worker.startswith(f"{worker.hostname}:")
    assert got.steps["one"].finished_at <= got.steps["two"].started_at
    types = event_types(client, run.id)
    assert types == [
        "run.created",
        "step.started",
        "step.succeeded",
        "step.started",
        "step.succeeded",
        "run.succeeded",
    ]
    assert [e["step"] for e in client.events(run.id)][1:5] == ["one", "one", "two", "two"]
    assert run.id in [x.id for x in client.runs(flow=name, status="succeeded")]
    assert run.id not in [x.id for x in client.runs(flow=name, status="running")]
    with pytest.raises(NotFound):
        client.get("no-such-run")


def test_new_version_does_not_change_a_run_in_flight(client, name, r) -> None:
    spec = """
        inputs:
          gate: {{type: string, required: true}}
        steps:
          - {{id: hold, task: tests.gate, with: {{key: "${{inputs.gate}}"}}}}
          - id: rest
            when: true
            steps:
              - {{id: mark, task: tests.echo, with: {{version: {version}}}}}
        outputs:
          version: "${{steps.mark.output.version}}"
        """
    v1 = deploy(client, name, spec.format(version="one"))
    gate1 = f"gate:{uuid.uuid4().hex}"
    run1 = client.trigger(name, inputs={"gate": gate1})
    wait_for(
        lambda: getattr(client.get(run1.id).steps.get("hold"), "status", None) == "running",
        timeout=30,
        message="the first run's gate step never started",
    )
    v2 = deploy(client, name, spec.format(version="two"))
    assert v2.version != v1.version
    assert client.flow(name)[0]["version"] == v2.version
    gate2 = f"gate:{uuid.uuid4().hex}"
    r.rpush(gate2, "open")  # the second run passes its gate at once
    run2 = client.trigger(name, inputs={"gate": gate2})
    assert run2.wait(timeout=30) == {"version": "two"}
    assert client.get(run1.id).status == "running"
    r.rpush(gate1, "open")
    assert run1.wait(timeout=30) == {"version": "one"}
    assert run1.version == v1.version and run2.version == v2.version


def test_duplicate_delivery_does_not_run_a_succeeded_step_twice(
    client, name, r, settings, worker
) -> None:
    deploy(
        client,
        name,
        """
        inputs:
          counter: {type: string, required: true}
          gate: {type: string, required: true}
        steps:
          - {id: first, task: tests.count, with: {key: "${inputs.counter}:first", value: 1}}
          - {id: second, task: tests.count, with: {key: "${inputs.counter}:second", value: 2}}
          - {id: hold, task: tests.gate, with: {key: "${inputs.gate}"}}
          - {id: last, task: tests.count, with: {key: "${inputs.counter}:last", value: 3}}
        outputs:
          last: "${steps.last.output}"
        """,
    )
    counter, gate = f"count:{uuid.uuid4().hex}", f"gate:{uuid.uuid4().hex}"
    run = client.trigger(name, inputs={"counter": counter, "gate": gate})

    plan = client.plan(name, run.version)
    builder = CanvasBuilder(client.app, plan, run.id)

    def resend(step_id: str, tail: bool, task_id: str | None = None) -> str:
        """Publish the step's message again, as the run's canvas carried it; its task id."""
        sig = builder.signature(plan.nodes[step_id], (), tail=tail)
        assert sig.task == "orchestrator.step"
        assert sig.args == (run.id, name, run.version, step_id, [], tail)
        return sig.apply_async(task_id=task_id).id

    def handled(task_id: str, outcome: str) -> None:
        wait_for(
            lambda: f"[{task_id}] {outcome}" in worker.log_text(),
            timeout=30,
            message=f"the worker did not report message {task_id} {outcome}",
        )

    wait_for(
        lambda: getattr(client.get(run.id).steps.get("hold"), "status", None) == "running",
        timeout=30,
        message="the run never reached its gate",
    )
    before = client.get(run.id)
    events_before = client.events(run.id)
    assert r.get(f"{counter}:first") == "1" and r.get(f"{counter}:second") == "1"
    # While the run is in flight: "first" again under its own task id, "second" under a new one.
    first_task_id = json.loads(client.store.run_hash(run.id)["s:first"])["task_id"]
    # Each is delivered, found done, and acknowledged without running the task.
    handled(resend("first", False, first_task_id), "succeeded")
    handled(resend("second", False), "succeeded")
    assert r.get(f"{counter}:first") == "1" and r.get(f"{counter}:second") == "1"
    now = client.get(run.id)
    assert now.steps["first"] == before.steps["first"]
    assert now.steps["second"] == before.steps["second"]
    assert client.events(run.id) == events_before

    r.rpush(gate, "open")
    assert run.wait(timeout=30) == {"last": 3}
    after = client.get(run.id).as_dict()
    events_after = client.events(run.id)
    # After the run ended: its tail message again. The worker drops it (the run is over).
    handled(resend("last", True), "ignored")
    assert r.get(f"{counter}:last") == "1"
    assert client.get(run.id).as_dict() == after
    assert client.events(run.id) == events_after
    assert [e["type"] for e in events_after].count("run.succeeded") == 1


def test_current_step_inside_a_task(client, name, worker) -> None:
    deploy(
        client,
        name,
        """
        steps:
          - {id: warmup, task: tests.noop}
          - {id: ctx, task: tests.context}
        outputs:
          ctx: "${steps.ctx.output}"
        """,
    )
    run = client.trigger(name)
    ctx = run.wait(timeout=30)["ctx"]
    assert ctx["run_id"] == run.id
    assert ctx["flow"] == name
    assert ctx["step"] == "ctx"
    assert ctx["attempt"] == 1
    assert ctx["idempotency_key"] == f"{run.id}:ctx"
    assert ctx["worker"] == run.steps["ctx"].worker
    assert ctx["worker"].startswith(f"{worker.hostname}:")


# -- the DSL and the examples ----------------------------------------------------------


def test_dsl_flow_from_the_spec_runs(client) -> None:
    upper = step("upper", "text.upper", args={"message": "${inputs.message}"})
    rev = step(
        "reverse", "text.reverse", args={"message": "${steps.upper.output}"},
        retry={"maxAttempts": 5},
    )  # fmt: skip
    spaces = step("spaces", "text.count_spaces", args={"message": "${inputs.message}"})
    flow = Flow(
        "text-dsl",
        upper >> (rev & spaces),
        inputs={"message": {"type": "string", "required": True}},
        outputs={"message": "${steps.reverse.output}"},
        initial_state="started",
    )
    (deployed,) = client.deploy(flow)
    assert deployed.name == "text-dsl"
    run = client.trigger("text-dsl", inputs={"message": "hello dsl world"})
    assert run.wait(timeout=30) == {"message": "DLROW LSD OLLEH"}
    assert run.steps["spaces"].output == 2
    assert run.version == deployed.version


def test_example_text_flow(client) -> None:
    (deployed,) = client.deploy(REPO / "flows" / "text.yaml")
    run = client.trigger(deployed.name, inputs={"message": "hello big world"})
    assert run.wait(timeout=30) == {"message": "DLROW GIB OLLEH", "spaces": 2}
    assert run.steps["upper"].output == "HELLO BIG WORLD"
    assert run.steps["fan"].output == {"reverse": "DLROW GIB OLLEH", "spaces": 2}


def test_example_etl_flow(client) -> None:
    (deployed,) = client.deploy(str(REPO / "flows" / "etl.yaml"))
    run = client.trigger(deployed.name)
    outputs = run.wait(timeout=60)
    rows = 3 * 50
    rejected = len([i for i in range(rows) if i % 7 == 0])
    assert outputs["extract_attempts"] == 3
    assert outputs["rejected"] == rejected
    assert outputs["loaded"] == rows - rejected
    assert re.fullmatch(r"[0-9a-f]{12}", outputs["checksum"])
    assert run.steps["extract"].attempts == 3
    assert Counter(event_types(client, run.id, "extract"))["step.retrying"] == 2
    assert run.steps["load"].output["table"] == "warehouse.customers"
