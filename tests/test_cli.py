"""The command line without Redis (orchestrator/cli/): what works on files alone,
exit statuses, usage errors and option parsing. Commands that talk to Redis and
workers are in tests/integration/test_cli_integration.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import cli, definition_schema, parse_inputs, pool_args
from tests.support import REPO_ROOT, free_port

FLOWS = REPO_ROOT / "flows"
POOLS = REPO_ROOT / "workers" / "pools.yaml"

SAGA = """\
apiVersion: orchestrator/v1
kind: Flow
metadata:
  name: saga
spec:
  steps:
    - id: reserve
      task: shop.reserve
      compensate: {id: release, task: shop.release}
    - id: each
      forEach: "${steps.reserve.output}"
      concurrency: 2
      do: {id: ship, task: shop.ship, with: {item: "${item}"}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata:
  name: other
spec:
  steps:
    - {id: only, task: shop.only}
"""

INVALID = """\
apiVersion: orchestrator/v1
kind: Flow
metadata:
  name: broken
spec:
  steps:
    - id: first
      task: shop.first
      retries: 3
    - id: second
      task: shop.second
      priority: high
"""


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # Nothing here may reach a Redis: point every URL at a port nothing listens on.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for name in ("REDIS_URL", "BROKER_URL", "RESULT_BACKEND"):
        monkeypatch.setenv(f"ORCHESTRATOR_{name}", dead)
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli, list(args), prog_name="orchestrator", catch_exceptions=False)


# -- validate -----------------------------------------------------------------------------


def test_validate_example_flows(runner: CliRunner) -> None:
    result = invoke(runner, "validate", str(FLOWS))
    assert result.exit_code == 0, result.output
    assert re.search(r"^OK  Flow etl  .*flows/etl\.yaml:\d+$", result.stdout, re.M)
    assert re.search(r"^OK  Flow text  .*flows/text\.yaml:\d+$", result.stdout, re.M)
    assert result.stderr == ""


def test_validate_reports_every_problem_with_file_and_line(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(INVALID)
    result = invoke(runner, "validate", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 2, result.stderr
    assert any(line.startswith(f"{path}:9: spec.steps[0].retries: ") for line in lines), (
        result.stderr
    )
    assert any(line.startswith(f"{path}:12: spec.steps[1].priority: ") for line in lines), (
        result.stderr
    )


def test_validate_json(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(INVALID)
    result = invoke(runner, "validate", "--json", str(path))
    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert body["ok"] is False
    assert {"file": str(path), "line": 9} == {k: body["problems"][0][k] for k in ("file", "line")}
    ok = json.loads(invoke(runner, "validate", "--json", str(FLOWS)).stdout)
    assert ok["ok"] is True
    assert {"etl", "text"} <= {r["name"] for r in ok["resources"]}


def test_validate_a_saga_with_compensation_and_one_step_do(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "saga.yaml"
    path.write_text(SAGA)
    result = invoke(runner, "validate", str(path))
    assert result.exit_code == 0, result.output
    assert "OK  Flow saga" in result.stdout and "OK  Flow other" in result.stdout


def test_validate_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1
    assert "nope.yaml" in result.stderr


# -- usage errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["validate"],
        ["deploy"],
        ["no-such-command"],
        ["run"],
        ["graph", "flows/text.yaml", "--format", "png"],
        ["runs", "ls", "--status", "exploded"],
        ["runs", "ls", "--limit", "many"],
        ["run", "text", "--input", "no-equals-sign"],
        ["run", "text", "--input", "=3"],
        ["run", "text", "--inputs-json", "[1, 2]"],
        ["run", "text", "--inputs-json", "{not json"],
        ["graph"],
    ],
)
def test_wrong_usage_exits_2(runner: CliRunner, args: list[str]) -> None:
    result = invoke(runner, *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Error" in result.stderr or "Usage" in result.stderr


def test_help_everywhere(runner: CliRunner) -> None:
    for args in (
        [],
        ["validate"],
        ["deploy"],
        ["flows"],
        ["flows", "ls"],
        ["flows", "view"],
        ["flows", "status"],
        ["graph"],
        ["compile"],
        ["run"],
        ["runs"],
        ["runs", "show"],
        ["runs", "logs"],
        ["worker"],
        ["schema"],
        ["demo"],
    ):
        result = invoke(runner, *args, "--help")
        assert result.exit_code == 0, (args, result.output)
        assert "Usage: orchestrator" in result.stdout


def test_redis_unreachable_is_an_error_not_a_traceback(runner: CliRunner) -> None:
    result = invoke(runner, "flows", "ls")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:")


def test_invalid_definition_is_reported_before_redis_is_asked(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(INVALID)
    result = invoke(runner, "deploy", str(path))
    assert result.exit_code == 1
    assert f"{path}:9:" in result.stderr
    assert "cannot reach Redis" not in result.stderr


# -- compile ------------------------------------------------------------------------------


def test_compile_path_shows_chain_chord_and_options(runner: CliRunner) -> None:
    result = invoke(runner, "compile", str(FLOWS / "text.yaml"))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("# flow text version local\n")
    canvas = out.split("\n\n", 1)[0]
    assert "chain(" in canvas and "chord(" in canvas and "group(" in canvas
    assert "orchestrator.step.si('upper'" in canvas
    assert "[tail: continues the run]" in canvas
    for column in ("queue", "priority", "soft_time_limit", "time_limit", "rate_limit"):
        assert column in out
    assert "max_retries" in out and "countdown" in out
    assert re.search(r"upper\s+│ task\s+│ text\.upper\s+│ default", out)


def test_compile_shows_retry_countdown_policy(runner: CliRunner) -> None:
    out = invoke(runner, "compile", str(FLOWS / "etl.yaml")).stdout
    extract = next(line for line in out.splitlines() if "etl.extract" in line)
    cells = [c.strip() for c in extract.strip("│ ").split("│")]
    # maxAttempts 5 from the step, backoff from the flow's defaults; timeout 60s.
    assert cells[:4] == ["extract", "task", "etl.extract", "default"]
    assert "60s" in cells and "66s" in cells
    assert "4" in cells
    assert "exponential 200ms..2s, jitter" in cells


def test_compile_json(runner: CliRunner) -> None:
    result = invoke(runner, "compile", "--json", str(FLOWS / "text.yaml"))
    body = json.loads(result.stdout)
    assert body["version"] == "local"
    assert "chain" in body["canvas"]
    assert body["steps"]["reverse"]["queue"] == "default"
    assert body["steps"]["fan"]["kind"] == "parallel"


def test_compile_several_flows_in_a_file_needs_flow(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(SAGA)
    result = invoke(runner, "compile", str(path))
    assert result.exit_code == 2
    assert "--flow" in result.stderr and "saga, other" in result.stderr
    result = invoke(runner, "compile", str(path), "--flow", "other")
    assert result.exit_code == 0, result.output
    assert "orchestrator.step.si('only'" in result.stdout


# -- graph --------------------------------------------------------------------------------


def test_graph_path_mermaid_and_dot(runner: CliRunner) -> None:
    result = invoke(runner, "graph", str(FLOWS / "text.yaml"))
    assert result.exit_code == 0, result.output
    assert "flowchart TD" in result.stdout
    assert 's_upper["upper<br/>text.upper"]' in result.stdout
    result = invoke(runner, "graph", str(FLOWS / "etl.yaml"), "--format", "dot")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('digraph "etl" {')
    assert "s_extract -> s_validate;" in result.stdout


def test_graph_of_a_saga_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "saga.yaml"
    path.write_text(SAGA)
    out = invoke(runner, "graph", str(path), "--flow", "saga").stdout
    assert 's_reserve -.->|"compensate"| s_release' in out
    assert "for each ${steps.reserve.output}<br/>concurrency 2" in out


# -- schema -------------------------------------------------------------------------------


def test_schema_is_json_schema_of_every_step_kind(runner: CliRunner) -> None:
    result = invoke(runner, "schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["$id"] and schema["title"]
    defs = schema["$defs"]
    for kind in ("TaskStep", "SequenceStep", "ParallelStep", "ForEachStep", "SwitchStep"):
        assert kind in defs
    assert "TryStep" in defs
    task = defs["TaskStep"]
    assert {"id", "task", "with", "retry", "onError", "rateLimit"} <= set(task["properties"])
    assert task["additionalProperties"] is False
    assert {"try", "catch", "finally"} <= set(defs["TryStep"]["properties"])
    assert "forEach" in defs["ForEachStep"]["properties"]
    # Durations are strings with units or numbers, as the loader accepts them.
    timeout = json.dumps(task["properties"]["timeout"])
    assert '"type": "string"' in timeout and '"type": "number"' in timeout
    assert schema == definition_schema()


def test_schema_duration_pattern_matches_what_the_loader_accepts() -> None:
    from orchestrator.model import parse_duration

    timeout = json.dumps(definition_schema()["$defs"]["TaskStep"]["properties"]["timeout"])
    pattern = json.loads(re.search(r'"pattern": ("(?:[^"\\]|\\.)*")', timeout).group(1))
    for good in ("250ms", "1.5s", "10m", "48h", "2d", "30"):
        assert re.match(pattern, good), good
        parse_duration(good)
    for bad in ("ten seconds", "5 weeks", "-1s"):
        assert not re.match(pattern, bad), bad


def test_schema_output_file(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "flow.schema.json"
    result = invoke(runner, "schema", "--output", str(target))
    assert result.exit_code == 0
    assert json.loads(target.read_text())["$id"]
    assert result.stdout == ""


# -- worker -------------------------------------------------------------------------------


def test_pool_args_from_the_pools_file() -> None:
    assert pool_args(POOLS, "default") == ["-Q", "default", "-c", "2", "-P", "prefork"]
    assert pool_args(POOLS, "io") == ["-Q", "io", "-c", "8", "-P", "threads"]


def test_worker_pool_missing_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "worker", "--pool", "nope", "--pools-file", str(POOLS))
    assert result.exit_code == 2
    assert "no pool 'nope'" in result.stderr and "default, io" in result.stderr
    result = invoke(runner, "worker", "--pool", "io", "--pools-file", str(tmp_path / "x.yaml"))
    assert result.exit_code == 2
    assert "no pools file" in result.stderr


def test_worker_pool_with_bad_values_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text("pools:\n  odd: {queues: [a], concurrency: zero}\n")
    result = invoke(runner, "worker", "--pool", "odd", "--pools-file", str(path))
    assert result.exit_code == 2
    assert "concurrency must be a positive integer" in result.stderr


def test_worker_passes_celery_options_through(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import worker as worker_module

    calls: list[list[str]] = []
    monkeypatch.setattr(worker_module.app, "worker_main", lambda argv: calls.append(argv))
    args = ["-l", "INFO", "-c", "3", "-I", "workers.examples", "-n", "w1@%h", "--without-gossip"]
    result = invoke(runner, "worker", "--pool", "io", "--pools-file", str(POOLS), *args)
    assert result.exit_code == 0, result.output
    # The pool's options first, so the ones given on the command line win.
    assert calls == [["worker", "-Q", "io", "-c", "8", "-P", "threads", *args]]
    calls.clear()
    result = invoke(runner, "worker", "-Q", "a,b", "-P", "solo")
    assert result.exit_code == 0, result.output
    assert calls == [["worker", "-Q", "a,b", "-P", "solo"]]


# -- run inputs ---------------------------------------------------------------------------


def test_inputs_are_json_when_they_parse() -> None:
    assert parse_inputs(
        [
            "pages=3",
            "ratio=0.5",
            "flag=true",
            "nothing=null",
            "name=hello world",
            'quoted="42"',
            'tags=["a", "b"]',
            'obj={"k": 1}',
            "empty=",
            "eq=a=b",
        ],
        None,
    ) == {
        "pages": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "name": "hello world",
        "quoted": "42",
        "tags": ["a", "b"],
        "obj": {"k": 1},
        "empty": "",
        "eq": "a=b",
    }


def test_input_pairs_override_inputs_json() -> None:
    assert parse_inputs(["b=2"], '{"a": 1, "b": 1}') == {"a": 1, "b": 2}
    assert parse_inputs([], None) == {}


@pytest.mark.parametrize(
    ("pairs", "inputs_json"),
    [(["novalue"], None), (["=1"], None), ([], "[1]"), ([], "nope"), ([], '"text"')],
)
def test_bad_inputs_are_usage_errors(pairs: list[str], inputs_json: str | None) -> None:
    with pytest.raises(click.BadParameter):
        parse_inputs(pairs, inputs_json)


def test_version(runner: CliRunner) -> None:
    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("orchestrator, version ")
