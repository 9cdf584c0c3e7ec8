"""Secrets outside step records, without Redis: learning the deployed secret Variables,
masking exceptions in place, and what Celery reports of a failed or retried task."""

from __future__ import annotations

import pickle
import sys
import uuid

import pytest
from billiard.einfo import ExceptionInfo
from celery import signals
from celery.exceptions import Retry
from celery.utils.serialization import get_pickled_exception
from kombu.utils.encoding import safe_repr

from orchestrator import variables
from orchestrator.errors import StepError
from orchestrator.runtime import error_info


def _secret() -> str:
    return f"unit-{uuid.uuid4().hex}"


class TokenRejected(Exception):
    """An error whose text is not in its args."""

    def __init__(self, token: str):
        super().__init__("token rejected")
        self.token = token

    def __str__(self) -> str:
        return f"token {self.token} rejected"

    def __repr__(self) -> str:
        return f"TokenRejected({self.token!r})"


def test_learn_secrets_knows_what_this_environment_resolves():
    here, plain = _secret(), _secret()
    env = {"HERE": here, "PLAIN": plain}
    specs = {
        "here": {"value": "Bearer ${env.HERE}", "secret": True},
        "elsewhere": {"value": "${env.NOT_IN_THIS_PROCESS}", "secret": True},
        "plain": {"value": "${env.PLAIN}"},
    }
    variables.learn_secrets(specs, env)  # the missing one is skipped, not an error
    known = variables.known_secrets()
    assert f"Bearer {here}" in known and plain not in known
    assert variables.mask(f"x Bearer {here} y") == "x *** y"


def test_mask_exception_masks_args_chain_and_notes_in_place():
    secret = _secret()
    variables.remember_secret(secret)
    try:
        try:
            raise KeyError(f"no user for {secret}")
        except KeyError as inner:
            raise RuntimeError("lookup failed", {"token": secret}) from inner
    except RuntimeError as exc:
        exc.add_note(f"while using {secret}")
        outer = exc
    assert variables.mask_exception(outer) is outer
    assert outer.args == ("lookup failed", {"token": "***"})
    assert outer.__cause__.args == ("no user for ***",)
    assert outer.__notes__ == ["while using ***"]
    import traceback

    text = "".join(traceback.format_exception(outer))
    assert secret not in text and "no user for ***" in text


def test_mask_exception_replaces_an_error_whose_text_is_not_in_its_args():
    secret = _secret()
    variables.remember_secret(secret)
    exc = TokenRejected(secret)
    masked = variables.mask_exception(exc)
    assert isinstance(masked, StepError)
    assert str(masked) == "TokenRejected: token *** rejected"
    assert secret not in repr(masked)
    # Nothing known: nothing to do.
    assert variables.mask_exception(exc, frozenset()) is exc


def _einfo(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def _as_main_process_sees(einfo: ExceptionInfo) -> ExceptionInfo:
    """The pool process pickles the ExceptionInfo to the worker's main process."""
    return pickle.loads(pickle.dumps(einfo))


def test_a_failed_tasks_report_is_masked():
    secret = _secret()
    variables.remember_secret(secret)
    try:
        try:
            raise ValueError(f"bad token {secret}")
        except ValueError:
            raise TokenRejected(secret)  # noqa: B904 - chained implicitly, as user code does
    except TokenRejected as exc:
        einfo = ExceptionInfo(sys.exc_info())
        raised = exc
    assert secret in einfo.traceback
    signals.task_failure.send(sender=None, task_id="t", exception=raised, einfo=einfo)
    seen = _as_main_process_sees(einfo)
    # What the task-failed event carries (celery.worker.request.Request.on_failure).
    assert secret not in safe_repr(get_pickled_exception(seen.exception))
    assert secret not in seen.traceback
    assert "bad token ***" in seen.traceback and "token *** rejected" in seen.traceback


def test_a_retried_tasks_report_is_masked():
    secret = _secret()
    variables.remember_secret(secret)
    try:
        try:
            raise TokenRejected(secret)
        except TokenRejected as exc:
            raise Retry(exc=exc, when=1) from exc
    except Retry as reason:
        einfo = ExceptionInfo(sys.exc_info())
        retry = reason
    signals.task_retry.send(sender=None, request=None, reason=retry, einfo=einfo)
    assert secret not in str(retry)  # Celery's "retry: Retry in 1s: ..." log line
    seen = _as_main_process_sees(einfo)
    # What the task-retried event carries (Request.on_retry).
    assert secret not in safe_repr(seen.exception.exc)
    assert "token *** rejected" in safe_repr(seen.exception.exc)
    assert secret not in seen.traceback


def test_error_info_masks_the_exception_it_records():
    secret = _secret()
    variables.remember_secret(secret)
    exc = ValueError(f"bad token {secret}")
    info = error_info(exc, "step")
    assert info["message"] == "bad token ***" and secret not in info["traceback"]
    # Masked in place: Celery's retry (``Retry(exc=exc)``) and its log show ``***`` too.
    assert exc.args == ("bad token ***",)
    assert secret not in repr(Retry(exc=exc, when=1))


@pytest.mark.parametrize("value", [None, 3, b"bytes", ("a", "b")])
def test_mask_exception_leaves_other_args_alone(value):
    variables.remember_secret(_secret())
    exc = ValueError(value)
    assert variables.mask_exception(exc) is exc and exc.args == (value,)
