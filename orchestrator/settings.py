"""All configuration, read once from ``ORCHESTRATOR_*`` environment variables.

No other module reads ``os.environ`` (except :mod:`.variables`, which resolves
``${env.NAME}`` in Variables on the worker): they take a :class:`Settings` (or call
:func:`get_settings`), so tests and embedded stacks can pass their own.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: ``ORCHESTRATOR_REDIS_URL=redis+cluster://host:port`` makes the state store a Redis
#: Cluster client (any node as the seed); ``rediss+cluster://`` for TLS.
CLUSTER_SCHEME = "redis+cluster"
CLUSTER_SCHEME_TLS = "rediss+cluster"


class Settings(BaseSettings):
    """Process configuration; every field maps to ``ORCHESTRATOR_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Celery broker; empty means "the same Redis as the state store".
    broker_url: str = ""
    #: Celery result backend (chords need one); empty means the state Redis.
    result_backend: str = ""
    key_prefix: str = "orch:"
    #: Prefix for Celery's own keys in Redis (queues, unacked messages, results: kombu's
    #: ``global_keyprefix``); empty leaves them unprefixed. Set it to share one Redis DB
    #: between deployments that must not see each other's messages (the demo does).
    celery_key_prefix: str = ""
    #: The master the sentinels watch, for ``sentinel://`` URLs (state store, broker and
    #: result backend alike; see :mod:`.redisconn`).
    sentinel_master: str = "mymaster"
    #: Password of the sentinels themselves, when they require one (the master's goes in
    #: the URL). Secret: never shown in a repr or a log.
    sentinel_password: SecretStr = SecretStr("")
    #: Comma-separated modules the worker imports so their Celery tasks are registered.
    task_modules: str = ""
    #: How long finished runs (and their event logs) are kept, in seconds.
    retention_s: int = Field(default=7 * 24 * 3600, ge=60)
    #: Redis broker: an unacknowledged message is delivered again after this long.
    #: Every step's hard time limit and retry countdown must stay below it, or a
    #: step still running would be started a second time (see README "Delivery").
    #: With heartbeats on it is only the last resort (README "Crash recovery").
    visibility_timeout_s: int = Field(default=3600, ge=1)
    #: How often a worker heartbeats the messages it holds and the steps it runs
    #: (seconds); 0 turns heartbeats off, leaving recovery to the visibility timeout.
    heartbeat_s: float = Field(default=5.0, ge=0)
    #: A message nobody heartbeated for this long belongs to a dead worker and goes
    #: back to its queue; a step's lease lasts this long past its last heartbeat.
    lease_s: float = Field(default=15.0, gt=0)
    #: SIGTERM lets running steps finish for at most this long, then stops them and
    #: gives their messages back to the queue (0: wait for them, however long).
    shutdown_timeout_s: float = Field(default=25.0, ge=0)
    #: Timeout for a step that names none (soft limit, seconds).
    default_step_timeout_s: float = Field(default=1800.0, gt=0)
    #: Longest chain of steps sent as one Celery message; a longer sequence is cut
    #: and its last step enqueues the next segment (keeps messages O(1) in size).
    chain_segment: int = Field(default=32, ge=2)
    #: A parallel step with at most this many leaf tasks compiles to a native chord;
    #: wider ones fan in through a Redis counter.
    native_chord_max: int = Field(default=64, ge=0)
    #: forEach publishes its children in pipelined batches of this size.
    dispatch_batch: int = Field(default=500, ge=1)
    default_queue: str = "default"
    #: How often Celery beat sends the tick that wakes due timers and fires schedules.
    tick_s: float = Field(default=1.0, gt=0)
    worker_prefetch_multiplier: int = Field(default=1, ge=1)
    #: A file that a worker (while it consumes) and beat (while it loops) touch every
    #: few seconds, for ``orchestrator health`` probes; empty: none.
    liveness_file: str = ""
    #: Comma-separated bearer tokens the REST API accepts (``orchestrator api``); empty
    #: means no token is valid, so only a dev server on loopback answers without one.
    api_tokens: str = ""
    #: ``user:password[,user2:password2]`` that ``orchestrator flower`` accepts (HTTP
    #: basic auth); empty: it refuses to start. Secret: never shown in a repr or a log.
    flower_basic_auth: SecretStr = SecretStr("")
    #: Workers send Celery task events, which Flower shows (about 2.4 more Redis
    #: PUBLISH per step); off, Flower turns them on itself only in workers that run
    #: with heartbeats or gossip.
    task_events: bool = True
    #: Events kept per channel stream (and per dead-letter stream), approximately.
    channel_maxlen: int = Field(default=100_000, ge=100)

    # -- limits: beyond each, a clear 4xx or a failed step naming the limit -----------
    #: Largest trigger inputs (their JSON encoding, bytes), for runs and subflow runs.
    max_input_bytes: int = Field(default=1_048_576, ge=1024)
    #: Largest output of one step (its JSON encoding, bytes): a bigger one fails the step.
    max_output_bytes: int = Field(default=1_048_576, ge=1024)
    #: Deepest nesting of lists and objects in inputs, outputs and signal payloads.
    max_nesting: int = Field(default=64, ge=2, le=500)
    #: Largest HTTP request body the API reads (checked while reading, before a webhook's
    #: signature is checked).
    max_request_bytes: int = Field(default=2_097_152, ge=1024)
    #: Largest definition file or document (bytes) that validate and deploy accept.
    max_definition_bytes: int = Field(default=262_144, ge=1024)
    #: Most items one forEach may fan out over.
    max_foreach_items: int = Field(default=100_000, ge=1)
    #: Deepest chain of subflow runs (a run's child's child ...); deeper fails the step.
    max_subflow_depth: int = Field(default=32, ge=1)
    #: Deliveries of one step attempt whose worker died (SIGKILL, exit, hard time limit
    #: without a retry) before the step fails with "its worker died N times".
    max_deliveries: int = Field(default=3, ge=1)
    #: Work one expression evaluation may do (about one unit per character or item built,
    #: copied or compared): the cost of one expression, with its CPU time below.
    expression_max_work: int = Field(default=10_000_000, ge=10_000)
    expression_max_seconds: float = Field(default=1.0, gt=0)
    #: A step still ``running`` this long past its hard time limit, with no live lease,
    #: is settled by the reaper (failed, or retried under its policy).
    reaper_margin_s: float = Field(default=60.0, gt=0)
    #: How often the sweep (``orchestrator/sweep.py``) looks over active runs, at most.
    sweep_s: float = Field(default=10.0, gt=0)
    #: A run still ``pending`` this long (its first step's queue has no consumer) gets a
    #: ``run.unconsumed`` event and a status reason; 0: never.
    pending_warn_s: float = Field(default=300.0, ge=0)
    #: What a process does when Redis would evict keys (``maxmemory-policy`` other than
    #: ``noeviction``): ``warn`` (log at start), ``refuse`` (exit), or ``ignore``.
    redis_eviction: str = Field(default="warn", pattern="^(warn|refuse|ignore)$")

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if self.redis_cluster:
            # Celery's Redis transport and result backend cannot use a Cluster.
            missing = [n for n in ("broker_url", "result_backend") if not getattr(self, n)]
            if missing:
                raise ValueError(
                    f"redis_url is a Redis Cluster ({CLUSTER_SCHEME}://...): set "
                    f"ORCHESTRATOR_{missing[0].upper()} to a plain Redis (or amqp:// for "
                    "the broker); Celery cannot use a Cluster"
                )
            return self
        if not self.broker_url:
            self.broker_url = self.redis_url
        if not self.result_backend:
            self.result_backend = self.redis_url
        return self

    @property
    def redis_cluster(self) -> bool:
        """Whether the state store is a Redis Cluster (``redis+cluster://host:port``)."""
        return self.redis_url.startswith((f"{CLUSTER_SCHEME}://", f"{CLUSTER_SCHEME_TLS}://"))

    @model_validator(mode="after")
    def _check_recovery(self) -> Settings:
        # A live worker's heartbeat must always come before its lease ends, and the
        # broker's own redelivery must never come before the lease (README "Crash recovery").
        if self.heartbeat_s > 0:
            if self.lease_s < 2 * self.heartbeat_s:
                raise ValueError(
                    f"lease_s ({self.lease_s:g}) must be at least twice heartbeat_s "
                    f"({self.heartbeat_s:g})"
                )
            if self.visibility_timeout_s < self.lease_s:
                raise ValueError(
                    f"visibility_timeout_s ({self.visibility_timeout_s}) must be at least "
                    f"lease_s ({self.lease_s:g})"
                )
        return self

    @property
    def task_module_list(self) -> list[str]:
        return [m.strip() for m in self.task_modules.split(",") if m.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
