"""``orchestrator health``: the liveness file's age decides the exit status (a live worker
touching it is in tests/integration/test_compose_commands.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.health import TOUCH_INTERVAL_S, BeatToucher, check, touch, touch_while_serving


def _health(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["health", *args], prog_name="orchestrator", env=env)


def test_a_fresh_file_is_healthy(tmp_path: Path) -> None:
    alive = tmp_path / "run" / "w.alive"
    touch(alive)  # creates the folder too
    result = _health("--file", str(alive), "--max-age", "60")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")
    # The setting names the file when --file does not.
    result = _health(env={"ORCHESTRATOR_LIVENESS_FILE": str(alive)})
    assert result.exit_code == 0, result.output


def test_a_stale_or_missing_file_is_not(tmp_path: Path) -> None:
    alive = tmp_path / "w.alive"
    touch(alive)
    past = time.time() - 300
    os.utime(alive, (past, past))
    result = _health("--file", str(alive), "--max-age", "120")
    assert result.exit_code == 1
    assert "last touched 300" in result.stderr and "more than 120s" in result.stderr
    result = _health("--file", str(tmp_path / "missing.alive"))
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_no_file_configured_is_a_usage_error() -> None:
    result = _health(env={"ORCHESTRATOR_LIVENESS_FILE": ""})
    assert result.exit_code == 2
    assert "ORCHESTRATOR_LIVENESS_FILE" in result.stderr


def test_touch_refreshes_the_age(tmp_path: Path) -> None:
    alive = tmp_path / "w.alive"
    touch(alive)
    os.utime(alive, (0, 0))
    assert not check(alive, 60)[0]
    touch(alive)
    assert check(alive, 60)[0]


def test_beat_touches_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alive = tmp_path / "beat.alive"
    clock = [1000.0]
    monkeypatch.setattr("orchestrator.health.time.monotonic", lambda: clock[0])
    toucher = BeatToucher(str(alive))
    toucher()
    assert alive.exists()
    os.utime(alive, (0, 0))
    clock[0] += TOUCH_INTERVAL_S / 2
    toucher()  # too soon: left alone
    assert alive.stat().st_mtime == 0
    clock[0] += TOUCH_INTERVAL_S
    toucher()
    assert alive.stat().st_mtime > 0
    BeatToucher("")()  # no file configured: nothing to do


def test_the_api_toucher_stops_while_the_request_thread_pool_is_stuck(tmp_path: Path) -> None:
    """The API's liveness touch goes through the pool its sync endpoints run in: with
    every thread stuck (a deadlock, a Redis that hangs) the file ages; once one comes
    back, the touching resumes."""
    alive = tmp_path / "api.alive"
    stuck = threading.Event()

    async def main() -> None:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 2  # this loop's own limiter: two request threads
        async with anyio.create_task_group() as tasks:
            try:
                tasks.start_soon(touch_while_serving, alive, 0.02)
                await _until(alive.exists)
                for _ in range(2):  # two requests that never return while ``stuck`` is clear
                    tasks.start_soon(anyio.to_thread.run_sync, stuck.wait)
                await _until(lambda: limiter.borrowed_tokens == 2)
                await anyio.sleep(0.1)  # a touch that had a thread already is done by now
                os.utime(alive, (0, 0))
                await anyio.sleep(0.5)  # 25 intervals
                assert alive.stat().st_mtime == 0, "touched while every thread was stuck"
                stuck.set()
                await _until(lambda: alive.stat().st_mtime > 0)
            finally:
                stuck.set()  # the task group waits for the threads: let them go
                tasks.cancel_scope.cancel()

    anyio.run(main)


async def _until(predicate, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)
