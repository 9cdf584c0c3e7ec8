"""The README's "Testing your flows" example, run as written.

Its ``pytest.ini`` and test file are taken from the README, put in a temporary project
with a copy of ``flows/text.yaml``, and run by a pytest subprocess that loads the plugin
through its entry point (``workers.examples`` is installed with the package).
"""

from __future__ import annotations

import re
import shutil

import pytest

from tests.support import REPO_ROOT

pytest_plugins = ["pytester"]

SECTION = "## Testing your flows"


def readme_blocks() -> dict[str, str]:
    """The section's first ``ini`` and ``python`` code blocks."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.index("\n## ", start + len(SECTION) + 2)
    blocks: dict[str, str] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S):
        blocks.setdefault(lang, body)
    return blocks


def test_readme_example_passes(pytester: pytest.Pytester) -> None:
    blocks = readme_blocks()
    assert {"ini", "python"} <= set(blocks), "the README section lost its example"
    (pytester.path / "pytest.ini").write_text(blocks["ini"])
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_text_flow.py").write_text(blocks["python"])
    (pytester.path / "flows").mkdir()
    shutil.copy(REPO_ROOT / "flows" / "text.yaml", pytester.path / "flows" / "text.yaml")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)

    result.assert_outcomes(passed=3)
