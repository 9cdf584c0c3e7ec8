"""The pytest plugin ``orchestrator.testing``, as a user's project sees it.

A small project (its own task module, flow files, a ``pytest.ini``) is written to a
temporary directory and its tests run in a pytest subprocess, which loads the plugin
through its ``pytest11`` entry point like any installation would.
"""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

TASKS = '''
import os

from celery import shared_task


def lookup(name):
    """What a test in process may monkeypatch."""
    return f"hello {name}"


@shared_task(name="demo.greet")
def greet(name):
    return lookup(name)


@shared_task(name="demo.shout")
def shout(text):
    if "boom" in text:
        raise ValueError(f"cannot shout {text!r}")
    return text.upper() + "!"


@shared_task(name="demo.pid")
def pid():
    return os.getpid()


@shared_task(name="demo.env")
def env(name):
    return os.environ.get(name)
'''

GREETING = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: greeting}
spec:
  inputs:
    name: {type: string, required: true}
  steps:
    - {id: greet, task: demo.greet, with: {name: "${inputs.name}"}}
    # A queue of its own: the fixtures must find it in the plan and consume it.
    - {id: shout, task: demo.shout, queue: loud, with: {text: "${steps.greet.output}"}}
    - {id: pid, task: demo.pid}
  outputs:
    text: "${steps.shout.output}"
    pid: "${steps.pid.output}"
"""

ENV = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: env}
spec:
  inputs:
    name: {type: string, required: true}
  steps: [{id: env, task: demo.env, with: {name: "${inputs.name}"}}]
  outputs: {value: "${steps.env.output}"}
"""

NAP = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: nap}
spec:
  steps:
    - {id: nap, sleep: 300ms}
    - {id: pid, task: demo.pid}
  outputs:
    pid: "${steps.pid.output}"
"""

USER_TESTS = '''
import os

import pytest

import myproject.tasks
from orchestrator import RunFailed
from orchestrator.testing import wait_for

SEEN = {}


def test_worker_runs_the_flow_in_a_subprocess(orchestrator_client, orchestrator_worker):
    out = orchestrator_client.trigger("greeting", {"name": "ann"}).wait(timeout=30)
    assert out["text"] == "HELLO ANN!"
    assert out["pid"] != os.getpid()
    assert orchestrator_worker.running
    assert {"default", "loud"} <= set().union(*(w.queues for w in orchestrator_client.workers))
    SEEN["worker"] = orchestrator_worker.pid


def test_worker_is_shared_by_the_module(orchestrator_client, orchestrator_worker):
    assert orchestrator_worker.pid == SEEN["worker"]
    assert orchestrator_client.trigger("greeting", {"name": "bo"}).wait(timeout=30)["text"] == (
        "HELLO BO!"
    )


@pytest.mark.orchestrator(settings={"tick_s": 0.5})
def test_marker_settings_reach_the_worker(orchestrator_client, orchestrator_worker):
    assert orchestrator_worker.pid != SEEN["worker"]  # other settings: another worker
    assert orchestrator_client.settings.tick_s == 0.5
    run = orchestrator_client.trigger("env", {"name": "ORCHESTRATOR_TICK_S"})
    assert run.wait(timeout=30) == {"value": "0.5"}


def test_worker_failure_surfaces(orchestrator_client):
    orchestrator_client.trigger("greeting", {"name": "boom"}).wait(timeout=30)


def test_inprocess_runs_steps_here(orchestrator_inprocess, monkeypatch):
    assert orchestrator_inprocess.runs() == []  # a key prefix of its own
    monkeypatch.setattr(myproject.tasks, "lookup", lambda name: f"hi {name}")
    out = orchestrator_inprocess.trigger("greeting", {"name": "cy"}).wait(timeout=10)
    assert out == {"text": "HI CY!", "pid": os.getpid()}


def test_inprocess_failure_is_the_step_error(orchestrator_inprocess):
    run = orchestrator_inprocess.trigger("greeting", {"name": "boom"})
    with pytest.raises(RunFailed, match="cannot shout"):
        run.wait(timeout=10)
    assert run.refresh().steps["shout"].status == "failed"
    assert run.steps["greet"].output == "hello boom"


def test_inprocess_failure_surfaces(orchestrator_inprocess):
    orchestrator_inprocess.trigger("greeting", {"name": "boom"}).wait(timeout=10)


def test_tick_wakes_a_sleep(orchestrator_inprocess):
    run = orchestrator_inprocess.trigger("nap")
    wait_for(lambda: orchestrator_inprocess.get(run.id).status == "waiting", timeout=10)

    def woken():
        orchestrator_inprocess.tick()
        return orchestrator_inprocess.get(run.id).done

    wait_for(woken, timeout=10, interval=0.1)
    assert run.wait(timeout=5) == {"pid": os.getpid()}


@pytest.mark.orchestrator(
    definitions=[
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: inline}
spec:
  steps: [{id: greet, task: demo.greet, with: {name: inline}}]
  outputs: {text: "${steps.greet.output}"}
"""
    ]
)
def test_marker_replaces_definitions(orchestrator_inprocess):
    assert [f["name"] for f in orchestrator_inprocess.flows()] == ["inline"]
    assert orchestrator_inprocess.trigger("inline").wait(timeout=10) == {"text": "hello inline"}


@pytest.mark.orchestrator(defintions=["flows/"])
def test_marker_typo_is_an_error(orchestrator_inprocess):
    pass
'''


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(**{"myproject/__init__": "", "myproject/tasks": TASKS})
    (pytester.path / "flows").mkdir()
    (pytester.path / "flows" / "greeting.yaml").write_text(GREETING)
    (pytester.path / "flows" / "nap.yaml").write_text(NAP)
    (pytester.path / "flows" / "env.yaml").write_text(ENV)
    # Definitions from the ini file; task modules from the command line (below).
    pytester.makeini(
        """
        [pytest]
        pythonpath = .
        orchestrator_definitions = flows/
        orchestrator_worker_concurrency = 1
        """
    )
    return pytester


def test_plugin_runs_a_users_flows_in_both_modes(project: pytest.Pytester) -> None:
    project.makepyfile(test_flows=USER_TESTS)

    result = project.runpytest_subprocess(
        "-p", "no:cacheprovider", "--orchestrator-task-modules=myproject.tasks", timeout=120
    )

    result.assert_outcomes(passed=7, failed=2, errors=1)
    out = result.stdout.str()
    # A failed run says which step failed and why, in both modes...
    assert out.count("RunFailed") >= 2, out
    assert "ended failed: cannot shout 'hello boom'" in out, out
    # ...and in worker mode the report ends with the worker's log.
    result.stdout.fnmatch_lines(["*orchestrator worker orchestrator-test-* log tail*"])
    # A misspelt marker argument is named.
    result.stdout.fnmatch_lines(["*unknown argument 'defintions'*"])


def test_plugin_names_missing_task_modules(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_missing=textwrap.dedent(
            """
            def test_needs_tasks(orchestrator_client):
                pass
            """
        )
    )

    result = project.runpytest_subprocess(
        "-p", "no:cacheprovider", "--orchestrator-task-modules=myproject.nosuch", timeout=60
    )

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*task module 'myproject.nosuch' cannot be imported*"])


def test_plugin_is_loaded_and_cheap_where_unused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import sys

            def test_plain():
                assert "orchestrator.testing" in sys.modules  # the entry point loaded it
                # ...and importing it loaded neither Celery nor the orchestrator proper.
                assert not {"celery", "redis", "orchestrator.client"} & set(sys.modules)
            """
        )
    )

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)

    result.assert_outcomes(passed=1)
