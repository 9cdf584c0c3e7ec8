"""Definitions that used to crash or exhaust a process: refused with a clear problem.

``orchestrator validate``/``deploy``/``compile``/``graph`` on NaN durations, documents
nested too deep, files over ``ORCHESTRATOR_MAX_DEFINITION_BYTES``, alias bombs, step trees
nested too deep and subflow cycles: exit status 1, the problem on stderr, no traceback.
``Client.deploy`` refuses subflow cycles through flows already deployed (a private Redis).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.errors import DefinitionError
from orchestrator.loader import MAX_STEP_NESTING, load_string
from orchestrator.model import FlowResource
from tests.support import free_port


def _flow(name: str, steps: str) -> str:
    return f"apiVersion: orchestrator/v1\nkind: Flow\nmetadata:\n  name: {name}\nspec:\n{steps}"


def _nested_sequences(levels: int, name: str = "deep", task: str = "x.leaf") -> str:
    step = f'{{"id": "leaf", "task": "{task}", "with": {{"level": {levels}}}}}'
    for i in range(levels - 1):
        step = f'{{"id": "s{i}", "steps": [{step}]}}'
    return (
        f'{{"apiVersion": "orchestrator/v1", "kind": "Flow", "metadata": {{"name": "{name}"}},'
        f' "spec": {{"steps": [{step}]}}}}\n'
    )


BOMB = "kind: Flow\n" + "\n".join(
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [
        f"{level}: &{level} [" + ", ".join([f"*{prev}"] * 10) + "]"
        for level, prev in zip("bcdefghi", "abcdefgh", strict=True)
    ]
)

#: file name, text, what stderr must say (after "<file>:<line>: ")
BAD = {
    "nan.yaml": (
        _flow("nan", "  steps:\n    - {id: a, task: x.a, timeout: .nan}\n"),
        ":7: spec.steps[0].timeout: a duration must be a finite number of seconds; got nan",
    ),
    "inf-sleep.yaml": (
        _flow("inf", "  steps:\n    - {id: a, sleep: .inf}\n"),
        ":7: spec.steps[0].sleep: a duration must be a finite number of seconds; got inf",
    ),
    "negative-delay.yaml": (
        _flow("neg", "  steps:\n    - {id: a, task: x.a, retry: {initialDelay: -1s}}\n"),
        ":7: spec.steps[0].retry.initialDelay: expected a duration",
    ),
    "nan.json": (
        '{"apiVersion": "orchestrator/v1", "kind": "Flow", "metadata": {"name": "nanj"},\n'
        ' "spec": {"steps": [{"id": "a", "task": "x.a", "timeout": NaN}]}}\n',
        ":2: spec.steps[0].timeout: a duration must be a finite number of seconds; got nan",
    ),
    "deep.json": (
        '{"apiVersion": "orchestrator/v1", "kind": "Flow", "metadata": {"name": "dj"},\n'
        ' "spec": {"steps": [{"id": "a", "task": "x.a", "with": {"v": '
        + "[" * 100_000
        + "]" * 100_000
        + "}}]}}",
        ":2: the document is nested more than 100 levels deep (mappings and lists)",
    ),
    "deep.yaml": (
        _flow("dy", "  steps:\n    - {id: a, task: x.a, with: {v: " + "[" * 5000 + "]" * 5000)
        + "}}\n",
        ":7: the document is nested more than 100 levels deep (mappings and lists)",
    ),
    "tree500.json": (
        _nested_sequences(500),
        ":1: the document is nested more than 100 levels deep",
    ),
    "tree33.json": (
        _nested_sequences(MAX_STEP_NESTING + 1),
        f"steps are nested more than {MAX_STEP_NESTING} levels deep (a step inside a step",
    ),
    "bomb.yaml": (BOMB, ":1: aliases expand to over 10000 nodes; refusing the document"),
    "itself.yaml": (
        _flow("itself", "  steps:\n    - {id: again, flow: itself}\n"),
        ":7: spec.steps[0].flow: subflow cycle: itself → itself",
    ),
}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # Nothing here may reach a Redis: point every URL at a port nothing listens on.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for name in ("REDIS_URL", "BROKER_URL", "RESULT_BACKEND"):
        monkeypatch.setenv(f"ORCHESTRATOR_{name}", dead)
    return CliRunner()


def _refused(runner: CliRunner, args: list[str], expected: str) -> str:
    """Run the CLI; it must exit 1 with ``expected`` on stderr. Returns stderr."""
    # catch_exceptions=False: a traceback would fail the test rather than exit 1.
    result = runner.invoke(cli, args, prog_name="orchestrator", catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return result.stderr


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("command", ["validate", "deploy", "compile", "graph"])
def test_bad_definitions_exit_1_with_the_problem_on_stderr(
    runner: CliRunner, tmp_path: Path, name: str, command: str
) -> None:
    text, expected = BAD[name]
    path = tmp_path / name
    path.write_text(text)
    want = f"{path}{expected}" if expected.startswith(":") else expected
    assert _refused(runner, [command, str(path)], want).startswith(f"{path}:")


def test_a_file_over_max_definition_bytes_is_refused_by_every_command(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_MAX_DEFINITION_BYTES", "4096")
    path = tmp_path / "big.yaml"
    path.write_text(_flow("big", "  steps:\n    - {id: a, task: x.a}\n") + "#" * 5000 + "\n")
    size = path.stat().st_size
    for command in ("validate", "deploy", "compile", "graph"):
        _refused(
            runner,
            [command, str(path)],
            f"{path}: the file is {size:,} bytes, over the limit of 4,096 "
            "(ORCHESTRATOR_MAX_DEFINITION_BYTES)",
        )


def test_a_static_foreach_over_the_limit_is_refused(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_MAX_FOREACH_ITEMS", "3")
    path = tmp_path / "each.yaml"
    path.write_text(
        _flow(
            "each",
            '  steps:\n    - {id: e, forEach: "${[1, 2, 3, 4]}", do: {id: d, task: x.d}}\n',
        )
    )
    _refused(
        runner,
        ["validate", str(path)],
        f"{path}:7: spec.steps[0].forEach: step 'e': forEach over 4 items, over the limit of 3 "
        "(ORCHESTRATOR_MAX_FOREACH_ITEMS)",
    )


def test_validate_json_lists_the_limit_problem(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text(BAD["deep.json"][0])
    result = runner.invoke(
        cli, ["validate", "--json", str(path)], prog_name="orchestrator", catch_exceptions=False
    )
    assert result.exit_code == 1
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["file"] == str(path) and problem["line"] == 2
    assert "nested more than 100 levels deep" in problem["message"]


# -- deploy against a private Redis: subflow cycles through deployed flows --------------


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _calls(name: str, *subflows: str) -> str:
    steps = "".join(f"    - {{id: call{i}, flow: {sub}}}\n" for i, sub in enumerate(subflows))
    return _flow(name, "  steps:\n    - {id: work, task: tests.noop}\n" + steps)


@pytest.mark.integration
def test_deploy_refuses_a_flow_that_closes_a_cycle_through_deployed_flows(client) -> None:
    a, b, c = _name("a"), _name("b"), _name("c")
    client.deploy(_calls(a, b))  # b is not deployed yet: no cycle, a deploys
    client.deploy(_calls(b, c))
    with pytest.raises(DefinitionError) as info:
        client.deploy(_calls(c, a))
    (problem,) = info.value.problems
    assert problem.message == (
        f"flow {c!r}: subflow cycle: {c} → {a} → {b} → {c} (a flow may not start itself, "
        "directly or through other flows)"
    )
    assert problem.path == "spec.steps[1].flow"
    assert client.store.flow_info(c) is None  # nothing was stored


@pytest.mark.integration
def test_deploy_refuses_a_python_flow_that_starts_itself(client) -> None:
    name = _name("self")
    (loaded,) = load_string(_calls(name, "other"))
    flow = loaded.resource
    assert isinstance(flow, FlowResource)
    flow.spec.steps[1].flow = name  # built in Python: the loader never saw the cycle
    with pytest.raises(DefinitionError, match=rf"subflow cycle: {name} → {name} "):
        client.deploy(flow)
    assert client.store.flow_info(name) is None


@pytest.mark.integration
def test_the_flows_being_deployed_replace_the_deployed_ones_in_the_check(client) -> None:
    a, b = _name("a"), _name("b")
    client.deploy(_calls(a, b))
    with pytest.raises(DefinitionError, match=rf"subflow cycle: {b} → {a} → {b}"):
        client.deploy(_calls(b, a))
    # The same b, deployed with an a that no longer calls it, is fine.
    client.deploy(_calls(a), _calls(b, a))
    assert client.store.flow_info(b) is not None


@pytest.mark.integration
def test_a_cycle_deployed_before_does_not_block_an_unrelated_deploy(client) -> None:
    a, b, c = _name("a"), _name("b"), _name("c")
    # Stored directly, as a deploy from before this check would have.
    for name, other in ((a, b), (b, a)):
        (loaded,) = load_string(_calls(name, other))
        client.store.save_definition(name, "v1", loaded.resource.document(), "started")
    (deployed,) = client.deploy(_calls(c, a))
    assert deployed.name == c


@pytest.mark.integration
def test_cli_deploy_names_the_cycle(client, orch_env, monkeypatch, tmp_path: Path) -> None:
    for key, value in orch_env.items():
        monkeypatch.setenv(key, value)
    a, b = _name("a"), _name("b")
    client.deploy(_calls(a, b))
    path = tmp_path / "b.yaml"
    path.write_text(_calls(b, a))
    _refused(CliRunner(), ["deploy", str(path)], f"subflow cycle: {b} → {a} → {b}")


@pytest.mark.integration
def test_a_flow_nested_to_the_step_limit_deploys_and_runs(client, worker) -> None:
    name = _name("deep")
    (deployed,) = client.deploy(_nested_sequences(MAX_STEP_NESTING, name, "tests.echo"))
    run = client.trigger(deployed.name)
    client.wait(run.id, timeout=60)
    assert client.get(run.id).steps["leaf"].output == {"level": MAX_STEP_NESTING}
