"""Helpers shared by the integration tests that deploy flows written inline."""

from __future__ import annotations

import uuid

from tests.support import wait_for


def deploy(client, text: str) -> str:
    """Deploy ``text`` with ``NAME`` replaced by a fresh flow name; returns the name."""
    name = f"f-{uuid.uuid4().hex[:8]}"
    client.deploy(text.replace("NAME", name))
    return name


def key() -> str:
    """A fresh Redis key for a side effect, a gate or a counter."""
    return f"k-{uuid.uuid4().hex[:10]}"


def waiting(client, run_id: str, step: str) -> None:
    """Bounded poll until ``step`` of the run is parked (waiting)."""
    wait_for(
        lambda: (s := client.get(run_id).steps.get(step)) is not None and s.status == "waiting",
        timeout=20,
        message=f"{step} waiting",
    )
