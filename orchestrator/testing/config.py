"""What a test's orchestrator fixtures import and deploy, and the namespace they get.

The configuration comes from ini options, then the ``--orchestrator-*`` command-line
options, then ``@pytest.mark.orchestrator(...)``, the last one winning; each namespace is a
fresh key prefix on the private Redis. Imports only pytest and the standard library, since
pytest loads the plugin in every run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from ..settings import Settings
    from .client import FlowClient

MARKER = "orchestrator"
_MARKER_ARGS = ("definitions", "task_modules", "settings")
#: Settings the fixtures set themselves (the private Redis and the test's namespace).
_FIXED_SETTINGS = frozenset(
    {"redis_url", "broker_url", "result_backend", "key_prefix", "celery_key_prefix", "task_modules"}
)


def fail(message: str) -> NoReturn:
    """Error the test with ``message`` alone (a configuration mistake, not a bug)."""
    __tracebackhide__ = True
    pytest.fail(message, pytrace=False)


@dataclass(frozen=True)
class FlowTestConfig:
    """What a test's orchestrator fixtures import and deploy (ini < command line < marker)."""

    #: Modules the worker imports so the steps' Celery tasks are registered.
    task_modules: tuple[str, ...] = ()
    #: Deployed before the test: paths (files or folders), YAML text or DSL flows.
    definitions: tuple[Any, ...] = ()
    #: :class:`~orchestrator.settings.Settings` fields to override, as ``(name, value)``.
    settings: tuple[tuple[str, Any], ...] = ()


def _split(values: Iterable[str], pattern: str) -> list[str]:
    return [part.strip() for v in values for part in re.split(pattern, v) if part.strip()]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | os.PathLike) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _resolve(item: Any, base: Path, origin: str) -> Any:
    """A definition: a path made absolute (it must exist), YAML text or a flow object."""
    if isinstance(item, str) and "\n" in item:
        return item  # YAML text
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        path = path if path.is_absolute() else base / path
        if not path.exists():
            fail(f"{origin}: no such flow file or folder: {path}")
        return str(path)
    return item  # a DSL Flow or a model resource: Client.deploy checks it


def resolve_config(request: pytest.FixtureRequest) -> FlowTestConfig:
    """The test's configuration: ini options, then command-line options, then the marker."""
    config = request.config
    ini_base = config.inipath.parent if config.inipath else config.rootpath
    modules = _split(config.getini("orchestrator_task_modules"), r"[,\s]+")
    definitions = [
        _resolve(p, ini_base, "ini option orchestrator_definitions")
        for p in _split(config.getini("orchestrator_definitions"), r",")
    ]
    if config.getoption("orchestrator_task_modules"):
        modules = _split([config.getoption("orchestrator_task_modules")], r"[,\s]+")
    if config.getoption("orchestrator_definitions"):
        cwd = config.invocation_params.dir
        definitions = [
            _resolve(p, cwd, "--orchestrator-definitions")
            for p in _split([config.getoption("orchestrator_definitions")], r",")
        ]
    settings: dict[str, Any] = {}
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        where = f"@pytest.mark.{MARKER} on {request.node.nodeid}"
        if marker.args:
            fail(f"{where}: takes keyword arguments only ({', '.join(_MARKER_ARGS)})")
        unknown = sorted(set(marker.kwargs) - set(_MARKER_ARGS))
        if unknown:
            fail(
                f"{where}: unknown argument {unknown[0]!r}; expected one of "
                f"{', '.join(_MARKER_ARGS)}"
            )
        if "task_modules" in marker.kwargs:
            modules = _split(_as_list(marker.kwargs["task_modules"]), r"[,\s]+")
        if "definitions" in marker.kwargs:
            definitions = [
                _resolve(d, config.rootpath, f"{where}: definitions")
                for d in _as_list(marker.kwargs["definitions"])
            ]
        settings = dict(marker.kwargs.get("settings") or {})
    _check_settings(settings)
    return FlowTestConfig(
        tuple(dict.fromkeys(modules)), tuple(definitions), tuple(sorted(settings.items()))
    )


def _check_settings(overrides: dict[str, Any]) -> None:
    from ..settings import Settings  # lazy: pytest loads the plugin in every run (pydantic)

    for name in overrides:
        if name == "task_modules":
            fail(f"@pytest.mark.{MARKER}: give task modules as task_modules=, not in settings")
        if name in _FIXED_SETTINGS:
            fail(
                f"@pytest.mark.{MARKER}: settings.{name} is set by the fixtures (the private "
                "Redis and the test's own key prefix)"
            )
        if name not in Settings.model_fields:
            fail(
                f"@pytest.mark.{MARKER}: settings.{name} is not a setting; known: "
                + ", ".join(sorted(set(Settings.model_fields) - _FIXED_SETTINGS))
            )


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    get = getattr(value, "get_secret_value", None)
    return str(get() if callable(get) else value)


# -- the test's namespace ----------------------------------------------------------------


def namespace(redis_url: str, config: FlowTestConfig) -> tuple[Settings, dict[str, str]]:
    """Settings under a fresh key prefix, and the ``ORCHESTRATOR_*`` variables saying the same.

    The Celery key prefix keeps the queues (any name a definition routes to) and results
    of this namespace apart from every other one on the private Redis.
    """
    from ..settings import Settings  # lazy: pytest loads the plugin in every run (pydantic)

    prefix = f"ot{uuid.uuid4().hex[:10]}:"
    fixed = {
        "redis_url": redis_url,
        "broker_url": redis_url,
        "result_backend": redis_url,
        "key_prefix": prefix,
        "celery_key_prefix": f"{prefix}celery:",
        "task_modules": ",".join(config.task_modules),
    }
    values = {**dict(config.settings), **fixed}
    settings = Settings(**values)
    # The worker reads the same environment as this process, plus what was set here.
    env = {k: v for k, v in os.environ.items() if k.startswith("ORCHESTRATOR_")}
    env.update({f"ORCHESTRATOR_{k.upper()}": _env_value(v) for k, v in values.items()})
    return settings, env


def check_importable(modules: Iterable[str]) -> None:
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError) as exc:
            found, why = False, f": {exc}"
        else:
            why = ""
        if not found:
            fail(
                f"orchestrator task module {name!r} cannot be imported{why} (from "
                "orchestrator_task_modules, --orchestrator-task-modules or the marker)"
            )


def deploy(client: FlowClient, config: FlowTestConfig) -> set[str]:
    """Deploy the test's definitions; the queues their steps route to."""
    if config.definitions:
        client.deployed = client.deploy(*config.definitions)
    queues = {client.settings.default_queue}
    for d in client.deployed:
        if d.kind == "Flow":
            plan = client.plan(d.name, d.version)
            queues.update(str(n.options["queue"]) for n in plan.nodes.values())
    return queues
