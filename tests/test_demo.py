"""The demo's own checks (orchestrator/devstack/demo.py), without starting anything."""

from __future__ import annotations

import shutil
from pathlib import Path

from orchestrator.devstack.demo import DEMO_INPUTS, run_demo
from orchestrator.inputs import validate_inputs
from orchestrator.loader import load
from tests.support import REPO_ROOT, free_port


def test_every_example_flow_has_valid_demo_inputs() -> None:
    flows = {lr.name: lr.resource for lr in load(REPO_ROOT / "flows") if lr.kind == "Flow"}
    assert set(flows) == set(DEMO_INPUTS)
    for name, resource in flows.items():
        validate_inputs(resource.spec.inputs, DEMO_INPUTS[name])


def test_a_flow_without_demo_inputs_stops_the_demo_before_it_starts(tmp_path: Path, capsys) -> None:
    flows = tmp_path / "flows"
    shutil.copytree(REPO_ROOT / "flows", flows)
    (flows / "new-example.yaml").write_text(
        (REPO_ROOT / "flows" / "text.yaml").read_text().replace("name: text", "name: brand-new")
    )
    # A URL nothing answers on: had the check not stopped it, the demo would try to start
    # a private redis-server, and say so.
    code = run_demo(f"redis://127.0.0.1:{free_port()}/0", flows)
    assert code == 1
    err = capsys.readouterr().err
    assert "brand-new" in err and "DEMO_INPUTS" in err
    assert "redis" not in err.lower()
