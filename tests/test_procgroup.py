"""kill_descendants / kill_group / isolate_pool_process with real processes (Linux).

Each case builds a small tree of real processes: a "pool process" (a Python helper) whose
step started ``sh`` children with ``sleep 60`` grandchildren, some that ignore SIGTERM,
one orphaned (its parent exited; it stays in the group), one in a session of its own. The
helper, not pytest, calls :func:`kill_descendants`: it kills every descendant of the
calling process, which in pytest would include the test session's redis-server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from orchestrator import procgroup
from tests.support import REPO_ROOT, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

#: ``sh`` lines a step might run; each prints "<sh pid> <sleep pid>" on its first line.
TREE = "sleep 60 >/dev/null & echo $$ $!; wait"
STUBBORN = "trap '' TERM; sleep 60 >/dev/null & echo $$ $!; wait"  # sleep inherits SIG_IGN
ORPHAN = "sleep 60 >/dev/null & echo $$ $!"  # sh exits: sleep is reparented, same group

#: The helper: optionally leads a group of its own (as a pool process does), spawns the
#: ``spawn`` lines, prints their pids, then runs ``then`` (kill_descendants or a sleep).
HELPER = r"""
import json, os, subprocess, sys, time
import psutil
from orchestrator import procgroup

spec = json.loads(sys.argv[1])
if spec.get("isolate"):
    assert procgroup.isolate_pool_process()
pids = {}
for name, line in spec.get("spawn", {}).items():
    p = subprocess.Popen(["sh", "-c", line], stdout=subprocess.PIPE, text=True,
                         start_new_session=name.startswith("session"))
    sh, sleep = map(int, p.stdout.readline().split())
    pids[name + ".sh"], pids[name] = sh, sleep
if "orphan" in spec.get("spawn", {}):  # once its sh has exited, sleep is an orphan
    deadline = time.monotonic() + 10
    while psutil.Process(pids["orphan"]).ppid() == pids["orphan.sh"]:
        assert time.monotonic() < deadline, "the orphan's sh did not exit"
        time.sleep(0.01)
print(json.dumps({"pids": pids, "pgid": os.getpgrp()}), flush=True)
if spec["then"] == "kill_descendants":
    began = time.monotonic()
    killed = procgroup.kill_descendants(grace=spec["grace"])
    took = time.monotonic() - began
    print(json.dumps({"killed": killed, "took": took}), flush=True)
elif spec["then"] == "kill_group":
    print(json.dumps({"killed": procgroup.kill_group(spec["pid"])}), flush=True)
elif spec["then"] == "child_kills_my_group":  # a descendant calls kill_group(its parent)
    code = "import json, os; from orchestrator import procgroup; " \
        "print(json.dumps({'killed': procgroup.kill_group(os.getppid())}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(out.stdout.strip() or json.dumps({"error": out.stderr}), flush=True)
    time.sleep(60)
else:
    time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Helper:
    """One helper process; everything it started is killed when the test ends."""

    def __init__(self, spec: dict, **popen: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HELPER, json.dumps(spec)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE,
            text=True,
            **popen,  # type: ignore[arg-type]
        )
        first = json.loads(self._line())
        self.pids: dict[str, int] = first["pids"]
        self.pgid: int = first["pgid"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"helper exited with {self.proc.wait(10)}"
        return line

    def result(self) -> dict:
        return json.loads(self._line())

    def cleanup(self) -> None:
        for pid in [*self.pids.values(), self.proc.pid]:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        self.proc.wait(10)


@pytest.fixture
def helpers() -> Iterator[list[Helper]]:
    made: list[Helper] = []
    yield made
    for h in made:
        h.cleanup()


def test_kill_descendants_ends_the_whole_tree_and_the_orphans_of_its_group(helpers) -> None:
    h = Helper(
        {
            "isolate": True,
            "spawn": {"tree": TREE, "orphan": ORPHAN, "session": TREE},
            "then": "kill_descendants",
            "grace": 5.0,
        }
    )
    helpers.append(h)
    assert h.pgid == h.proc.pid  # it leads its group, as a pool process does
    assert alive(h.pids["orphan"]) and psutil.Process(h.pids["orphan"]).ppid() != h.proc.pid
    out = h.result()
    dead = ("tree", "tree.sh", "orphan", "session", "session.sh")
    assert set(out["killed"]) == {h.pids[n] for n in dead}
    assert out["took"] < 2.0  # SIGTERM was enough: no wait for the grace
    assert not [n for n in dead if alive(h.pids[n])]


def test_kill_descendants_sigkills_what_ignores_sigterm_after_the_grace(helpers) -> None:
    h = Helper(
        {"isolate": True, "spawn": {"stubborn": STUBBORN}, "then": "kill_descendants", "grace": 0.5}
    )
    helpers.append(h)
    out = h.result()
    assert set(out["killed"]) == {h.pids["stubborn"], h.pids["stubborn.sh"]}
    assert 0.5 <= out["took"] < 3.0
    assert not alive(h.pids["stubborn"]) and not alive(h.pids["stubborn.sh"])


def test_kill_descendants_never_signals_a_group_it_does_not_lead(helpers) -> None:
    # A "main process" leads the group; the helper (a pool process that did not isolate
    # itself) and a sibling share it. Only the helper's own descendants may die.
    leader = Helper({"isolate": True, "then": "sleep"})
    helpers.append(leader)
    sibling = Helper({"spawn": {"tree": TREE}, "then": "sleep"}, process_group=leader.pgid)
    helpers.append(sibling)
    h = Helper(
        {"spawn": {"tree": TREE}, "then": "kill_descendants", "grace": 1.0},
        process_group=leader.pgid,
    )
    helpers.append(h)
    assert h.pgid == sibling.pgid == leader.pgid != h.proc.pid
    out = h.result()
    assert set(out["killed"]) == {h.pids["tree"], h.pids["tree.sh"]}
    assert alive(leader.proc.pid) and alive(sibling.proc.pid)
    assert alive(sibling.pids["tree"]) and alive(sibling.pids["tree.sh"])


def test_kill_group_of_a_live_pool_process_kills_the_rest_not_it(helpers) -> None:
    pool = Helper(
        {"isolate": True, "spawn": {"tree": TREE, "stubborn": STUBBORN, "orphan": ORPHAN,
                                    "session": TREE}, "then": "sleep"}
    )  # fmt: skip
    helpers.append(pool)
    killed = procgroup.kill_group(pool.proc.pid)
    rest = ("tree", "tree.sh", "stubborn", "stubborn.sh", "orphan", "session", "session.sh")
    assert set(killed) == {pool.pids[n] for n in rest}
    wait_for(
        lambda: not [n for n in rest if alive(pool.pids[n])],
        timeout=5,
        message=lambda: str([n for n in rest if alive(pool.pids[n])]),
    )
    assert alive(pool.proc.pid)  # the caller's (billiard's) to kill


def test_kill_group_after_the_pool_process_died_kills_its_group(helpers) -> None:
    pool = Helper({"isolate": True, "spawn": {"tree": TREE, "stubborn": STUBBORN}, "then": "sleep"})
    helpers.append(pool)
    pool.proc.send_signal(signal.SIGKILL)  # as the hard time limit does
    pool.proc.wait(10)
    assert not alive(pool.proc.pid)
    rest = ("tree", "tree.sh", "stubborn", "stubborn.sh")
    assert all(alive(pool.pids[n]) for n in rest)  # what a killed pool process leaves
    killed = procgroup.kill_group(pool.proc.pid)
    assert set(killed) == {pool.pids[n] for n in rest}
    wait_for(lambda: not [n for n in rest if alive(pool.pids[n])], timeout=5)


def test_kill_group_spares_its_caller_its_ancestors_and_its_own_group(helpers) -> None:
    assert procgroup.kill_group(os.getpid()) == []
    # A descendant of the target: the target's tree holds the caller.
    parent = Helper({"isolate": True, "spawn": {"tree": TREE}, "then": "child_kills_my_group"})
    helpers.append(parent)
    assert parent.result() == {"killed": []}
    assert alive(parent.proc.pid) and alive(parent.pids["tree"])
    # A caller in the target's group (not its descendant): the target's own tree goes,
    # the rest of the group (the caller's too) is never scanned.
    target = Helper({"isolate": True, "spawn": {"tree": TREE}, "then": "sleep"})
    helpers.append(target)
    sibling = Helper({"spawn": {"tree": TREE}, "then": "sleep"}, process_group=target.pgid)
    helpers.append(sibling)
    caller = Helper({"then": "kill_group", "pid": target.proc.pid}, process_group=target.pgid)
    helpers.append(caller)
    assert set(caller.result()["killed"]) == {target.pids["tree"], target.pids["tree.sh"]}
    assert alive(sibling.proc.pid) and alive(sibling.pids["tree"])
    assert os.getpgid(sibling.pids["tree"]) == target.pgid


def test_isolate_pool_process_leads_a_group_and_dies_with_its_parent(helpers) -> None:
    # parent (isolated, sleeping) -> child that isolates itself; SIGKILL the parent.
    script = (
        "import os, subprocess, sys, time;"
        "from orchestrator import procgroup;"
        "c = subprocess.Popen([sys.executable, '-c', 'import os, time; "
        "from orchestrator import procgroup; "
        "assert procgroup.isolate_pool_process(os.getppid()); "
        "print(os.getpid(), os.getpgrp(), flush=True); time.sleep(60)'],"
        " stdout=subprocess.PIPE, text=True);"
        "print(c.stdout.readline().strip(), flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child, pgid = map(int, parent.stdout.readline().split())
        assert pgid == child  # a group of its own
        assert os.getpgid(child) != os.getpgid(parent.pid)
        began = time.monotonic()
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not alive(child), timeout=5, message="the child outlived its parent")
        assert time.monotonic() - began < 5
    finally:
        parent.kill()
        parent.wait(10)
        with contextlib.suppress(psutil.NoSuchProcess, NameError):
            psutil.Process(child).kill()
