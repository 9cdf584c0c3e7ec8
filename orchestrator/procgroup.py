"""Process groups of a prefork worker node, and killing what a step leaves behind.

Celery forks a prefork worker's pool processes into the main process's process group.
A signal to the whole group (``kill -- -PGID``, supervisord's ``stopasgroup`` and
``killasgroup``, ``tini -g``, Ctrl-\\ in a terminal) then reaches every pool process
along with the main process. Celery sets SIGTERM back to its default action in pool
processes, so a group SIGTERM killed the steps running there at once, although the main
process began a warm shutdown meant to let them finish: their messages went back to the
queue and the steps ran a second time elsewhere.

So each pool process, as it starts (Celery's ``worker_process_init``), leads a process
group of its own (:func:`isolate_pool_process`): a signal to the node's group reaches the
main process only, which does the warm (or cold) shutdown and stops its pool processes
itself. What Celery sends a pool process directly (a cancel's ``revoke(terminate=True)``,
the cold shutdown's SIGTERM, the hard time limit) still reaches it. A pool process asks
the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``; Celery asks too,
this checks the parent is still the one that forked it), so a SIGKILL to the main process
or its group leaves no pool process behind.

A step's own subprocesses are born in its pool process's group. Two functions kill them:

* :func:`kill_descendants`, in a pool process whose step ended by its soft timeout:
  SIGTERM to every descendant and every other member of its group, SIGKILL to those still
  there after a short grace;
* :func:`kill_group`, in the main process when a pool process is killed (hard time limit,
  a cancel, its death): SIGKILL to the rest of that process's group and its descendants.
  billiard itself signals the group of a pool process that leads one at a hard time limit,
  but sends SIGKILL only when the pool process outlives SIGTERM for 0.1 s, so a
  subprocess that ignores SIGTERM would survive it.

Linux only (``prctl``; ``/proc``); elsewhere the pool processes stay in the node's group.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

import psutil
from celery import current_app

log = logging.getLogger("orchestrator.procgroup")

#: How long :func:`kill_descendants` waits after SIGTERM before it sends SIGKILL: well
#: within the second at least that a step's hard time limit comes after its soft one
#: (``policy.hard_time_limit``), so the step's timeout is still recorded before it.
KILL_GRACE_S = 0.5
#: How long it then waits for SIGKILLed processes to be gone.
KILL_WAIT_S = 0.2
#: ``prctl`` option: the signal this process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: The process that imported this module: a forked pool process's parent.
_LOADED_IN = os.getpid()


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError) as exc:  # no libc prctl
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
        return False
    return True


def isolate_pool_process(parent: int | None = None) -> bool:
    """Make this (pool) process lead a process group of its own and die with its parent.

    ``parent`` is the process that forked it (default: the one that imported this module,
    when that is not this one). A parent already gone (it died before the death signal
    was asked for) ends this process at once: nothing would stop it later. True when the
    process now leads its own group.
    """
    if parent is None and os.getpid() != _LOADED_IN:
        parent = _LOADED_IN
    set_pdeathsig(signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        log.warning("pool process %d: its worker process %d is gone; exiting", os.getpid(), parent)
        os._exit(1)
    if os.getpgrp() == os.getpid():
        return True
    try:
        os.setpgid(0, 0)
    except OSError as exc:  # a session leader cannot: stays in its group
        log.debug("pool process %d stays in group %d: %s", os.getpid(), os.getpgrp(), exc)
        return False
    return True


def on_pool_process_init(**_: Any) -> None:
    """``worker_process_init`` receiver: isolate pool processes of orchestrator apps."""
    if current_app.conf.get("orchestrator_settings") is None:
        return  # a pool process of some other Celery app
    isolate_pool_process()


# -- killing what is left ---------------------------------------------------------------------


def kill_descendants(grace: float = KILL_GRACE_S) -> list[int]:
    """Kill every descendant of this process: SIGTERM, then SIGKILL after ``grace`` s.

    Called in a pool process when its step ended by its soft timeout. Orphans the step
    left (a subprocess whose parent exited) are found as members of this process's group,
    when it leads one (:func:`isolate_pool_process`); a process that leads no group never
    signals its group, which holds the main process and the other pool processes. Returns
    the pids signalled.
    """
    me = os.getpid()
    procs = _members(me, group=os.getpgrp() == me, exclude={me})
    if not procs:
        return []
    _signal(procs, signal.SIGTERM)
    left = _wait_gone(procs, grace)
    if left:
        _signal(left, signal.SIGKILL)
        _wait_gone(left, KILL_WAIT_S)
    pids = sorted(p.pid for p in procs)
    log.warning(
        "stopped %d process(es) the step left behind: %s%s",
        len(pids),
        pids,
        f" ({len(left)} after SIGKILL)" if left else "",
    )
    return pids


def kill_group(pid: int) -> list[int]:
    """SIGKILL the rest of pool process ``pid``'s group and its descendants, not ``pid``.

    Called in the worker's main process when pool process ``pid`` is killed (a hard time
    limit, a cancel) or died: whatever its step started goes with it. Works before and
    after ``pid`` is gone (its group outlives it while any member lives; a descendant that
    left the group is found only while ``pid`` lives). Never signals this process, its
    group or an ancestor's descendants. Does not wait. Returns the pids signalled.
    """
    me = os.getpid()
    if pid <= 0 or pid == me or pid in _ancestors():
        return []  # its descendants would include this process
    procs = _members(pid, group=pid != os.getpgrp(), exclude={me, pid})
    _signal(procs, signal.SIGKILL)
    pids = sorted(p.pid for p in procs)
    if pids:
        log.warning("killed %d process(es) left by pool process %d: %s", len(pids), pid, pids)
    return pids


def _ancestors() -> set[int]:
    try:
        return {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        return set()


def _members(pid: int, group: bool, exclude: set[int]) -> list[psutil.Process]:
    """``pid``'s live descendants and, with ``group``, the members of the group ``pid``."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(pid).children(recursive=True):
            found[p.pid] = p
    if group:
        for other in psutil.pids():
            if other in found or other in exclude:
                continue
            try:
                if os.getpgid(other) == pid:
                    found[other] = psutil.Process(other)
            except (OSError, psutil.Error):  # gone meanwhile
                continue
    return [p for p in found.values() if p.pid not in exclude and _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        # psutil checks the process is still the one it found (not a reused pid).
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Bounded poll until every process has exited (a zombie counts as gone); the rest."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _running(p)]
    return left
