"""The one table of the orchestrator's Redis keys and run-hash fields.

Every key is built by a function here and nowhere else; the README links to this table.

Key layout (``P`` is the configured prefix, default ``orch:``; ``{R}`` is a run id in
braces, a Redis Cluster hash tag, so every key of one run lives on one shard):

=================================  =========================================================
``P{R}:run``                       hash: the run (``id flow version status inputs outputs
                                   error created_at started_at finished_at parent ...``),
                                   each step instance's record ``s:<key>`` (JSON: status,
                                   attempts, started_at, finished_at, worker, task_id, input,
                                   error) and output ``o:<key>`` (JSON), and the lease
                                   ``l:<key>`` of a running step (``recovery.py``)
``P{R}:events``                    stream: the run's audit trail, one JSON field ``e`` each
``P{R}:fanin:<key>``               set: arrivals at one fan-in (deleted when it fires)
``P{R}:comp``                      list: keys of succeeded steps that have ``compensate``,
                                   in order of completion (the saga's undo log)
``P{R}:sig:<name>``                list: signals that arrived before a step waited for them
``P{R}:watchers``                  list: steps of other runs waiting for this run to end
``Ptimers``                        sorted set: parked steps by due time (JSON members:
                                   ``plan.StepAddress`` lists, as in ``P{R}:watchers``)
``Pschedules``                     hash: schedule name -> its spec (JSON)
``Pschedule:<name>``               hash: ``next`` fire time, ``last`` fire, ``error``
``Pfired:<name>:<time>``           string: one fire time claimed (two beats, one run)
``Pflows``                         set: deployed flow names
``Pflow:<name>``                   hash: ``version state deployed_at``
``Pflowdef:<name>:<version>``      string: the definition document (JSON), immutable
``Pidem:<flow>:<key>``             string: run id owning an idempotency key (TTL = retention)
``Pruns`` / ``Pruns:flow:<name>``  sorted sets of run ids by creation time
``Pruns:active``                   sorted set of runs not yet ended
``Pruns:status:<status>``          sorted sets of ended runs by end time
``Pres:<kind>``                    hash: name -> spec (JSON) of each deployed Variable
                                   (a secret only as its ``${env.NAME}`` reference),
                                   Service and EventSubscription
``Pchannel:<name>``                stream: events published to a channel (``e``: JSON)
``Pchannel:<name>:dead``           stream: events that could not start a run, with why
``Pmetrics``                       hash: counters and histogram buckets for ``/metrics``
                                   (its fields: ``orchestrator/counters.py``)
=================================  =========================================================

Fields of the run hash ``P{R}:run`` (``<key>`` is a step instance key, ``id`` or
``id[i][j]`` inside forEach):

=====================  =====================================================================
``id flow version``    the run's identity and its flow's definition version
``status``             ``status.RUN_STATUSES``; ``phase`` is ``recovery`` while the saga runs
``inputs outputs``     JSON; ``error`` (JSON: type, message, step)
``created_at``         epoch seconds; also ``started_at``, ``finished_at``
``idempotency_key``    the key it was triggered with; ``parent`` (JSON ``StepAddress`` of the
                       subflow step that started it, and ``depth``) for a child run
``published``          when its first canvas was published (the sweep republishes a pending
                       run without it); ``reason``: why a pending run does not move
``recovery``           JSON list of ``[step, path]`` compensations in order
``s:<key>``            the step record (JSON: status, attempts, started_at, finished_at,
                       worker, task_id, input, error; ``lease`` seconds while running;
                       ``lost``/``lost_why``: deaths of this attempt, see ``begin_step.lua``)
``o:<key>``            the step's output (JSON)
``l:<key>``            the lease of a running step: ``{t: task id, w: worker, u: until,
                       why}`` (``recovery.py``)
``i:<key>[i]``         a forEach's item ``i``; ``n:<key>`` its item count
``c:<key>``            a subflow step's child run id (in runs stored before ``fc:``
                       existed, also a forEach's started count: ``foreach_arrive.lua``
                       counts there when only ``c:`` exists)
``fc:<key>``           a forEach's started count
``f:<key>``            a fan-in that fired
``e:<key>``            the error a ``try`` caught; ``pe:<key>`` the error pending a ``finally``
``w:<key>``            a parked step's wait (JSON); ``d:<key>`` an approval's decision;
                       ``sp:<key>`` a signal's payload
=====================  =====================================================================
"""

from __future__ import annotations


def run(prefix: str, run_id: str) -> str:
    return f"{prefix}{{{run_id}}}:run"


def events(prefix: str, run_id: str) -> str:
    return f"{prefix}{{{run_id}}}:events"


def fanin(prefix: str, run_id: str, key: str) -> str:
    return f"{prefix}{{{run_id}}}:fanin:{key}"


def comp(prefix: str, run_id: str) -> str:
    return f"{prefix}{{{run_id}}}:comp"


def signal(prefix: str, run_id: str, name: str) -> str:
    return f"{prefix}{{{run_id}}}:sig:{name}"


def watchers(prefix: str, run_id: str) -> str:
    return f"{prefix}{{{run_id}}}:watchers"


def metrics(prefix: str) -> str:
    return f"{prefix}metrics"


def nodes(prefix: str) -> str:
    return f"{prefix}nodes"


def runs_active(prefix: str) -> str:
    return f"{prefix}runs:active"


def rate(prefix: str, flow: str, step: str, slot: int) -> str:
    return f"{prefix}rate:{flow}:{step}:{slot}"


def sweep_lock(prefix: str) -> str:
    return f"{prefix}sweep:lock"


def sweep_cursor(prefix: str) -> str:
    return f"{prefix}sweep:cursor"
