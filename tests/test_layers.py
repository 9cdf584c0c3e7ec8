"""Which way imports point: definitions never load Celery, Kombu or Redis; the store
never loads Celery or Kombu (see LAYOUT.md). Each check runs in a fresh interpreter,
since this one has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DEFINITIONS = [
    "orchestrator.model",
    "orchestrator.loader",
    "orchestrator.dsl",
    "orchestrator.graph",
    "orchestrator.expressions",
    "orchestrator.inputs",
    "orchestrator.variables",
    "orchestrator.yamlsource",
    "orchestrator.plan",
    "orchestrator.policy",
    "orchestrator.status",
    "orchestrator.errors",
]


def loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``module``."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([m for m in {list(watched)!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", DEFINITIONS)
def test_a_definition_module_loads_no_celery_kombu_or_redis(module: str) -> None:
    assert loaded_after_import(module, ("celery", "kombu", "redis")) == []


def test_the_store_loads_no_celery_or_kombu() -> None:
    assert loaded_after_import("orchestrator.store", ("celery", "kombu")) == []
