"""Tasks for the secret-leak test (``tests/integration/test_secrets.py``).

Each reads a secret straight from the worker's environment, never through
``${vars.NAME}``: masking must not depend on the process having resolved the secret
Variable itself (the store learns every deployed secret Variable).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import shared_task


class TokenRejected(Exception):
    """An error whose text is not in its args: ``str`` and ``repr`` build it."""

    def __init__(self, token: str):
        super().__init__("token rejected")
        self.token = token

    def __str__(self) -> str:
        return f"token {self.token} rejected"

    def __repr__(self) -> str:
        return f"TokenRejected({self.token!r})"


@shared_task(name="secrets.env_value")
def env_value(name: str) -> dict[str, Any]:
    """The environment variable ``name`` as the output (and in the log)."""
    value = os.environ[name]
    logging.getLogger("tests.secret_tasks").warning("read %s = %s", name, value)
    return {"value": value, "nested": [f"x{value}y"], value: 1}


@shared_task(name="secrets.env_error")
def env_error(name: str) -> None:
    """Fail with the environment variable ``name`` in the message (``str``, ``repr``)."""
    raise TokenRejected(os.environ[name])


@shared_task(name="secrets.chained_error")
def chained_error(name: str) -> None:
    """Fail with the secret in the message of the error it chains from."""
    try:
        raise KeyError(f"no user for {os.environ[name]}")
    except KeyError as exc:
        raise RuntimeError("lookup failed") from exc
