"""Variable, Service and EventSubscription documents, http steps, secret masking and
webhook signatures: the parts that need no Redis."""

from __future__ import annotations

import logging
import time

import pytest

from orchestrator import variables
from orchestrator.errors import DefinitionError, ExpressionError
from orchestrator.httpcalls import HttpError, check_outputs
from orchestrator.loader import load_string
from orchestrator.model import InputField
from orchestrator.webhooks import SignatureError, sign, verify


def _doc(kind: str, spec: str, name: str = "x") -> str:
    return f"apiVersion: orchestrator/v1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def _problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(DefinitionError) as info:
        load_string(text)
    return [(p.path, p.message) for p in info.value.problems]


# -- documents ----------------------------------------------------------------------------


def test_variables_plain_from_env_and_secret():
    [plain] = load_string(_doc("Variable", "{value: {a: 1}}"))
    assert plain.resource.spec.value == {"a": 1} and not plain.resource.spec.secret
    [secret] = load_string(_doc("Variable", '{value: "Bearer ${env.TOKEN}", secret: true}'))
    assert secret.resource.spec.secret


@pytest.mark.parametrize(
    "spec, path, words",
    [
        ("{value: hunter2, secret: true}", "spec.secret", "must come from the environment"),
        ('{value: "${inputs.x}"}', "spec.value", "only refer to the environment"),
        ("{secret: true}", "spec.value", "required"),
        ("{value: 1, sekret: true}", "spec.sekret", "did you mean 'secret'"),
    ],
)
def test_bad_variables_name_the_field(spec, path, words):
    problems = _problems(_doc("Variable", spec))
    assert any(where == path and words in message for where, message in problems), problems


def test_service_and_subscription_checks():
    [svc] = load_string(
        _doc(
            "Service",
            "{address: 'http://svc:80/quote', method: get, "
            "inputs: {n: {type: integer}}, headers: {X-Key: '${vars.key}'}}",
        )
    )
    assert svc.resource.spec.method == "GET"
    assert _problems(_doc("Service", "{address: 'ftp://x'}"))[0][0] == "spec.address"
    [(path, msg)] = _problems(_doc("Service", "{address: 'http://x', headers: {a: '${inputs.b}'}}"))
    assert path == "spec.headers" and "only vars" in msg

    [sub] = load_string(
        _doc(
            "EventSubscription",
            "{channel: orders.created, flow: f, filter: 'event.data.n > 1', "
            "inputs: {n: '${event.data.n}'}}",
        )
    )
    assert sub.resource.spec.channel == "orders.created"
    [(path, msg)] = _problems(
        _doc("EventSubscription", "{channel: c, flow: f, inputs: {n: '${steps.a.output}'}}")
    )
    assert path == "spec.inputs" and "only event" in msg
    [(path, msg)] = _problems(_doc("EventSubscription", "{channel: c, flow: f, filter: 'inputs'}"))
    assert path == "spec.filter"
    assert _problems(_doc("EventSubscription", "{channel: 'a b', flow: f}"))[0][0] == "spec.channel"


FLOW = """apiVersion: orchestrator/v1
kind: Flow
metadata: {name: f}
spec:
  steps:
"""


def test_http_steps_validate_and_flows_cannot_read_event():
    [flow] = load_string(
        FLOW
        + "    - {id: a, http: {url: 'http://x/${inputs.id}', method: post, expect: [200, 409]}}"
    )
    assert flow.resource.spec.steps[0].http.method == "POST"
    [(path, msg)] = _problems(FLOW + "    - {id: a, http: {url: 'http://x', expect: 700}}")
    assert path == "spec.steps[0].http.expect" and "100-599" in msg
    [(path, msg)] = _problems(FLOW + "    - {id: a, http: {url: 'http://x', methd: GET}}")
    assert "did you mean 'method'" in msg
    [(path, msg)] = _problems(FLOW + "    - {id: a, task: t, with: {x: '${event.data}'}}")
    assert path == "spec.steps[0].with" and "only defined in an EventSubscription" in msg
    problems = _problems(FLOW + "    - {id: a, service: q, with: {x: '${steps.b.output}'}}")
    assert "unknown step 'b'" in problems[0][1]


# -- variables and masking -------------------------------------------------------------------


def test_resolve_reads_the_environment_and_remembers_secrets():
    env = {"TOK": "s3cr3t-value", "HOST": "db"}
    assert variables.resolve("h", {"value": "pg://${env.HOST}/x"}, env) == "pg://db/x"
    assert variables.resolve("n", {"value": 5}, env) == 5
    assert "s3cr3t-value" not in variables.known_secrets()
    assert variables.resolve("t", {"value": "${env.TOK}", "secret": True}, env) == "s3cr3t-value"
    assert "s3cr3t-value" in variables.known_secrets()
    with pytest.raises(ExpressionError, match="'MISSING', which is not set"):
        variables.resolve("m", {"value": "${env.MISSING}"}, env)
    assert variables.shown({"value": "${env.TOK}", "secret": True}) == "***"


def test_mask_replaces_secrets_everywhere_in_a_value():
    secrets = frozenset({"abc123", "abc"})
    value = {"k abc123": ["x abc123 y", {"n": 1, "s": "abc"}], "t": ("abc",)}
    assert variables.mask(value, secrets) == {
        "k ***": ["x *** y", {"n": 1, "s": "***"}],
        "t": ["***"],
    }
    assert variables.mask(value, frozenset()) is value


def test_variable_map_resolves_only_what_is_read(monkeypatch):
    monkeypatch.setenv("VM_TOKEN", "vm-secret-1")
    specs = {"ok": {"value": "${env.VM_TOKEN}", "secret": True}, "broken": {"value": "${env.NOPE}"}}
    vm = variables.VariableMap(lambda: specs)
    assert vm["ok"] == "vm-secret-1" and len(vm) == 2 and set(vm) == {"ok", "broken"}
    with pytest.raises(KeyError):
        vm["missing"]


def test_log_filter_masks_messages_args_and_tracebacks(caplog):
    variables.remember_secret("log-secret-42")
    handler = logging.StreamHandler()
    logger = logging.getLogger("test.masking")
    logger.addHandler(handler)
    try:
        variables.install_log_filter(logger)
        assert any(isinstance(f, variables.SecretFilter) for f in handler.filters)
        record = logger.makeRecord("t", logging.ERROR, "f", 1, "token %s", ("log-secret-42",), None)
        try:
            raise ValueError("boom log-secret-42")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
        variables.SecretFilter().filter(record)
        text = handler.format(record)
        assert "log-secret-42" not in text and "token ***" in text and "boom ***" in text
    finally:
        logger.removeHandler(handler)


# -- http ------------------------------------------------------------------------------------


def test_service_outputs_are_checked_and_extras_pass():
    schema = {"total": InputField(type="number", required=True)}
    assert check_outputs("q", schema, {"total": 2, "x": 1}) == {"total": 2, "x": 1}
    with pytest.raises(HttpError, match="invalid output 'total'") as info:
        check_outputs("q", schema, {"total": "2"})
    assert info.value.retryable is False
    with pytest.raises(HttpError, match="'total': is required"):
        check_outputs("q", schema, {})


# -- webhooks --------------------------------------------------------------------------------


def test_webhook_signatures():
    body = b'{"a": 1}'
    header = sign("k", body, 1_700_000_000)
    assert header.startswith("t=1700000000,sha256=")
    digest = verify(header, body, "k", now=1_700_000_100)
    assert len(digest) == 64
    for bad_header, bad_body, now, words in [
        (None, body, 1_700_000_000, "missing"),
        ("sha256=00", body, 1_700_000_000, "malformed"),
        (header, body + b"x", 1_700_000_000, "does not match"),
        (sign("other", body, 1_700_000_000), body, 1_700_000_000, "does not match"),
        (header, body, 1_700_000_301, "replay"),
    ]:
        with pytest.raises(SignatureError, match=words):
            verify(bad_header, bad_body, "k", now=now)
    assert verify(sign("k", body), body, "k")  # now, by default
    assert abs(int(sign("k", body).split(",")[0][2:]) - time.time()) < 5
