"""Status names have one source: ``status.py``, which the Lua scripts get prepended."""

from __future__ import annotations

import re
from importlib import resources

from orchestrator import status
from orchestrator.store import _script

NAMES = {*status.ACTIVE, *status.ENDED, *status.TERMINAL_STEP}
QUOTED = re.compile("['\"](" + "|".join(sorted(NAMES)) + ")['\"]")


def lua_files() -> list:
    return sorted(
        (f for f in resources.files("orchestrator.store").joinpath("lua").iterdir()),
        key=lambda f: f.name,
    )


def test_no_lua_script_spells_a_status_itself() -> None:
    spelled = [
        f"{f.name}:{n}: {line.strip()}"
        for f in lua_files()
        if f.name.endswith(".lua")
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if QUOTED.search(line)
    ]
    assert not spelled, "use the names status.py prepends (ACTIVE[s], RUNNING, ...):\n" + (
        "\n".join(spelled)
    )


def test_every_loaded_script_starts_with_the_status_names() -> None:
    header = status.lua_constants()
    for f in lua_files():
        if f.name.endswith(".lua"):
            assert _script(f.name[: -len(".lua")]).startswith(header)


def test_the_lua_names_are_the_python_ones() -> None:
    header = status.lua_constants()
    for name in NAMES:
        assert f"local {name.upper()} = '{name}'" in header
    for const in ("ACTIVE", "ENDED", "TERMINAL_STEP"):
        line = next(x for x in header.splitlines() if x.startswith(f"local {const} = {{"))
        assert re.findall(r"(\w+) = true", line) == list(getattr(status, const))
