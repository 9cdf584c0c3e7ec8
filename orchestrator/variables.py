"""Variables and secrets: what ``${vars.NAME}`` reads, and how secrets stay out of sight.

A ``Variable`` resource is stored as its definition: a plain value, or a template that
refers to the environment (``${env.API_TOKEN}``). The environment is read on the worker
when a step reads the variable, so a secret (which must come from the environment) is
known only to the processes whose environment holds it: its value is never written to
Redis.

A process knows a secret's value when it resolves the Variable (a step reads it), and
also when its store learns the deployed secret Variables (:func:`learn_secrets`: every
``RedisStore`` does, on its first plan load or write, whenever it reads the Variables,
and every ``SECRETS_REFRESH_S``), resolving each from this process's environment where
it can.
Masking therefore does not depend on which process resolved a secret: an API process
with the token in its environment masks a signal payload holding it, a worker process
masks a value its task read from ``os.environ`` itself. Every known value is then

* replaced with ``***`` by :func:`mask` in anything about to be stored (``RedisStore``
  passes every write of user-derived data through it: run records, step records and
  outputs, events, waits, signals, decisions, channel entries, definitions),
* replaced in log records by :class:`SecretFilter` (installed on the worker's handlers),
* replaced in what Celery reports of a failed or retried task (the exception, its
  chain and the traceback text that go to task events, so Flower, and to the log):
  :func:`mask_exception` and :func:`mask_task_report`, which the worker's
  ``task_failure``/``task_retry`` hooks call (:mod:`.runtime`),

so a step that echoes its token in its output, its error or its log shows ``***``.

This module and :mod:`.settings` are the only readers of ``os.environ``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .errors import ExpressionError, StepError
from .model import ENV_REF

MASK = "***"

_known: set[str] = set()
_lock = threading.Lock()


def known_secrets() -> frozenset[str]:
    """The secret values this process has resolved so far."""
    return frozenset(_known)


def remember_secret(value: str) -> None:
    """Mask ``value`` from now on in this process (stored state and logs)."""
    if value:
        with _lock:
            _known.add(value)


def resolve(name: str, spec: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Any:
    """A variable's value: its ``${env.NAME}`` references replaced from the environment."""
    env = os.environ if env is None else env
    value = spec.get("value")
    if isinstance(value, str) and "${" in value:

        def lookup(m: Any) -> str:
            var = m.group(1)
            if var not in env:
                raise ExpressionError(
                    f"variable {name!r} reads environment variable {var!r}, "
                    "which is not set on this worker"
                )
            return env[var]

        whole = ENV_REF.fullmatch(value.strip())
        value = lookup(whole) if whole else ENV_REF.sub(lookup, value)
    if spec.get("secret"):
        remember_secret(str(value))
    return value


def learn_secrets(
    specs: Mapping[str, Mapping[str, Any]], env: Mapping[str, str] | None = None
) -> None:
    """Know (and so mask) the value of every secret Variable in ``specs`` that this
    process's environment can resolve; one it cannot is skipped (it is not here)."""
    for name, spec in specs.items():
        if isinstance(spec, Mapping) and spec.get("secret"):
            try:
                resolve(name, spec, env)
            except ExpressionError:
                continue


class VariableMap(Mapping[str, Any]):
    """``vars`` in expressions: the Variables ``load()`` returns, read only when an
    expression reads one (most steps never do), each resolved on first use."""

    def __init__(self, load: Callable[[], Mapping[str, Mapping[str, Any]]]):
        self._load = load
        self._specs: Mapping[str, Mapping[str, Any]] | None = None
        self._values: dict[str, Any] = {}

    @property
    def specs(self) -> Mapping[str, Mapping[str, Any]]:
        if self._specs is None:
            self._specs = self._load()
        return self._specs

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            spec = self.specs[name]  # KeyError: "vars has no field NAME"
            self._values[name] = resolve(name, spec)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def mask(value: Any, secrets: frozenset[str] | None = None) -> Any:
    """``value`` with every known secret replaced by ``***`` (strings, keys, nested)."""
    secrets = known_secrets() if secrets is None else secrets
    if not secrets:
        return value
    return _mask(value, sorted(secrets, key=len, reverse=True))


def _mask(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for s in secrets:
            if s in value:
                value = value.replace(s, MASK)
        return value
    if isinstance(value, dict):
        return {_mask(k, secrets): _mask(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v, secrets) for v in value]
    return value


def _leaks(text: str, secrets: frozenset[str]) -> bool:
    return any(s in text for s in secrets)


def mask_exception(exc: BaseException, secrets: frozenset[str] | None = None) -> BaseException:
    """``exc`` fit to be reported outside this process: every known secret masked.

    The message arguments of ``exc`` and of the exceptions it chains from
    (``__cause__``, ``__context__``) and their notes are masked in place, so whatever
    formats them later (a traceback, Celery's retry message, a log) shows ``***``. An
    exception whose ``str`` or ``repr`` still shows a secret (it builds its text from
    other attributes) is replaced by a :class:`StepError` saying its type and masked
    message; the result is ``exc`` itself or that replacement.
    """
    secrets = known_secrets() if secrets is None else secrets
    if not secrets:
        return exc
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        try:
            e.args = tuple(
                mask(a, secrets) if isinstance(a, str | dict | list) else a for a in e.args
            )
            notes = getattr(e, "__notes__", None)
            if isinstance(notes, list):
                e.__notes__ = mask(notes, secrets)
        except (AttributeError, TypeError):  # an exception that will not take new args
            pass
        todo += [e.__cause__, e.__context__]
    if _leaks(safe_text(str, exc), secrets) or _leaks(safe_text(repr, exc), secrets):
        replacement = StepError(mask(f"{type(exc).__name__}: {safe_text(str, exc)}", secrets))
        replacement.__suppress_context__ = True
        return replacement
    return exc


def safe_text(how: Callable[[Any], str], exc: BaseException) -> str:
    try:
        return how(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ shows no secret either
        return type(exc).__name__


def shown(spec: Mapping[str, Any]) -> Any:
    """How a variable's value is displayed (CLI, API): ``***`` for a secret."""
    return MASK if spec.get("secret") else spec.get("value")


class SecretFilter(logging.Filter):
    """Rewrites log records so no secret resolved by this process reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = known_secrets()
        if not secrets:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem
            return True
        masked = mask(text, secrets)
        if masked != text:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = mask(exc_text, secrets)
            record.exc_info = None
        return True


_FILTER = SecretFilter()


def install_log_filter(*loggers: logging.Logger) -> None:
    """Add the filter to every handler of the root logger and of ``loggers``."""
    for lg in (logging.getLogger(), *loggers):
        for handler in lg.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
