"""The dashboard's serving: /ui and its assets load without a token, its data calls do not.

The browser test (trigger, watch, approve by clicking) is tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_api
from orchestrator.dashboard import CONTENT_SECURITY_POLICY, UI_DIR
from orchestrator.settings import Settings
from tests.support import REPO_ROOT, free_port, wait_for

TOKEN = "dash-token"


@pytest.fixture(scope="module")
def settings() -> Settings:
    # No Redis is reached: the client connects lazily and these tests only read /ui and
    # the authentication answer, which comes before any endpoint runs.
    return Settings(redis_url="redis://127.0.0.1:1/0", api_tokens=TOKEN)


@pytest.fixture(scope="module")
def api(settings):
    with TestClient(create_api(settings), follow_redirects=False) as tc:
        yield tc


def test_ui_redirects_to_the_page_with_a_relative_location(api):
    resp = api.get("/ui")
    assert resp.status_code == 307
    assert resp.headers["location"] == "ui/"  # relative: right behind a path-prefixing proxy
    assert api.get("/ui", follow_redirects=True).url.path == "/ui/"


def test_page_and_assets_load_without_a_token_with_security_headers(api):
    resp = api.get("/ui/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert '<script src="app.js"' in resp.text and "vendor/mermaid.min.js" in resp.text
    csp = resp.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in csp and "unsafe-eval" not in csp
    assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";")[0]
    assert resp.headers["x-content-type-options"] == "nosniff"
    for asset, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = api.get(f"/ui/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
        assert r.content == (UI_DIR / asset).read_bytes()


def test_mermaid_is_served_locally_and_gzipped(api):
    raw = (UI_DIR / "vendor" / "mermaid.min.js").read_bytes()
    assert len(raw) > 1_000_000 and b"mermaid" in raw[-2000:]
    resp = api.get("/ui/vendor/mermaid.min.js", headers={"Accept-Encoding": "gzip"})
    assert resp.status_code == 200 and resp.headers["content-encoding"] == "gzip"
    assert resp.content == raw  # httpx decoded it
    assert int(resp.headers.get("content-length", len(gzip.compress(raw)))) < len(raw) // 2
    assert (UI_DIR / "vendor" / "mermaid.LICENSE").read_text().startswith("The MIT License")


def test_page_never_writes_html_from_data():
    # Data is written with textContent only; the one SVG (Mermaid's output) is parsed.
    source = (UI_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, sink


def test_unknown_asset_is_404_json(api):
    resp = api.get("/ui/nope.js")
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
    assert api.get("/ui/../pyproject.toml").status_code == 404


def test_data_calls_need_the_token_outside_dev_mode(settings):
    with TestClient(create_api(settings), base_url="http://127.0.0.1") as tc:
        assert tc.get("/ui/").status_code == 200
        for path in ("/v1/runs", "/v1/flows", "/v1/runs/x/events", "/v1/flows/text/graph"):
            resp = tc.get(path)
            assert resp.status_code == 401, path
            assert resp.json()["error"] == "unauthorized"
        resp = tc.post("/v1/runs/x/steps/s/approve", json={"by": "alice"})
        assert resp.status_code == 401
        # A wrong token is refused; the right one gets past authentication (to Redis,
        # which is down here: 503, not 401).
        assert tc.get("/v1/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = tc.get("/v1/runs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 503, ok.text


def test_dev_mode_on_loopback_needs_no_token(settings):
    with TestClient(create_api(settings, dev=True), base_url="http://127.0.0.1") as tc:
        assert tc.get("/ui/").status_code == 200
        assert tc.get("/v1/runs").status_code == 503  # past auth, Redis down
    with TestClient(create_api(settings, dev=True)) as remote:  # "testserver": not loopback
        assert remote.get("/v1/runs").status_code == 401


def test_dashboard_is_not_in_the_openapi_schema(api):
    paths = api.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()["paths"]
    assert not any(p.startswith("/ui") for p in paths)


def test_orchestrator_api_prints_the_dashboard_url_and_serves_it(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_URL"] = "redis://127.0.0.1:1/0"  # not needed to serve /ui
    out = tmp_path / "api.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "api", "--dev", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def served() -> bool:
        assert proc.poll() is None, out.read_text()
        try:
            return httpx.get(f"{base}/ui/", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(served, timeout=30, interval=0.1, message="orchestrator api never served /ui/")
        assert f"dashboard: {base}/ui" in out.read_text()
        assert "Content-Security-Policy" in httpx.get(f"{base}/ui/", timeout=5).headers
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
