"""The REST API under attack and under load (issue "Hardening"), mostly over real HTTP.

* 500 triggers from 50 client threads to a real ``orchestrator api``: all 201, every run
  succeeds, ``/healthz`` answers throughout (the producer-pool deadlock, defect 1).
* Redis gone: a clean 503 with ``Retry-After``; a wedged API (every request thread stuck
  on a Redis that hangs) fails ``orchestrator health``, and passes again once it recovers.
* Values too big, too deep or not encodable are refused before a run exists; a stored
  run JSON cannot carry still lists (defect 7).
* Bodies over ``max_request_bytes`` are cut off while they are read, webhooks before
  their signature is checked (defect 8); headers over 16 KiB are a 431.
* Webhooks do not tell unknown flows from known ones; ``/docs`` and ``/openapi.json``
  need the token; an idempotency key reused with other inputs is 409 (defect 10).
* Every client error is a 4xx JSON body.

Waits are bounded polls; load goes to 127.0.0.1 only, bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_api
from orchestrator.client import Client
from orchestrator.settings import Settings
from orchestrator.webhooks import sign
from tests.integration.flows import deploy
from tests.support import REPO_ROOT, RedisServer, free_port, wait_for

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOOK_SECRET = f"hook-{uuid.uuid4().hex}"
#: The served API's body limit (small, so the tests send little to pass it).
BODY_LIMIT = 256 * 1024

DATA_FLOW = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs:
    message: {type: string, required: true}
    data: {type: object}
  steps:
    - {id: upper, task: text.upper, with: {message: "${inputs.message}"}}
  outputs: {message: "${steps.upper.output}"}
"""

HOOKED = """
apiVersion: orchestrator/v1
kind: Variable
metadata: {name: NAME-hook}
spec: {value: "${env.HARDENING_HOOK_SECRET}", secret: true}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  webhook: {secret: NAME-hook}
  inputs: {message: {type: string, required: true}}
  steps:
    - {id: up, task: text.upper, with: {message: "${inputs.message}"}}
  outputs: {message: "${steps.up.output}"}
"""


# -- an `orchestrator api` process ---------------------------------------------------------


class ApiServer:
    """``python -m orchestrator api`` on a free loopback port, its output in a log file."""

    def __init__(self, env: dict[str, str], log_dir: Path, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        self.env.update({"ORCHESTRATOR_API_TOKENS": TOKEN, **env})
        self.args = args
        self.log_path = log_dir / f"api-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiServer:
        cmd = [sys.executable, "-m", "orchestrator", "api", "--port", str(self.port), *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:  # any answer: /healthz is 503 while Redis is down
                return httpx.get(f"{self.base}/healthz", timeout=2).status_code > 0
            except httpx.TransportError:
                return False

        wait_for(answers, timeout=30, interval=0.1, message=lambda: f"no answer:\n{self.log()}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="module")
def flows(client, worker) -> Iterator[dict[str, str]]:
    client.deploy(REPO_ROOT / "flows" / "text.yaml")
    os.environ["HARDENING_HOOK_SECRET"] = HOOK_SECRET  # the in-process API resolves it
    try:
        plain = HOOKED.split("---")[1].replace("webhook: {secret: NAME-hook}", "")
        yield {
            "data": deploy(client, DATA_FLOW),
            "hooked": deploy(client, HOOKED),
            "plain": deploy(client, plain),
        }
    finally:
        os.environ.pop("HARDENING_HOOK_SECRET", None)


@pytest.fixture(scope="module")
def served(orch_env, flows, tmp_path_factory) -> Iterator[ApiServer]:
    """A real API process on the module's Redis and queue (the ``worker`` runs its steps)."""
    env = {
        **orch_env,
        "ORCHESTRATOR_MAX_REQUEST_BYTES": str(BODY_LIMIT),
        "HARDENING_HOOK_SECRET": HOOK_SECRET,
    }
    server = ApiServer(env, tmp_path_factory.mktemp("api"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api(settings, client, flows) -> Iterator[TestClient]:
    """The app in process (same Redis and flows), with the token."""
    app = create_api(settings.model_copy(update={"api_tokens": TOKEN}), client)
    with TestClient(app, raise_server_exceptions=False) as tc:
        tc.headers.update(AUTH)
        yield tc


def _json_error(resp: httpx.Response, status: int, error: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert body["message"], body
    if error is not None:
        assert body["error"] == error, body
    return body


def _nest(levels: int) -> dict:
    """An object nested ``levels`` deep (``{}`` is one level)."""
    value: dict = {}
    for _ in range(levels - 1):
        value = {"x": value}
    return value


# -- defect 1: load, Redis outages, liveness -----------------------------------------------


def test_500_concurrent_triggers_all_answer_201_and_every_run_succeeds(served, client, flows):
    n, threads = 500, 50
    url = f"{served.base}/v1/flows/text/runs"
    latencies: list[float] = []
    probes: list[tuple[int, float]] = []
    done = threading.Event()

    def probe_health() -> None:  # /healthz keeps answering while the triggers come in
        with httpx.Client(timeout=10) as http:
            while not done.is_set():
                t0 = time.perf_counter()
                status = http.get(f"{served.base}/healthz").status_code
                probes.append((status, time.perf_counter() - t0))
                done.wait(0.1)

    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    with httpx.Client(headers=AUTH, timeout=30, limits=limits) as http:

        def trigger(i: int) -> httpx.Response:
            t0 = time.perf_counter()
            resp = http.post(url, json={"inputs": {"message": f"load {i}"}})
            latencies.append(time.perf_counter() - t0)
            return resp

        prober = threading.Thread(target=probe_health, daemon=True)
        prober.start()
        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(threads) as pool:
                responses = list(pool.map(trigger, range(n), timeout=120))
        finally:
            wall = time.perf_counter() - started
            done.set()
            prober.join(timeout=15)

    statuses = [r.status_code for r in responses]
    assert statuses == [201] * n, {s: statuses.count(s) for s in set(statuses)}
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == n
    assert probes and all(status == 200 for status, _ in probes), probes
    lat = sorted(latencies)
    print(
        f"\n{n} triggers, {threads} threads: {wall:.2f}s wall, {n / wall:.0f}/s, "
        f"p50 {lat[n // 2] * 1000:.0f} ms, p99 {lat[int(n * 0.99)] * 1000:.0f} ms, "
        f"max {lat[-1] * 1000:.0f} ms; /healthz x{len(probes)}, "
        f"max {max(t for _, t in probes) * 1000:.0f} ms"
    )

    # Every run was published: none stays pending, all succeed with the worker running.
    def unfinished() -> list[str]:
        pipe = client.store.r.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(client.store.run_key(rid), "status")
        return [s for s in pipe.execute() if s != "succeeded"]

    wait_for(
        lambda: not unfinished(),
        timeout=240,
        interval=1,
        message=lambda: f"runs not succeeded: {sorted(set(unfinished()))} x{len(unfinished())}",
    )


def test_redis_down_answers_503_with_retry_after_never_hangs(tmp_path):
    own = RedisServer().start(appendonly=True)
    tag = uuid.uuid4().hex[:8]
    env = {
        "ORCHESTRATOR_REDIS_URL": own.url,
        "ORCHESTRATOR_KEY_PREFIX": f"t{tag}:",
        "ORCHESTRATOR_DEFAULT_QUEUE": f"q{tag}",
    }
    settings = Settings(redis_url=own.url, key_prefix=f"t{tag}:", default_queue=f"q{tag}")
    with Client(settings) as c:
        c.deploy(REPO_ROOT / "flows" / "text.yaml")
    server = ApiServer(env, tmp_path).start()
    closed = ApiServer(
        {**env, "ORCHESTRATOR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, tmp_path
    )
    url = "/v1/flows/text/runs"
    body = {"inputs": {"message": "x"}}
    try:
        assert httpx.post(server.base + url, json=body, headers=AUTH).status_code == 201
        assert own.proc is not None
        os.kill(own.proc.pid, signal.SIGSTOP)  # it hangs: redis-py's socket timeout (5 s)
        try:
            t0 = time.perf_counter()
            resp = httpx.post(server.base + url, json=body, headers=AUTH, timeout=30)
            took = time.perf_counter() - t0
        finally:
            os.kill(own.proc.pid, signal.SIGCONT)
        _json_error(resp, 503, "unavailable")
        assert int(resp.headers["Retry-After"]) > 0 and took < 15, took
        own.stop()
        for api in (server, closed.start()):
            t0 = time.perf_counter()
            resp = httpx.post(api.base + url, json=body, headers=AUTH, timeout=30)
            took = time.perf_counter() - t0
            err = _json_error(resp, 503, "unavailable")
            assert "Redis" in err["message"] and int(resp.headers["Retry-After"]) > 0
            assert took < 10, f"a trigger took {took:.1f}s to say Redis is down"
            resp = httpx.get(api.base + "/v1/runs", headers=AUTH, timeout=30)
            _json_error(resp, 503, "unavailable")
            resp = httpx.get(api.base + "/healthz", timeout=30)
            assert resp.status_code == 503 and resp.headers["Retry-After"]
        own.start(appendonly=True)  # back on the same port: the API recovers by itself
        resp = httpx.post(server.base + url, json=body, headers=AUTH, timeout=30)
        assert resp.status_code == 201, resp.text
    finally:
        closed.stop()
        server.stop()
        own.cleanup()


def _healthy(path: Path, max_age: float) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "health", "--file", str(path)]
        + ["--max-age", str(max_age)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.returncode == 0


def test_a_wedged_api_is_reported_unhealthy_by_orchestrator_health(tmp_path):
    """A Redis that hangs (SIGSTOP) and a flood of requests: every request thread waits
    on Redis (redis-py gives up after its 5 s socket timeout), hundreds of requests
    queue for a thread, the API answers nothing, and its liveness file, touched through
    the same thread pool, ages until ``orchestrator health`` fails. SIGCONT: it recovers.
    """
    own = RedisServer().start()
    alive = tmp_path / "api.alive"
    tag = uuid.uuid4().hex[:8]
    env = {
        "ORCHESTRATOR_REDIS_URL": own.url,
        "ORCHESTRATOR_KEY_PREFIX": f"t{tag}:",
        "ORCHESTRATOR_LIVENESS_FILE": str(alive),
    }
    server = ApiServer(env, tmp_path).start()
    max_age = 8.0  # the API touches the file every 5 s (health.TOUCH_INTERVAL_S)
    assert own.proc is not None
    try:
        wait_for(lambda: _healthy(alive, max_age), timeout=30, interval=0.5)
        os.kill(own.proc.pid, signal.SIGSTOP)
        try:
            # 400 requests (the pool has 40 threads); each client gives up after 1 s,
            # the server still runs its request when a thread comes free.
            def flood(_: int) -> None:
                with contextlib.suppress(httpx.TimeoutException):
                    httpx.get(f"{server.base}/v1/runs", headers=AUTH, timeout=1)

            with ThreadPoolExecutor(80) as pool:
                list(pool.map(flood, range(400)))
            with pytest.raises(httpx.TimeoutException):  # it answers nothing now
                httpx.get(f"{server.base}/healthz", timeout=2)
            wait_for(lambda: not _healthy(alive, max_age), timeout=40, interval=0.5)
        finally:
            os.kill(own.proc.pid, signal.SIGCONT)
        wait_for(lambda: _healthy(alive, max_age), timeout=60, interval=0.5)
        assert httpx.get(f"{server.base}/v1/runs", headers=AUTH, timeout=10).status_code == 200
    finally:
        server.stop()
        own.cleanup()


# -- defect 7: limits before a run exists; stored runs that JSON cannot carry ---------------


def _runs_of(client, flow: str) -> list[str]:
    return [r.id for r in client.runs(flow=flow, limit=1000)]


def _post_raw(api: TestClient, url: str, body: bytes, **headers: str) -> httpx.Response:
    return api.post(url, content=body, headers={"Content-Type": "application/json", **headers})


def test_limits_are_checked_before_a_run_is_created(api, client, flows, settings):
    flow = flows["data"]
    url = f"/v1/flows/{flow}/runs"
    before = _runs_of(client, flow)
    # The nesting limit counts the inputs object: data may nest max_nesting - 1 deep.
    deepest = {"message": "ok", "data": _nest(settings.max_nesting - 1)}
    resp = api.post(url, json={"inputs": deepest})
    assert resp.status_code == 201, resp.text
    ok_id = resp.json()["id"]

    refusals = [
        # (body, status, field prefix, limit)
        (json.dumps({"inputs": {"message": "x", "data": _nest(settings.max_nesting)}}).encode(),
         422, "body.inputs.data", "max_nesting"),
        (json.dumps({"inputs": {"message": "x", "data": _nest(900)}}).encode(),
         422, "body.inputs.data", "max_nesting"),
        (b'{"inputs": {"message": "x", "data": {"y": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}}",
         422, "body", "max_nesting"),
        (b'{"inputs": {"message": "\\ud800"}}', 422, "body.inputs.message", None),
        (b'{"inputs": {"message": "x", "data": {"\\udfff": 1}}}', 422, "body.inputs.data", None),
        # Under the request limit (2 MiB), over the inputs limit (1 MiB): the runtime's check.
        (json.dumps({"inputs": {"message": "x" * (settings.max_input_bytes + 10)}}).encode(),
         413, "inputs", "max_input_bytes"),
    ]  # fmt: skip
    for body, status, field, limit in refusals:
        err = _json_error(_post_raw(api, url, body), status, "limit_exceeded")
        assert err["field"].startswith(field) and err["limit"] == limit, (body[:80], err)
        if limit:
            assert f"ORCHESTRATOR_{limit.upper()}" in err["message"], err
    assert set(_runs_of(client, flow)) - set(before) == {ok_id}  # no refused run was created
    wait_for(lambda: client.get(ok_id).status == "succeeded", timeout=30)
    resp = api.get(f"/v1/runs/{ok_id}")
    assert resp.status_code == 200 and resp.json()["inputs"] == deepest


def _store_bad_run(client, flow: str) -> str:
    """A run with values the limits now refuse, written straight into Redis (as a run
    stored before them would be): unreadable inputs, a lone surrogate, NaN."""
    rid = f"old{uuid.uuid4().hex[:16]}"
    now = time.time()
    record = {"id": rid, "flow": flow, "version": client.store.flow_info(flow)["version"],
              "status": "succeeded", "inputs": {}, "created_at": now}  # fmt: skip
    client.store.create_run(record, {"ts": now, "type": "run.created", "step": ""})
    p = client.store.p
    client.store.r.zrem(f"{p}runs:active", rid)  # indexed as the succeeded run it is
    client.store.r.zadd(f"{p}runs:status:succeeded", {rid: now})
    step = {"status": "succeeded", "attempts": 1, "error": {"message": "\ud800 ok"}}
    client.store.r.hset(
        client.store.run_key(rid),
        mapping={
            "inputs": '{"message": "x", "data": {"y": ' + "[" * 100_000 + "]" * 100_000 + "}}",
            "outputs": '{"message": "\\ud800", "n": NaN, "deep": ' + "[" * 900 + "]" * 900 + "}",
            "s:upper": json.dumps(step),
            "o:upper": '"\\udfff"',
        },
    )
    return rid


def test_a_stored_run_json_cannot_carry_still_lists_and_shows(api, client, flows):
    flow = flows["data"]
    good = api.post(f"/v1/flows/{flow}/runs", json={"inputs": {"message": "fine"}}).json()["id"]
    bad = _store_bad_run(client, flow)
    for params in ({"flow": flow}, {}, {"status": "succeeded", "limit": 1000}):
        resp = api.get("/v1/runs", params=params)
        assert resp.status_code == 200, resp.text
        runs = {r["id"]: r for r in resp.json()["runs"]}
        assert bad in runs and (good in runs or "status" in params)
    listed = runs[bad]
    page = api.get(f"/v1/runs/{bad}")
    assert page.status_code == 200, page.text
    for run in (listed, page.json()):
        fields = {n["field"] for n in run["notes"]}
        assert {"inputs", "outputs.message", "outputs.n", "steps.upper.output"} <= fields, run
        assert run["inputs"].startswith("<not shown: stored nested too deep to read")
        assert run["outputs"]["message"] == "\\ud800"  # shown escaped
        assert run["outputs"]["n"].startswith("<not shown")
        assert run["steps"]["upper"]["output"] == "\\udfff"
        assert run["steps"]["upper"]["error"]["message"] == "\\ud800 ok"
    good_run = api.get(f"/v1/runs/{good}").json()
    assert "notes" not in good_run  # only a run with a problem carries notes
    assert api.get(f"/v1/flows/{flow}/graph", params={"run": bad}).status_code == 200
    assert api.get(f"/v1/runs/{bad}/events").status_code == 200


# -- defect 8: request bodies over max_request_bytes ---------------------------------------


def _exchange(port: int, head: bytes, chunks: Iterator[bytes] | None = None, timeout: float = 20):
    """Send ``head`` and then ``chunks`` (from a thread), reading the answer meanwhile.

    Returns (status, headers, body, bytes of chunks sent, whether sending was cut off).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent = [0]
    cut = threading.Event()

    def send_body() -> None:
        try:
            sock.sendall(head)
            for chunk in chunks or ():
                sock.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:  # the server closed the connection: it read no more
            cut.set()

    try:
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            try:
                more = sock.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            data += more
        sender.join(timeout=timeout)
    finally:
        sock.close()
    head_text, _, body = data.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, body, sent[0], cut.is_set()


def _expected_length(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + len(sep) + int(value)
    return len(data) + 1  # unknown: read to the end


def _chunked(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A chunked JSON body of about ``total`` bytes, without its end."""
    yield b'%x\r\n{"inputs": {"message": "\r\n' % len(b'{"inputs": {"message": "')
    piece = b"x" * size
    for _ in range(total // size):
        yield b"%x\r\n%s\r\n" % (size, piece)


def _head(method: str, path: str, *lines: str) -> bytes:
    text = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *lines, "", ""]
    return "\r\n".join(text).encode()


@pytest.mark.parametrize("path", ["/v1/flows/text/runs", "/v1/hooks/HOOKED", "/v1/runs"])
def test_a_content_length_over_the_limit_is_refused_at_once(served, flows, path):
    path = path.replace("HOOKED", flows["hooked"])
    method = "GET" if path == "/v1/runs" else "POST"
    head = _head(method, path, f"Authorization: Bearer {TOKEN}",
                 "Content-Type: application/json", "Content-Length: 1000000000",
                 "X-Signature: t=1,sha256=" + "0" * 64)  # fmt: skip
    t0 = time.perf_counter()
    status, headers, body, _, _ = _exchange(served.port, head)  # no body is ever sent
    assert status == 413 and time.perf_counter() - t0 < 5
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    err = json.loads(body)
    assert err["error"] == "limit_exceeded" and err["limit"] == "max_request_bytes"


@pytest.mark.parametrize("path", ["/v1/flows/text/runs", "/v1/hooks/HOOKED", "/v1/hooks/nope"])
def test_a_chunked_body_is_cut_off_at_the_limit(served, flows, path):
    """Before the signature is checked, for a webhook (a wrong one here: 413, not 401)."""
    path = path.replace("HOOKED", flows["hooked"])
    head = _head("POST", path, f"Authorization: Bearer {TOKEN}",
                 "Content-Type: application/json", "Transfer-Encoding: chunked",
                 "X-Signature: " + sign("wrong", b"x"))  # fmt: skip
    offered = 64 * 1024 * 1024
    status, headers, body, sent, cut = _exchange(served.port, head, _chunked(offered))
    assert status == 413, body
    assert json.loads(body)["limit"] == "max_request_bytes"
    # The server stopped reading: the rest could not be sent (what it did take is the
    # limit plus what the two sockets' kernel buffers hold).
    assert cut and sent < offered, sent


def test_bodies_under_the_limit_chunked_or_not_get_through(served, flows):
    body = json.dumps({"inputs": {"message": "y" * (BODY_LIMIT - 100)}}).encode()
    assert len(body) <= BODY_LIMIT
    headers = {**AUTH, "Content-Type": "application/json"}
    resp = httpx.post(f"{served.base}/v1/flows/text/runs", content=body, headers=headers)
    assert resp.status_code == 201, resp.text

    def stream() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        yield body[:1000]
        yield body[1000:]

    resp = httpx.post(f"{served.base}/v1/flows/text/runs", content=stream(), headers=headers)
    assert resp.status_code == 201, resp.text
    assert resp.request.headers.get("transfer-encoding") == "chunked"


@pytest.mark.parametrize("size", [20 * 1024, 64 * 1024, 1024 * 1024])
def test_headers_over_16_kib_are_a_431_json_body(served, size):
    """Whether they reach the server in one piece (the app's check) or in many (h11's)."""
    status, headers, body, _, _ = _exchange(
        served.port, _head("GET", "/v1/flows", f"X-Big: {'a' * size}")
    )
    assert status == 431 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "headers_too_large"
    resp = httpx.get(f"{served.base}/v1/flows", headers={**AUTH, "X-Big": "a" * 8 * 1024})
    assert resp.status_code == 200  # big but under the limit


def test_a_request_that_is_not_http_is_a_400_json_body(served):
    for head in (b"GARBAGE\r\n\r\n", b"GET /v1/flows HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        status, headers, body, _, _ = _exchange(served.port, head)
        assert status == 400 and headers["content-type"] == "application/json", body
        assert json.loads(body)["error"] == "bad_request"


# -- defect 10: webhooks, docs, idempotency -------------------------------------------------


def test_webhooks_answer_unknown_flows_like_bad_signatures(api, flows):
    body = b'{"message": "x"}'
    wrong = {"X-Signature": sign("not-the-secret", body), "Content-Type": "application/json"}
    cases = {
        "unknown": "/v1/hooks/no-such-flow",
        "no webhook": f"/v1/hooks/{flows['plain']}",
        "bad signature": f"/v1/hooks/{flows['hooked']}",
    }
    answers = {}
    for name, url in cases.items():
        resp = api.post(url, content=body, headers=wrong)
        answers[name] = (resp.status_code, resp.json())
    assert len(set(json.dumps(a) for a in answers.values())) == 1, answers
    assert answers["unknown"] == (
        401,
        {
            "error": "invalid_signature",
            "message": "signature does not match the body",
            "field": "header.X-Signature",
        },
    )
    # A header that is not a signature at all: the same answer for all three too.
    missing = {json.dumps(api.post(url, content=body).json()) for url in cases.values()}
    assert len(missing) == 1
    # Timing: the same Redis reads and the same HMAC for each (medians, interleaved).
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(40):
        for name, url in cases.items():
            t0 = time.perf_counter()
            api.post(url, content=body, headers=wrong)
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    fastest, slowest = min(medians.values()), max(medians.values())
    print("\nwebhook 401 medians (ms):", {k: round(v * 1000, 2) for k, v in medians.items()})
    assert slowest - fastest < max(0.001, 0.25 * fastest), medians
    # The right signature still triggers.
    good = {"X-Signature": sign(HOOK_SECRET, body), "Content-Type": "application/json"}
    assert api.post(cases["bad signature"], content=body, headers=good).status_code == 201


def test_docs_and_openapi_need_the_token_but_not_in_loopback_dev_mode(settings, client, api):
    for path in ("/docs", "/openapi.json", "/redoc"):
        _json_error(api.get(path, headers={"Authorization": ""}), 401, "unauthorized")
        _json_error(api.get(path, headers={"Authorization": "Bearer nope"}), 401)
        assert api.get(path).status_code == 200
    assert "/v1/runs" in api.get("/openapi.json").json()["paths"]
    assert "openapi.json" in api.get("/docs").text
    with TestClient(create_api(settings, client, dev=True), base_url="http://127.0.0.1") as dev:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert dev.get(path).status_code == 200
    assert api.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert api.get("/ui/", headers={"Authorization": ""}).status_code == 200


def test_docs_need_the_token_over_http(served):
    assert httpx.get(f"{served.base}/openapi.json").status_code == 401
    assert httpx.get(f"{served.base}/docs").status_code == 401
    assert httpx.get(f"{served.base}/openapi.json", headers=AUTH).status_code == 200


def test_an_idempotency_key_with_other_inputs_is_409_naming_the_run(api):
    key = f"k-{uuid.uuid4().hex}"
    url = "/v1/flows/text/runs"
    first = api.post(url, json={"inputs": {"message": "a"}}, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    same = api.post(url, json={"inputs": {"message": "a"}}, headers={"Idempotency-Key": key})
    assert same.status_code == 201 and same.json()["id"] == first.json()["id"]
    other = api.post(url, json={"inputs": {"message": "b"}}, headers={"Idempotency-Key": key})
    err = _json_error(other, 409, "idempotency_conflict")
    assert err["idempotency_key"] == key and err["run_id"] == first.json()["id"]
    assert err["field"] == "header.Idempotency-Key"


# -- every client error is a 4xx JSON body --------------------------------------------------


def test_malformed_requests_are_4xx_json_bodies(api, flows):
    posts = [
        f"/v1/flows/{flows['data']}/runs",
        "/v1/runs/some-run/signals/s",
        "/v1/runs/some-run/steps/s/approve",
        "/v1/events/orders",
        "/v1/events/orders/replay",
        f"/v1/hooks/{flows['hooked']}",
    ]
    bodies = [
        b'{"inputs": {"message": "\xff\xfe"}}',  # not UTF-8
        b"\xef\xbb\xbf{}",  # a BOM
        b"[1, 2]",
        b"42",
        b'"text"',
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"data": "\\ud800", "by": "\\ud800", "inputs": {"\\ud800": 1}}',
        b'{"' + b"k" * 10_000 + b'": 1}',
        b'{"n": 1e999999}',
        b'{"n": ' + b"9" * 5000 + b"}",  # over Python's 4,300 digits for an int
    ]
    for url in posts:
        for body in bodies:
            hook = {"X-Signature": sign(HOOK_SECRET, body)} if "/hooks/" in url else {}
            resp = _post_raw(api, url, body, **hook)
            assert 400 <= resp.status_code < 500, (url, body[:40], resp.status_code, resp.text)
            assert resp.json()["error"], (url, body[:40], resp.text)
    odd_ids = ["%00", "..%2F..%2Fetc", "%FF%FE", "\u00e9\u2603", "a" * 4000, "run%0D%0AX: y"]
    for rid in odd_ids:
        for url in (f"/v1/runs/{rid}", f"/v1/runs/{rid}/events", f"/v1/flows/{rid}/graph"):
            resp = api.get(url)
            _json_error(resp, 404, "not_found")
    for params in ({"limit": 10**9}, {"limit": -1}, {"limit": "1e3"}, {"status": "\u2603"}):
        _json_error(api.get("/v1/runs", params=params), 422)
    _json_error(api.get("/v1/runs/x/events", params={"after": "1-2-3"}), 422)
    _json_error(api.get("/v1/flows/text/events", params={"runs": 10**9}), 422)
    _json_error(api.get("/v1/no-such-endpoint"), 404)
    _json_error(api.delete("/v1/runs"), 405)
