"""The dashboard in a real browser: headless Debian chromium driven through chromedriver.

The API is served over real HTTP (uvicorn in a thread) with token auth, against the
module's private Redis and a real worker. The page is used the way a person would: type
the token into its dialog, trigger a run from the form and watch it succeed, approve a
waiting expense by clicking, cancel and retry from the buttons. Every outcome is checked
through the Python client as well as on the page.

``make test`` installs ``chromium`` and ``chromium-driver`` when they are missing (the
``browser`` target); without them, or without ``selenium``, these tests skip, except
under CI (``CI`` set) where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn

from orchestrator.api import create_api
from tests.support import REPO_ROOT, free_port, wait_for

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
TOKEN = "dashboard-test-token"
TOKEN_KEY = "orchestrator.apiToken"  # the page's sessionStorage key (orchestrator/ui/app.js)
# How chromium logs a 4xx answer of the API (which the page then reports itself), and the
# favicon it asks for when the test opens /healthz (the dashboard's page has an inline one).
_EXPECTED = re.compile(
    r"/favicon\.ico - Failed to load resource|"
    r"/v1/\S* - Failed to load resource: the server responded with a status of 4\d\d"
)

RETRY_FLOW = """\
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: dash-retry}
spec:
  inputs:
    flag: {type: string, required: true}
  steps:
    - {id: first, task: tests.echo, with: {flag: "${inputs.flag}"}}
    - id: shaky
      task: ctl.fail_while
      with: {flag: "${inputs.flag}"}
      retry: {maxAttempts: 1}
"""


def _unavailable() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install chromium chromium-driver; make browser)"
    return None


_missing = _unavailable()
if _missing is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"the dashboard browser test cannot run under CI: {_missing}")
    pytest.skip(_missing, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.integration


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(settings, client, worker) -> Iterator[str]:
    """The API (tokens required, no dev mode) served by uvicorn on a free loopback port."""
    client.deploy(
        REPO_ROOT / "flows" / "text.yaml", REPO_ROOT / "flows" / "expense-approval.yaml", RETRY_FLOW
    )
    app = create_api(settings.model_copy(update={"api_tokens": TOKEN}), client)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="dashboard-api", daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: server.started or not thread.is_alive(),
            timeout=30,
            message="the API server never started",
        )
        assert thread.is_alive(), "the API server thread died while starting"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless chromium; its console log (warnings and errors) is kept for checks."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root (CI containers)
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,2000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    # An explicit driver path: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(
        service=Service(executable_path=CHROMEDRIVER, log_output=str(log)), options=options
    )
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: WebDriver, base_url: str) -> Iterator[Callable[[str], None]]:
    """``page(fragment)`` opens ``/ui/#fragment`` with the token already in this tab.

    After the test, the console must hold no error but the API's 4xx answers that the
    test provoked (a 401 before the token, a 403 or 422 the page reports): no script
    error, no CSP violation, no asset that failed to load.
    """
    browser.get_log("browser")  # drop what earlier tests left

    def open_page(fragment: str) -> None:
        if not browser.current_url.startswith(base_url):
            browser.get(f"{base_url}/healthz")  # same origin: sessionStorage is shared
        browser.execute_script(
            "sessionStorage.setItem(arguments[0], arguments[1])", TOKEN_KEY, TOKEN
        )
        browser.get(f"{base_url}/ui/#{fragment}")

    yield open_page
    errors = [
        e["message"]
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and not _EXPECTED.search(e["message"])
    ]
    assert not errors, errors


# The nodes of the drawn graph: their first label line and their classes.
_GRAPH_NODES = """
return [...document.querySelectorAll('#graph svg g.node')].map((n) => ({
  label: (n.querySelector('.nodeLabel') || {}).innerText?.trim().split(/\\s+/)[0],
  classes: [...n.classList],
}));
"""


def _wait(
    browser: WebDriver, predicate: Callable[[WebDriver], Any], message: str, timeout: float = 30
) -> Any:
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.1).until(predicate, message)
    except TimeoutException as exc:
        banner = browser.find_element(By.ID, "banner").text
        raise AssertionError(f"{message} (after {timeout}s; banner: {banner!r})") from exc


def _one(browser: WebDriver, css: str) -> WebElement | None:
    found = browser.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def _page_status(browser: WebDriver) -> str | None:
    status = _one(browser, "#run-status")
    return status.get_attribute("data-status") if status else None


def _wait_status(browser: WebDriver, status: str, timeout: float = 30) -> None:
    _wait(
        browser,
        lambda b: _page_status(b) == status,
        f"the page never showed the run {status}",
        timeout,
    )


def _type(element: WebElement, text: str) -> None:
    element.clear()
    element.send_keys(text)


def _waiting_expense(client, reason: str = "") -> str:
    run = client.trigger(
        "expense-approval", inputs={"employee": "eve", "amount": 120, "reason": reason}
    )

    def waiting() -> bool:
        step = client.get(run.id).steps.get("manager_approval")
        return step is not None and step.status == "waiting"

    wait_for(waiting, timeout=30, message="manager_approval never waited")
    return run.id


# -- tests -------------------------------------------------------------------------------


def test_page_asks_for_the_token_once_and_keeps_it_for_the_tab(browser, base_url):
    browser.get(f"{base_url}/healthz")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{base_url}/ui")  # redirected to /ui/
    assert browser.current_url.startswith(f"{base_url}/ui/")
    dialog = _wait(browser, lambda b: _one(b, "#token-dialog[open]"), "no token dialog on a 401")
    assert _one(browser, "#runs tbody tr") is None  # nothing shown without a token
    _type(browser.find_element(By.ID, "token-input"), "not-the-token")
    dialog.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(
        browser,
        lambda b: "refused" in b.find_element(By.ID, "token-error").text,
        "a wrong token was not reported",
    )
    assert "invalid token" in browser.find_element(By.ID, "token-error").text
    _type(browser.find_element(By.ID, "token-input"), TOKEN)
    dialog.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser, lambda b: not _one(b, "#token-dialog[open]"), "the dialog stayed open")
    _wait(
        browser,
        lambda b: b.find_element(By.ID, "auth-state").text == "using an API token",
        "the runs list did not load with the token",
    )
    assert browser.execute_script("return sessionStorage.getItem(arguments[0])", TOKEN_KEY) == TOKEN
    # Another view in the same tab: no second prompt.
    browser.execute_script("location.hash = '#/trigger'")
    _wait(
        browser,
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#trigger-form select option")) > 2,
        "the flows did not load",
    )
    assert _one(browser, "#token-dialog[open]") is None


def test_trigger_a_text_run_and_watch_it_succeed(page, browser, client):
    page("/trigger?flow=text")
    flow = _wait(
        browser,
        lambda b: _one(b, "#trigger-form select[name=flow] option[value=text]:checked"),
        "the trigger form did not preselect the text flow",
    )
    assert flow.text == "text"
    form = browser.find_element(By.ID, "trigger-form")
    inputs = form.find_element(By.NAME, "inputs")
    _type(inputs, '{"message": 5}')  # the API's 422 is shown, naming the field
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(
        browser,
        lambda b: "inputs.message" in b.find_element(By.ID, "trigger-error").text,
        "an invalid input was not reported with its field",
    )
    _type(inputs, '{"message": "watch the dash board"}')
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser, lambda b: "#/runs/" in b.current_url, "no run page after triggering")
    run_id = browser.current_url.rsplit("#/runs/", 1)[1]

    _wait_status(browser, "succeeded")
    run = client.get(run_id)
    assert run.status == "succeeded" and run.flow == "text"
    shown = json.loads(browser.find_element(By.ID, "run-outputs").text)
    assert shown == run.outputs == {"message": "DRAOB HSAD EHT HCTAW", "spaces": 3}
    assert json.loads(browser.find_element(By.ID, "run-inputs").text) == {
        "message": "watch the dash board"
    }
    rows = browser.find_elements(By.CSS_SELECTOR, "#steps tbody tr[data-status]")
    assert {r.get_attribute("data-step"): r.get_attribute("data-status") for r in rows} == {
        k: "succeeded" for k in ("upper", "fan", "reverse", "spaces")
    }
    # A step's details: its recorded input and output, as text.
    upper = _one(browser, "#steps tbody tr[data-status][data-step=upper]")
    upper.find_element(By.CSS_SELECTOR, "button").click()
    detail = browser.find_element(By.CSS_SELECTOR, "#steps tr.detail[data-step=upper]")
    assert "WATCH THE DASH BOARD" in detail.text and "Input" in detail.text
    # The Mermaid drawing, coloured by the run's step statuses.
    # (Read in one script: a redraw may replace the SVG between two WebDriver calls.)
    drawn = _wait(
        browser,
        lambda b: b.execute_script(_GRAPH_NODES) if _one(b, "#graph svg") else None,
        "the graph was not drawn",
    )
    assert len(drawn) >= 7, drawn  # start, upper, fan-out, reverse, spaces, fan-in, end
    _wait(
        browser,
        lambda b: (
            {"upper", "reverse", "spaces"}
            <= {n["label"] for n in b.execute_script(_GRAPH_NODES) if "succeeded" in n["classes"]}
        ),
        "the graph was not coloured by the steps' statuses",
    )
    events = [
        e.get_attribute("data-type")
        for e in browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")
    ]
    assert events[0] == "run.created" and events[-1] == "run.succeeded"
    # And the runs list, filtered by flow, shows it succeeded.
    browser.execute_script("location.hash = '#/runs?flow=text'")
    row = _wait(
        browser,
        lambda b: _one(b, f"#runs tbody tr[data-run='{run_id}']"),
        "the run is not in the runs list",
    )
    assert row.get_attribute("data-status") == "succeeded"
    assert all(
        r.find_elements(By.TAG_NAME, "td")[1].text == "text"
        for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    )


def test_approve_a_waiting_expense_by_clicking(page, browser, client):
    marker = f"pwned{uuid.uuid4().hex[:6]}"
    reason = f"<img id={marker} src=x onerror=\"document.title='{marker}'\"> taxi"
    run_id = _waiting_expense(client, reason)
    page(f"/runs/{run_id}")
    form = _wait(
        browser,
        lambda b: _one(b, "form.approval[data-step=manager_approval]"),
        "no approval form for the waiting step",
    )
    _wait_status(browser, "waiting")
    # Inputs are shown as text: the markup in `reason` did not become an element.
    assert f"<img id={marker}" in form.find_element(By.CLASS_NAME, "message").text
    assert browser.find_elements(By.ID, marker) == [] and browser.title != marker
    assert "approvers: alice" in form.text

    by = form.find_element(By.NAME, "by")
    _type(by, "mallory")  # not an approver: the API's 403 is shown, nothing decided
    form.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
    _wait(
        browser,
        lambda b: "may not decide" in form.find_element(By.CLASS_NAME, "decision-message").text,
        "a refused decision was not reported",
    )
    assert client.get(run_id).steps["manager_approval"].status == "waiting"

    _type(by, "alice")
    _type(form.find_element(By.NAME, "comment"), "fine by me")
    form.find_element(By.CSS_SELECTOR, "button[value=approve]").click()

    def decided() -> bool:
        step = client.get(run_id).steps["manager_approval"]
        return step.status == "succeeded"

    wait_for(decided, timeout=30, message="the click did not approve the step")
    output = client.get(run_id).steps["manager_approval"].output
    assert output["decision"] == "approved" and output["by"] == "alice"
    assert output["comment"] == "fine by me"
    assert client.wait(run_id, timeout=30)["approvals"]["manager"] == "approved"
    _wait_status(browser, "succeeded")
    assert _one(browser, "form.approval") is None
    approved = _one(browser, "#events tr[data-type='step.approved']")
    assert approved is not None and "alice" in approved.text


def test_cancel_and_retry_buttons(page, browser, client):
    run_id = _waiting_expense(client)
    page(f"/runs/{run_id}")
    _wait_status(browser, "waiting")
    assert browser.find_element(By.ID, "retry-run").get_attribute("disabled") is not None
    browser.find_element(By.ID, "cancel-run").click()
    _wait(browser, EC.alert_is_present(), "no confirmation before cancelling").accept()
    wait_for(lambda: client.get(run_id).status == "cancelled", timeout=30)
    _wait_status(browser, "cancelled")
    assert browser.find_element(By.ID, "cancel-run").get_attribute("disabled") is not None

    # A run that failed for a cause that is then fixed: retry resumes at the failed step.
    flag = f"dash-flag-{uuid.uuid4().hex[:8]}"
    client.store.r.set(flag, "1")
    failed = client.trigger("dash-retry", inputs={"flag": flag})
    wait_for(lambda: client.get(failed.id).status == "failed", timeout=30)
    page(f"/runs/{failed.id}")
    _wait_status(browser, "failed")
    error = browser.find_element(By.ID, "run-error")
    assert f"{flag} is set" in error.text
    client.store.r.delete(flag)
    retry = browser.find_element(By.ID, "retry-run")
    assert retry.get_attribute("disabled") is None
    retry.click()
    _wait_status(browser, "succeeded")
    run = client.get(failed.id)
    assert run.status == "succeeded"
    started = [e["step"] for e in client.events(failed.id) if e["type"] == "step.started"]
    assert started.count("first") == 1 and started.count("shaky") == 2
