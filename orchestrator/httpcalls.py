"""HTTP from steps: ``http`` steps (one request) and ``service`` steps (a ``Service`` call).

Both run inside the generic step task on the worker, with httpx. What counts as failure:

* a timeout or a connection error, a 5xx or a 429 answer: :class:`HttpError` with
  ``retryable`` set, so the step's retry policy applies;
* any other status outside ``expect`` (default: 2xx), a service answer that is not a JSON
  object, or one whose fields do not match the service's ``outputs``: not retryable.

The output of an ``http`` step is ``{status, headers, body}`` (``body`` parsed as JSON
when the answer says it is JSON, else text); a service step's output is the JSON object
the service answered.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx

from .errors import HttpError, InputError
from .inputs import validate_inputs
from .model import InputField, ServiceSpec

#: Used when neither the step nor the service names a timeout (seconds).
DEFAULT_TIMEOUT_S = 30.0
RETRYABLE_STATUS = frozenset({429}) | frozenset(range(500, 600))

_clients: dict[int, httpx.Client] = {}


def _client() -> httpx.Client:
    """One connection pool per worker process (pools do not survive a fork)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        client = _clients[pid] = httpx.Client(follow_redirects=False)
    return client


def request(spec: Mapping[str, Any], timeout: float | None) -> dict[str, Any]:
    """Send one rendered ``http`` step; its output, or HttpError."""
    method = str(spec.get("method") or "GET").upper()
    url = spec.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise HttpError(f"http.url must be an http(s) URL, got {url!r}", retryable=False)
    kwargs: dict[str, Any] = {
        "headers": {str(k): _header(k, v) for k, v in (spec.get("headers") or {}).items()},
        "timeout": timeout or DEFAULT_TIMEOUT_S,
    }
    if spec.get("query"):
        kwargs["params"] = {k: _text(v) for k, v in spec["query"].items()}
    if spec.get("json") is not None:
        kwargs["json"] = spec["json"]
    elif spec.get("body") is not None:
        kwargs["content"] = _text(spec["body"])
    resp = _send(method, url, kwargs)
    expect = spec.get("expect")
    accepted = [expect] if isinstance(expect, int) else expect
    ok = resp.status_code in accepted if accepted else 200 <= resp.status_code < 300
    if not ok:
        raise _status_error(method, url, resp, accepted)
    return {"status": resp.status_code, "headers": dict(resp.headers), "body": _body(resp)}


def call_service(
    name: str,
    spec: ServiceSpec,
    args: Mapping[str, Any],
    address: Any,
    headers: Mapping[str, Any],
    timeout: float | None,
) -> Any:
    """Call a Service with ``args`` checked against its inputs; its answer checked too.

    ``address`` and ``headers`` are the spec's, with their expressions rendered.
    """
    if not isinstance(address, str) or not address.startswith(("http://", "https://")):
        raise HttpError(f"service {name!r}: address must be an http(s) URL, got {address!r}", False)
    try:
        payload = validate_inputs(spec.inputs, dict(args))
    except InputError as exc:
        raise HttpError(f"service {name!r}: with.{exc.field}: {exc.reason}", False) from None
    kwargs: dict[str, Any] = {
        "headers": {str(k): _header(k, v) for k, v in headers.items()},
        "timeout": timeout or spec.timeout or DEFAULT_TIMEOUT_S,
    }
    if spec.method == "GET":
        kwargs["params"] = {k: _text(v) for k, v in payload.items() if v is not None}
    else:
        kwargs["json"] = payload
    resp = _send(spec.method, address, kwargs)
    if not 200 <= resp.status_code < 300:
        raise _status_error(spec.method, address, resp, None, f"service {name!r}")
    body = _body(resp)
    if not isinstance(body, dict):
        raise HttpError(
            f"service {name!r} answered {type(body).__name__}, not a JSON object",
            retryable=False,
        )
    return check_outputs(name, spec.outputs, body)


def check_outputs(name: str, schema: dict[str, InputField], body: dict[str, Any]) -> dict:
    """The service's answer with its declared outputs checked (other fields pass through)."""
    try:
        declared = validate_inputs(schema, {k: v for k, v in body.items() if k in schema})
    except InputError as exc:
        raise HttpError(
            f"service {name!r} answered an invalid output {exc.field!r}: {exc.reason}",
            retryable=False,
        ) from None
    return {**body, **declared}


def _send(method: str, url: str, kwargs: dict[str, Any]) -> httpx.Response:
    try:
        return _client().request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        raise HttpError(f"{method} {url}: timed out ({type(exc).__name__})", True) from None
    except httpx.TransportError as exc:
        raise HttpError(f"{method} {url}: {type(exc).__name__}: {exc}", True) from None
    except httpx.HTTPError as exc:  # an invalid URL or header: trying again cannot help
        raise HttpError(f"{method} {url}: {exc}", False) from None


def _status_error(
    method: str, url: str, resp: httpx.Response, accepted: list[int] | None, who: str = ""
) -> HttpError:
    wanted = ", ".join(map(str, accepted)) if accepted else "2xx"
    snippet = resp.text[:300].strip()
    message = f"{method} {url} answered {resp.status_code} (expected {wanted})"
    if who:
        message = f"{who}: {message}"
    if snippet:
        message += f": {snippet}"
    return HttpError(message, resp.status_code in RETRYABLE_STATUS, resp.status_code)


def _body(resp: httpx.Response) -> Any:
    if not resp.content:
        return None
    if "json" in resp.headers.get("content-type", ""):
        try:
            return resp.json()
        except ValueError:
            pass
    return resp.text


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _header(name: Any, value: Any) -> str:
    if isinstance(value, dict | list):
        raise HttpError(f"header {name!r} must be text, got {type(value).__name__}", False)
    return _text(value)
