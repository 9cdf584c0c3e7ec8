"""Flower for the orchestrator's workers, never without authentication.

``orchestrator flower`` runs Flower (``celery flower``) in its own process for the
orchestrator's Celery app, with HTTP basic auth from ``ORCHESTRATOR_FLOWER_BASIC_AUTH``.
The credentials go to Flower inside this process, on no command line (``ps`` shows
command lines to every user) and in no log. Workers send the task events Flower reads
(``ORCHESTRATOR_TASK_EVENTS``, see ``app.celery_config``).

Every step message is one ``orchestrator.step`` task sent under the name
``<flow>.<step>`` (Celery's ``shadow`` option), whose first argument is the run id:
that is what Flower lists.

What Flower shows of a failed or retried step holds no secret's value: the pool process
masks the exception, the errors it chains from and the traceback text before the
worker's main process sends them in the ``task-failed``/``task-retried`` event
(:mod:`.variables`, Celery's ``task_failure``/``task_retry`` signals), and a failed
step raises a ``StepError`` that does not chain the task's own error. A task's
arguments are ids only (run, flow, version, step), never its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from .settings import Settings

SETTING = "ORCHESTRATOR_FLOWER_BASIC_AUTH"


def basic_auth_users(settings: Settings) -> list[str]:
    """The ``user:password`` entries Flower accepts; ValueError (naming the setting and
    the entry, never a password) when there are none or one is malformed."""
    raw = settings.flower_basic_auth.get_secret_value()
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    if not entries:
        raise ValueError(
            f"Flower does not start without authentication: set {SETTING}="
            "user:password[,user2:password2]"
        )
    for i, entry in enumerate(entries, 1):
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(
                f"{SETTING}: entry {i} of {len(entries)} must be user:password, "
                "with a user name and a password"
            )
    return entries


def flower_argv(
    settings: Settings, address: str, port: int, extra: Sequence[str] = ()
) -> list[str]:
    """The ``celery`` arguments that run Flower on ``address:port`` behind basic auth;
    ``extra`` are Flower options passed through (not the credentials: they come from
    the setting alone)."""
    for arg in extra:
        name = arg.lstrip("-").partition("=")[0].replace("-", "_")
        if name == "basic_auth":
            raise ValueError(
                f"--basic-auth is not taken on the command line, where other users can "
                f"read it: set {SETTING} instead"
            )
    users = basic_auth_users(settings)
    return [
        "flower",
        f"--address={address}",
        f"--port={port}",
        f"--basic_auth={','.join(users)}",
        *extra,
    ]
