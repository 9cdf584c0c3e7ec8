"""Property-based fuzz of the REST API from its own OpenAPI schema: no input yields a 5xx.

Schemathesis reads ``/openapi.json`` from the live app (so every operation that exists
when this runs is covered, whoever added it) and Hypothesis generates requests for each
one, valid and invalid. The app runs against the test Redis with a real worker and the
example flows deployed; path parameters are drawn from generated values and from the ids
of real runs, flows and steps, so requests reach past the 404s into the handlers. Only
the status is judged (below 500): some answers are not JSON (``/metrics``).
"""

from __future__ import annotations

import os
import re

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.support import REPO_ROOT, wait_for

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Requests per operation (valid and invalid); 20 keeps the file well under a minute.
#: ``API_FUZZ_EXAMPLES=500`` (and ``API_FUZZ_RANDOM=1`` for new inputs) digs deeper.
EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "20"))
DERANDOMIZE = not os.environ.get("API_FUZZ_RANDOM")


@pytest.fixture(scope="module")
def known(client, worker) -> dict[str, list[str]]:
    """Real names for path parameters: deployed flows, a finished and a waiting run."""
    client.deploy(REPO_ROOT / "flows" / "text.yaml", REPO_ROOT / "flows" / "expense-approval.yaml")
    done = client.trigger("text", {"message": "fuzz me"})
    done.wait(timeout=30)
    waiting = client.trigger("expense-approval", {"employee": "eve", "amount": 1200})
    wait_for(lambda: client.get(waiting.id).status == "waiting", timeout=30)
    return {
        "run_id": [done.id, waiting.id],
        "name": ["text", "expense-approval", "payment_confirmed"],
        "flow": ["text", "expense-approval"],
        "step": ["manager_approval", "head_approval", "upper"],
        "channel": ["orders"],
        "run": [done.id, waiting.id],
    }


@pytest.fixture(scope="module")
def api_schema(settings, client, known):
    from orchestrator.api import create_api

    app = create_api(settings.model_copy(update={"api_tokens": TOKEN}), client)
    # The schema is behind the token too (only /healthz and webhooks are open).
    return schemathesis.openapi.from_asgi(
        "/openapi.json", app, headers={"Authorization": f"Bearer {TOKEN}"}
    )


def cases(operation, known: dict[str, list[str]]) -> st.SearchStrategy:
    """Valid and invalid requests, with generated path parameters or real ones."""
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    options = [operation.as_strategy(mode) for mode in modes]
    names = re.findall(r"{(\w+)}", operation.path)
    if names and all(n in known for n in names):
        real = st.fixed_dictionaries({n: st.sampled_from(known[n]) for n in names})
        for mode in modes:
            options.append(
                real.flatmap(lambda pp, mode=mode: operation.as_strategy(mode, path_parameters=pp))
            )
    return st.one_of(options)


def fuzz(operation, known: dict[str, list[str]], statuses: set[int]) -> None:
    """Send ``EXAMPLES`` generated requests to one operation; none may answer 5xx."""

    @hypothesis.given(case=cases(operation, known))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=DERANDOMIZE,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.headers = {**headers, **AUTH}
        response = case.call()
        statuses.add(response.status_code)
        assert response.status_code < 500, (
            f"{operation.label} answered {response.status_code}: {response.text[:500]}\n"
            f"reproduce: {case.as_curl_command()}"
        )

    run()


def test_api_answers_no_5xx(api_schema, known) -> None:
    operations = []
    for result in api_schema.get_all_operations():
        operations.append(result.ok())  # an Err is a schema the fuzzer cannot read: fail
    labels = {op.label for op in operations}
    # Not vacuous: the schema was read, and it has the operations SPEC section 7 names.
    assert {"POST /v1/flows/{name}/runs", "GET /v1/runs/{run_id}", "GET /healthz"} <= labels
    statuses: dict[str, set[int]] = {}

    failures = []
    for operation in operations:  # every operation is fuzzed, then the failures reported
        try:
            fuzz(operation, known, statuses.setdefault(operation.label, set()))
        except Exception as exc:  # noqa: BLE001 - an AssertionError or an app exception
            failures.append(f"{operation.label}: {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures)

    # The token was accepted (no 401 but from the webhook, which checks a signature
    # instead) and requests got through to the handlers.
    refused = {label for label, codes in statuses.items() if 401 in codes}
    assert refused <= {"POST /v1/hooks/{flow}"}, statuses
    succeeded = {label for label, codes in statuses.items() if any(200 <= c < 300 for c in codes)}
    assert {"GET /v1/runs", "GET /v1/runs/{run_id}", "GET /v1/flows"} <= succeeded, statuses
