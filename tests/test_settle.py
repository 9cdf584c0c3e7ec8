"""Whatever ends a step's execution, the step is recorded and the run moves on.

These cases cannot be provoked through a real worker's inputs (the soft time limit firing
exactly while ``with:`` renders; the record failing to be written), so the steps run in an
in-process worker (``orchestrator_inprocess``) with the failing piece monkeypatched.
"""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from orchestrator import RunFailed, expressions, runtime

FLOW = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: settle}
spec:
  inputs: {n: {type: integer, default: 1}}
  steps:
    - {id: first, task: ctl.add, with: {a: "${inputs.n}", b: 1}}
    - id: guarded
      try:
        - {id: second, task: ctl.add, with: {a: "${steps.first.output}", b: 1}}
      catch:
        - {id: caught, task: ctl.add, with: {a: 0, b: 0}}
  outputs: {caught: "${steps.caught.status}"}
"""

pytestmark = pytest.mark.orchestrator(task_modules=["tests.control_tasks"], definitions=[FLOW])


def test_a_soft_time_limit_while_rendering_with_is_a_timeout(orchestrator_inprocess, monkeypatch):
    real = expressions.render

    def render(value, ctx):
        if value == {"a": "${steps.first.output}", "b": 1}:
            raise SoftTimeLimitExceeded()
        return real(value, ctx)

    monkeypatch.setattr(expressions, "render", render)
    run = orchestrator_inprocess.trigger("settle")
    assert run.wait(timeout=20) == {"caught": "succeeded"}
    second = run.refresh().steps["second"]
    assert second.status == "failed" and second.error["type"] == "Timeout"


def test_an_error_while_recording_the_step_fails_it(orchestrator_inprocess, monkeypatch):
    real = runtime.Execution._finish

    def finish(self, status, output, *args, **kwargs):
        if self.key == "first" and status == "succeeded":
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
        return real(self, status, output, *args, **kwargs)

    monkeypatch.setattr(runtime.Execution, "_finish", finish)
    run = orchestrator_inprocess.trigger("settle")
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=20)
    first = info.value.run.steps["first"]
    assert first.status == "failed" and first.error["type"] == "ValueError"
    assert "4300 digits" in first.error["message"]
