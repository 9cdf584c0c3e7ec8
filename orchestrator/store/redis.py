"""The Redis store: with its catalog (:mod:`.catalog`: definitions, resources, channels,
schedules), the only code that sends commands on orchestrator keys.

Which keys and hash fields exist is written once, in :mod:`.keys`; each state change of
a run is one Lua script (``lua/*.lua``, loaded by :mod:`.scripts`) touching only that
run's keys; index updates and metric counts ride in the same pipeline. Indexes may briefly
list a run in a stale status, so readers check the run hash and drop what does not
match; a count the script turns out not to earn is taken back at once.
No secret's value is ever written: every method that writes user-derived data (run
and step records, outputs, errors, events, waits, signals, decisions, forEach items,
channel entries, schedules, definitions, resource specs) passes it through
:meth:`RedisStore._masked`, which replaces the value of every secret Variable this
process knows with ``***`` (:mod:`.variables`). The store learns the deployed secret
Variables itself (first plan load or write, every read of the Variables, every
``SECRETS_REFRESH_S``) and resolves them from this process's environment, so what is
masked does not depend on which process resolved a secret.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, FieldT

from ..counters import Counts, run_counts
from ..plan import StepAddress
from ..redisconn import redis_client
from ..settings import Settings
from ..status import ACTIVE, ENDED
from ..variables import learn_secrets, mask
from . import keys
from .catalog import Catalog, Entries, Hash, dumps
from .scripts import script as _script

#: How long a store trusts the secret Variables it learned before reading them again.
#: A Variable deployed meanwhile is learned sooner whenever this process reads the
#: Variables (a step reading ``${vars.NAME}``, a deploy through this store).
SECRETS_REFRESH_S = 30.0


class RedisStore(Catalog):
    """The orchestrator's only door to Redis state (the broker is Celery's business)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.p = settings.key_prefix
        self.r: redis.Redis = client or redis_client(
            settings.redis_url, settings, decode_responses=True, health_check_interval=30
        )
        self._create = self.r.register_script(_script("create_run"))
        self._begin = self.r.register_script(_script("begin_step"))
        self._complete = self.r.register_script(_script("complete_step"))
        self._end = self.r.register_script(_script("end_run"))
        self._fanin = self.r.register_script(_script("fanin"))
        self._recover = self.r.register_script(_script("begin_recovery"))
        self._arrive = self.r.register_script(_script("foreach_arrive"))
        self._park = self.r.register_script(_script("park"))
        self._unpark = self.r.register_script(_script("unpark"))
        self._signal = self.r.register_script(_script("signal"))
        self._decide = self.r.register_script(_script("decide"))
        self._renew = self.r.register_script(_script("renew_lease"))
        self._release = self.r.register_script(_script("release_lease"))
        self._count_runs = self.r.register_script(_script("count_runs"))
        self._secrets_due = 0.0  # monotonic time of the next read of the secret Variables

    def close(self) -> None:
        self.r.close()

    def ping(self) -> bool:
        return bool(self.r.ping())

    # -- leases and worker nodes (recovery.py) -------------------------------------------

    def leases(
        self,
        renew: list[tuple[str, str, str, str]],
        release: list[tuple[str, str, str, str, str]],
        lease_s: float,
    ) -> list[Any]:
        """Renew (run, step key, task id, worker) leases and release (..., why) ones, all in
        one pipeline (``lua/renew_lease.lua``, ``lua/release_lease.lua``); the results in
        order, 1 where the script changed something."""
        calls = [
            (self._renew, [self.run_key(run)], [key, task, worker, lease_s])
            for run, key, task, worker in renew
        ]
        calls += [
            (self._release, [self.run_key(run)], [key, task, worker, why])
            for run, key, task, worker, why in release
        ]
        return self._scripts(calls)

    def _scripts(self, calls: list[tuple[Any, list[str], list[Any]]]) -> list[Any]:
        """Lua scripts on any runs' keys in one pipeline (one round trip, Cluster or not);
        a script Redis does not have (restarted without AOF) is loaded and run again."""
        pipe = self.r.pipeline(transaction=False)
        for script, keys_, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys_), *keys_, *args)
        res = pipe.execute(raise_on_error=False)
        for i, out in enumerate(res):
            if isinstance(out, NoScriptError):
                script, keys_, args = calls[i]
                self.r.script_load(script.script)
                res[i] = self.r.evalsha(script.sha, len(keys_), *keys_, *args)
            elif isinstance(out, Exception):
                raise out
        return res

    def report_node(self, node: str, info: dict[str, Any] | None) -> None:
        """What a worker node consumes (its heartbeat), or None: it is stopping."""
        if info is None:
            self.r.hdel(self.nodes_key(), node)
        else:
            self.r.hset(self.nodes_key(), node, dumps(info))

    def nodes(self) -> dict[str, dict[str, Any]]:
        found = cast(Hash, self.r.hgetall(self.nodes_key()))
        return {n: json.loads(v) for n, v in found.items()}

    # -- the sweep (sweep.py) -------------------------------------------------------------

    def claim_sweep(self, period_s: float) -> bool:
        """True for the one caller that may sweep now (at most once per ``period_s``)."""
        ms = max(int(period_s * 1000), 1)
        return bool(self.r.set(keys.sweep_lock(self.p), "1", nx=True, px=ms))

    def sweep_batch(self, now: float, limit: int) -> list[tuple[str, float]]:
        """The next ``limit`` active runs after the sweep's cursor (then it starts over)."""
        cursor = float(self.r.get(keys.sweep_cursor(self.p)) or "-inf")
        ids = cast(
            list[tuple[str, float]],
            self.r.zrangebyscore(
                keys.runs_active(self.p), f"({cursor}", now, start=0, num=limit, withscores=True
            ),
        )
        self.r.set(keys.sweep_cursor(self.p), ids[-1][1] if len(ids) == limit else "-inf")
        return ids

    # -- metrics (metrics.py) --------------------------------------------------------------

    def metric_fields(self) -> dict[str, str]:
        return cast(Hash, self.r.hgetall(self.metrics_key()))

    def active_counts(self, page: int) -> dict[tuple[str, str], int]:
        """Runs not yet ended, by (flow, status): two round trips per ``page`` runs, counted
        in Redis (``lua/count_runs.lua``) so only the counts travel."""
        counts: dict[tuple[str, str], int] = {}
        start = 0
        while True:
            ids = cast(list[str], self.r.zrange(keys.runs_active(self.p), start, start + page - 1))
            if not ids:
                return counts
            start += page
            run_keys = [self.run_key(rid) for rid in ids]
            if self.settings.redis_cluster:  # a script may not read keys of many slots
                pipe = self.r.pipeline(transaction=False)
                for key in run_keys:
                    pipe.hmget(key, ["flow", "status"])
                found: list[Any] = []
                tally: dict[tuple[str, str], int] = {}
                for f, st in pipe.execute():
                    if f and st:
                        tally[(f, st)] = tally.get((f, st), 0) + 1
                for (f, st), n in tally.items():
                    found += [f"{f}|{st}", n]
            else:
                found = self._count_runs(keys=run_keys)
            for key, n in zip(found[::2], found[1::2], strict=True):
                flow, _, status = key.rpartition("|")
                if status in ACTIVE:  # a run that ended since the index was read: skip
                    counts[(flow, status)] = counts.get((flow, status), 0) + int(n)

    # -- rate limits (runtime/ratelimit.py) -----------------------------------------------

    def rate_hit(self, flow: str, step: str, slot: int, window: float) -> int:
        """Count one start of ``step`` in its rate window ``slot``; the count so far."""
        key = keys.rate(self.p, flow, step, slot)
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, int(window) + 1)
        return int(pipe.execute()[0])

    def reset_joins(self, run_id: str, step_keys: list[str]) -> None:
        """Forget the fan-ins of ``step_keys`` and the saga's undo log (a retried run)."""
        pipe = self.r.pipeline(transaction=False)
        for key in step_keys:
            pipe.delete(self.fanin_key(run_id, key))
        pipe.delete(self.comp_key(run_id))
        pipe.execute()

    # -- secrets ------------------------------------------------------------------------

    def _masked(self, value: Any) -> Any:
        """``value`` as it may be written to Redis: the value of every secret this process
        knows replaced with ``***``. Every method that writes user-derived data passes
        it through here (one place, so no write path can forget)."""
        self._fresh_secrets()
        return mask(value)

    def _fresh_secrets(self) -> None:
        """Read the secret Variables again if this store never did or did long ago."""
        if time.monotonic() >= self._secrets_due:
            self._learn_secrets()

    def _learn_secrets(self, specs: dict[str, dict[str, Any]] | None = None) -> None:
        """Know the value of every deployed secret Variable (``specs``, else read from
        Redis) that this process's environment resolves."""
        if specs is None:
            specs = {}
            for name, raw in cast(Hash, self.r.hgetall(f"{self.p}res:Variable")).items():
                with contextlib.suppress(ValueError):  # not ours to judge here
                    specs[name] = json.loads(raw)
        self._secrets_due = time.monotonic() + SECRETS_REFRESH_S
        learn_secrets(specs)

    def _script_and(
        self, script: Any, keys: list[str], args: list[Any], more: Callable[[Any], None]
    ) -> list[Any]:
        """Run a Lua script and more commands in one round trip; results in order.

        redis-py's pipeline asks ``SCRIPT EXISTS`` before every pipeline holding a script
        (a second round trip each time); this sends ``EVALSHA`` and loads the script only
        when Redis answers ``NOSCRIPT`` (after a restart without AOF, or a flush); the
        other commands ran then, so only the script is sent again (metric counts must
        not be made twice).
        """
        pipe = self.r.pipeline(transaction=False)
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        more(pipe)
        res = pipe.execute(raise_on_error=False)
        if isinstance(res[0], NoScriptError):
            self.r.script_load(script.script)
            res[0] = self.r.evalsha(script.sha, len(keys), *keys, *args)
        for r in res:
            if isinstance(r, Exception):
                raise r
        return res

    # -- keys ---------------------------------------------------------------------------

    def run_key(self, run_id: str) -> str:
        return keys.run(self.p, run_id)

    def events_key(self, run_id: str) -> str:
        return keys.events(self.p, run_id)

    def fanin_key(self, run_id: str, key: str) -> str:
        return keys.fanin(self.p, run_id, key)

    def comp_key(self, run_id: str) -> str:
        return keys.comp(self.p, run_id)

    def signal_key(self, run_id: str, name: str) -> str:
        return keys.signal(self.p, run_id, name)

    def watchers_key(self, run_id: str) -> str:
        return keys.watchers(self.p, run_id)

    def metrics_key(self) -> str:
        return keys.metrics(self.p)

    def nodes_key(self) -> str:
        return keys.nodes(self.p)

    # -- runs ---------------------------------------------------------------------------

    def claim_idempotency(self, flow: str, key: str, run_id: str) -> str:
        """The run id that owns ``(flow, key)``: ``run_id`` if it was free."""
        k = f"{self.p}idem:{flow}:{self._masked(key)}"
        if self.r.set(k, run_id, nx=True, ex=self.settings.retention_s):
            return run_id
        return cast(str | None, self.r.get(k)) or run_id

    def create_run(self, run: dict[str, Any], event: dict[str, Any]) -> bool:
        """Store a new run with its first event and index it; False if it already existed."""
        run, event = self._masked([run, event])
        rid, now = run["id"], run["created_at"]
        fields: list[Any] = []
        for k, v in run.items():
            if v is not None:
                fields += [k, v if isinstance(v, str | int | float) else dumps(v)]

        started: Counts = [(f"started|{run['flow']}", 1)]

        def index(pipe: Any) -> None:
            pipe.zadd(f"{self.p}runs", {rid: now})
            pipe.zadd(f"{self.p}runs:flow:{run['flow']}", {rid: now})
            pipe.zadd(f"{self.p}runs:active", {rid: now})
            self._count(pipe, started)

        keys = [self.run_key(rid), self.events_key(rid)]
        created = bool(self._script_and(self._create, keys, [dumps(event), *fields], index)[0])
        if not created:
            self._uncount(started)
        return created

    def _count(self, pipe: Any, counts: Counts, sign: int = 1) -> None:
        """Add metric increments (``counters``) to ``Pmetrics`` in a pipeline.

        They ride in the pipeline of the script that makes the change they count (no
        round trip of their own, and no key of another Cluster slot in the script);
        the rare change that the script refuses takes them back with ``_uncount``.
        """
        for field, amount in counts:
            pipe.hincrbyfloat(self.metrics_key(), field, sign * amount)

    def _uncount(self, counts: Counts) -> None:
        if counts:
            pipe = self.r.pipeline(transaction=False)
            self._count(pipe, counts, -1)
            pipe.execute()

    def begin_step(
        self,
        run_id: str,
        key: str,
        task_id: str,
        mark: bool,
        record: dict[str, Any] | None,
        event: dict[str, Any] | None,
        fields: list[str],
        recovery: bool = False,
    ) -> tuple[str, str | None, dict | None, list[str | None]]:
        """See ``lua/begin_step.lua``: verdict, run status, step record, the values read."""
        res = self._begin(
            keys=[self.run_key(run_id), self.events_key(run_id)],
            args=[
                key,
                task_id,
                "1" if mark else "0",
                dumps(record) if record else "",
                dumps(event) if event else "",
                time.time(),
                "1" if recovery else "0",
                *fields,
            ],
        )
        verdict, status, rec = res[0], res[1], res[2]
        values = list(res[3:]) + [None] * (len(fields) - len(res) + 3)
        return verdict, status, (json.loads(rec) if rec else None), values

    def complete_step(
        self,
        run_id: str,
        records: list[tuple[str, dict, Any]],
        events: list[dict[str, Any]],
        final: dict[str, Any] | None = None,
        compensable: list[str] | tuple[str, ...] = (),
        recovery: bool = False,
        counts: Counts = (),
        final_counts: Counts = (),
    ) -> str:
        """See ``lua/complete_step.lua``. ``records`` are (key, record, output-or-NO_OUTPUT).

        ``counts`` are metric increments that stand when the records are written
        (``counters.step_counts``), ``final_counts`` those that stand when ``final`` ends
        the run (``counters.run_counts``)."""
        records, events, final = self._masked([records, events, final])
        args: list[Any] = ["1" if recovery else "0", len(records)]
        for key, rec, output in records:
            args += [key, dumps(rec), "" if output is NO_OUTPUT else dumps(output)]
        args.append(len(events))
        args += [dumps(e) for e in events]
        args.append(len(compensable))
        args += list(compensable)
        keys = [self.run_key(run_id), self.events_key(run_id), self.comp_key(run_id)]
        if not final:
            if not counts:
                return self._complete(keys=keys, args=[*args, "", 0])
            res = self._script_and(
                self._complete, keys, [*args, "", 0], lambda pipe: self._count(pipe, counts)
            )[0]
            if res in ("dup", "missing"):  # nothing was written: nothing to count
                self._uncount(counts)
            return res
        args += [final["status"], self.settings.retention_s]
        for k, v in final.items():
            if k != "status":
                args += [k, v if isinstance(v, str | int | float) else dumps(v)]

        def index(pipe: Any) -> None:
            self._index_ended(pipe, run_id, final["status"], final.get("finished_at"))
            self._count(pipe, [*counts, *final_counts])

        res = self._script_and(self._complete, keys, args, index)[0]
        if res in ("dup", "missing"):
            self._uncount([*counts, *final_counts])
        elif res != "ok":  # the records were written, but the run did not end here
            self._uncount(final_counts)
        return res

    def _index_ended(self, pipe: Any, run_id: str, status: str, at: float | None) -> None:
        at = at or time.time()
        pipe.zrem(f"{self.p}runs:active", run_id)
        pipe.zadd(f"{self.p}runs:status:{status}", {run_id: at})
        pipe.zremrangebyscore(
            f"{self.p}runs:status:{status}", "-inf", at - self.settings.retention_s
        )

    def move_run(
        self,
        run_id: str,
        expected: tuple[str, ...],
        status: str,
        event: dict[str, Any],
        fields: dict[str, Any] | None = None,
    ) -> str:
        """Change a run's status if it is in ``expected``; returns the previous status.

        Raises ``redis.ResponseError`` with ``status:<current>`` when it is not.
        """
        event, fields = self._masked([event, fields])
        args: list[Any] = [
            ",".join(expected),
            status,
            dumps(event),
            self.settings.retention_s if status in ENDED else 0,
        ]
        for k, v in (fields or {}).items():
            args += [k, v if isinstance(v, str | int | float) else dumps(v)]

        def index(pipe: Any) -> None:
            if status in ENDED:
                self._index_ended(pipe, run_id, status, (fields or {}).get("finished_at"))
                pipe.hmget(self.run_key(run_id), ["flow", "created_at"])
            else:
                pipe.zadd(f"{self.p}runs:active", {run_id: time.time()})
                for s in ENDED:
                    pipe.zrem(f"{self.p}runs:status:{s}", run_id)

        keys = [self.run_key(run_id), self.events_key(run_id)]
        res = self._script_and(self._end, keys, args, index)
        if status in ENDED:  # it moved (else the script raised): a second round trip to
            # count it, on these rarer ends only (cancel, recovery done, publish failed)
            flow, created_at = res[-1]
            finished_at = (fields or {}).get("finished_at")
            pipe = self.r.pipeline(transaction=False)
            self._count(pipe, run_counts(flow or "", status, created_at, finished_at))
            pipe.execute()
        return res[0]

    def fanin(self, run_id: str, key: str, member: str, expected: int) -> bool:
        """Count an arrival; True for the single caller that completes the fan-in."""
        return bool(
            self._fanin(
                keys=[self.fanin_key(run_id, key), self.run_key(run_id)],
                args=[member, expected, f"f:{key}", self.settings.retention_s],
            )
        )

    def begin_recovery(
        self, run_id: str, error: dict[str, Any], event: dict[str, Any]
    ) -> list[str] | None:
        """Enter the recovery phase once; the saga's undo log, or None if not ours to run."""
        error, event = self._masked([error, event])
        res = self._recover(
            keys=[self.run_key(run_id), self.events_key(run_id), self.comp_key(run_id)],
            args=[dumps(error), dumps(event)],
        )
        return None if res is None else list(res)

    def foreach_start(self, run_id: str, key: str, items: list[Any], started: int) -> None:
        """Store each item under its own field (children read only theirs) and the counters."""
        items = self._masked(items)
        rk = self.run_key(run_id)
        pipe = self.r.pipeline(transaction=False)
        chunk: dict[FieldT, EncodableT] = {}
        for i, item in enumerate(items):
            chunk[f"i:{key}[{i}]"] = dumps(item)
            if len(chunk) >= 1000:
                pipe.hset(rk, mapping=chunk)
                chunk = {}
        chunk.update({f"n:{key}": len(items), f"fc:{key}": started})
        pipe.hset(rk, mapping=chunk)
        pipe.execute()

    def foreach_arrive(self, run_id: str, key: str, index: int) -> tuple[bool, int | None]:
        """Count an item's end: (this caller completes the forEach, next index to start)."""
        fired, nxt = self._arrive(
            keys=[self.fanin_key(run_id, key), self.run_key(run_id)],
            args=[index, key, self.settings.retention_s],
        )
        return bool(fired), (None if int(nxt) < 0 else int(nxt))

    # -- durable waits ----------------------------------------------------------------------

    def park(
        self,
        run_id: str,
        key: str,
        record: dict[str, Any],
        wait: dict[str, Any],
        event: dict[str, Any],
        wake: StepAddress | None,
    ) -> tuple[str, Any]:
        """Park a waiting step (see ``lua/park.lua``); a deadline wakes ``wake``, if given."""
        record, wait, event = self._masked([record, wait, event])
        signal = wait.get("signal") or ""
        keys = [
            self.run_key(run_id),
            self.events_key(run_id),
            self.signal_key(run_id, signal or "-"),
        ]
        res = self._park(keys=keys, args=[key, dumps(record), dumps(wait), dumps(event), signal])
        if res[0] == "parked" and wake is not None and wait.get("deadline"):
            self.add_timer(wake, wait["deadline"])
        return res[0], (json.loads(res[1]) if len(res) > 1 else None)

    def unpark(self, run_id: str, key: str) -> bool:
        return bool(self._unpark(keys=[self.run_key(run_id)], args=[key]))

    def signal(self, run_id: str, name: str, payload: Any, event: dict[str, Any]) -> list:
        name, payload, event = self._masked([name, payload, event])
        keys = [self.run_key(run_id), self.events_key(run_id), self.signal_key(run_id, name)]
        return list(
            self._signal(
                keys=keys, args=[name, dumps(payload), dumps(event), self.settings.retention_s]
            )
        )

    def decide(
        self, run_id: str, key: str, by: str, decision: dict[str, Any], event: dict[str, Any]
    ) -> list:
        by, decision, event = self._masked([by, decision, event])
        keys = [self.run_key(run_id), self.events_key(run_id)]
        return list(self._decide(keys=keys, args=[key, by, dumps(decision), dumps(event)]))

    def add_timer(self, address: StepAddress, due: float) -> None:
        """Wake the step at ``address`` at ``due`` (its entry: the address as a JSON list)."""
        self.r.zadd(f"{self.p}timers", {dumps(self._masked(address)): due})

    def due_timers(self, now: float, limit: int = 500) -> list[StepAddress]:
        """Timers that are due, each claimed by this caller alone (ZREM wins once)."""
        members = cast(
            list[str], self.r.zrangebyscore(f"{self.p}timers", "-inf", now, start=0, num=limit)
        )
        if not members:
            return []
        pipe = self.r.pipeline(transaction=False)
        for m in members:
            pipe.zrem(f"{self.p}timers", m)
        return [
            StepAddress.from_entry(json.loads(m))
            for m, won in zip(members, pipe.execute(), strict=True)
            if won
        ]

    def add_watcher(self, target: str, address: StepAddress) -> None:
        """Wake the step at ``address`` when run ``target`` ends."""
        entry = self._masked(address)
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.watchers_key(target), dumps(entry))
        pipe.expire(self.watchers_key(target), self.settings.retention_s)
        pipe.execute()

    def end_listeners(self, run_id: str) -> tuple[dict[str, Any] | None, list[StepAddress]]:
        """Who must hear that a run ended: its parent (subflow) and watching steps."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.run_key(run_id), "parent")
        pipe.lrange(self.watchers_key(run_id), 0, -1)
        parent, watchers = pipe.execute()
        steps = [StepAddress.from_entry(json.loads(w)) for w in watchers]
        return (json.loads(parent) if parent else None), steps

    # -- reading and writing a run's fields ---------------------------------------------

    def set_fields(self, run_id: str, fields: dict[str, Any]) -> None:
        fields = self._masked(fields)
        self.r.hset(
            self.run_key(run_id),
            mapping={
                k: v if isinstance(v, str | int | float) else dumps(v) for k, v in fields.items()
            },
        )

    def read_fields(self, run_id: str, fields: list[str]) -> list[str | None]:
        if not fields:
            return []
        if len(fields) <= 5000:
            return cast(list[str | None], self.r.hmget(self.run_key(run_id), fields))
        out: list[str | None] = []
        for i in range(0, len(fields), 5000):
            out += cast(list[str | None], self.r.hmget(self.run_key(run_id), fields[i : i + 5000]))
        return out

    def step_records(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Every step record of a run, by key (scans the hash; for cancel and retry)."""
        out = {}
        for k, v in self.r.hscan_iter(self.run_key(run_id), match="s:*", count=1000):
            out[k[2:]] = json.loads(v)
        return out

    def delete_fields(self, run_id: str, fields: list[str]) -> None:
        for i in range(0, len(fields), 1000):
            self.r.hdel(self.run_key(run_id), *fields[i : i + 1000])

    def run_hash(self, run_id: str) -> dict[str, str]:
        return cast(Hash, self.r.hgetall(self.run_key(run_id)))

    def events(
        self, run_id: str, after: str = "-", count: int | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """The run's event log from ``after`` (exclusive if it is an id) onwards."""
        start = "-" if after == "-" else f"({after}"
        entries = cast(Entries, self.r.xrange(self.events_key(run_id), min=start, count=count))
        return [(eid, json.loads(fields["e"])) for eid, fields in entries]

    def run_ids(
        self, flow: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[str]:
        """Run ids, newest first, filtered by flow and status (checked against the run)."""
        if status in ENDED:
            index = f"{self.p}runs:status:{status}"
        elif status in ACTIVE:
            index = f"{self.p}runs:active"
        elif flow:
            index = f"{self.p}runs:flow:{flow}"
        else:
            index = f"{self.p}runs"
        out: list[str] = []
        start = 0
        batch = max(limit * 2, 50)
        while len(out) < limit:
            ids = cast(list[str], self.r.zrevrange(index, start, start + batch - 1))
            if not ids:
                break
            start += batch
            pipe = self.r.pipeline(transaction=False)
            for rid in ids:
                pipe.hmget(self.run_key(rid), ["flow", "status"])
            stale = []
            for rid, (f, s) in zip(ids, pipe.execute(), strict=True):
                if s is None:
                    stale.append(rid)
                elif (flow is None or f == flow) and (status is None or s == status):
                    out.append(rid)
                    if len(out) >= limit:
                        break
            if stale:
                self.r.zrem(index, *stale)
        return out


class _NoOutput:
    def __repr__(self) -> str:
        return "NO_OUTPUT"


#: Marks a record written without an output field (a step that has none yet).
NO_OUTPUT: Any = _NoOutput()
