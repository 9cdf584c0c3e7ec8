"""The Lua scripts of the store, read once from ``lua/*.lua`` with the status names they
test prepended (``status.lua_constants``), so no script spells a status itself."""

from __future__ import annotations

from functools import cache
from importlib import resources

from ..status import lua_constants


@cache
def script(name: str) -> str:
    """The source of ``lua/<name>.lua`` after the status constants."""
    source = resources.files("orchestrator.store").joinpath(f"lua/{name}.lua").read_text()
    return lua_constants() + source
