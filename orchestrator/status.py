"""Run and step status names: the one list that Python and the Lua scripts share.

The store prepends these names to every ``lua/*.lua`` script it loads
(:func:`lua_constants`), so a script tests ``ACTIVE[status]`` instead of spelling the
list again.
"""

from __future__ import annotations

PENDING = "pending"
RUNNING = "running"
WAITING = "waiting"
SUCCEEDED = "succeeded"
FAILED = "failed"
COMPENSATED = "compensated"
CANCELLED = "cancelled"
SKIPPED = "skipped"

#: Run statuses of a run that may still change its steps.
ACTIVE = (PENDING, RUNNING, WAITING)
#: Run statuses of a run that ended (each has its own index, ``Pruns:status:<status>``).
ENDED = (SUCCEEDED, FAILED, COMPENSATED, CANCELLED)
#: Step statuses of a step instance that ended: a second message for it does nothing.
TERMINAL_STEP = (SUCCEEDED, SKIPPED, FAILED, CANCELLED, COMPENSATED)

_NAMES = {
    "PENDING": PENDING,
    "RUNNING": RUNNING,
    "WAITING": WAITING,
    "SUCCEEDED": SUCCEEDED,
    "FAILED": FAILED,
    "COMPENSATED": COMPENSATED,
    "CANCELLED": CANCELLED,
    "SKIPPED": SKIPPED,
}
_SETS = {"ACTIVE": ACTIVE, "ENDED": ENDED, "TERMINAL_STEP": TERMINAL_STEP}


def lua_constants() -> str:
    """These names as Lua locals: one per status, and each set as a table of ``true``."""
    lines = ["-- Status names, from orchestrator/status.py (prepended by the store)."]
    lines += [f"local {const} = '{name}'" for const, name in _NAMES.items()]
    for const, names in _SETS.items():
        lines.append(f"local {const} = {{" + ", ".join(f"{n} = true" for n in names) + "}")
    return "\n".join(lines) + "\n"
