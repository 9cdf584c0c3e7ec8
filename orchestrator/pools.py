"""The worker-pools file (``workers/pools.yaml``) as one model with one loader.

``orchestrator worker --pool``, ``orchestrator dev`` and the metrics exporter read it here;
each turns :class:`PoolsFileError` into its own kind of report (a CLI error, a warning).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from .errors import PoolsFileError

DEFAULT_POOLS_FILE = "workers/pools.yaml"
POOL_TYPES = ("prefork", "threads", "gevent", "eventlet", "solo")


class PoolsFile(BaseModel):
    """A parsed pools file: ``pools`` is its ``pools:`` mapping as written, or None when
    the file has no such mapping; each pool's fields are checked when asked for."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    pools: dict[Any, Any] | None = None

    def names(self) -> list[str]:
        """Every pool's name; a file without pools is an error."""
        if not self.pools:
            raise PoolsFileError(f"{self.path} defines no pools (pools: NAME: {{...}})")
        return [str(name) for name in self.pools]

    def worker_args(self, name: str) -> list[str]:
        """Celery worker options (-Q, -c, -P) for pool ``name``, its fields checked."""
        path, pools = self.path, self.pools
        if pools is None or name not in pools:
            known = ", ".join(pools) if pools else "none"
            raise PoolsFileError(f"{path} defines no pool {name!r} (pools: {known})")
        spec = pools[name] or {}
        args: list[str] = []
        queues = spec.get("queues")
        if queues:
            if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
                raise PoolsFileError(f"{path}: pools.{name}.queues must be a list of queue names")
            args += ["-Q", ",".join(queues)]
        if spec.get("concurrency") is not None:
            if not isinstance(spec["concurrency"], int) or spec["concurrency"] < 1:
                raise PoolsFileError(f"{path}: pools.{name}.concurrency must be a positive integer")
            args += ["-c", str(spec["concurrency"])]
        if spec.get("pool") is not None:
            if spec["pool"] not in POOL_TYPES:
                raise PoolsFileError(
                    f"{path}: pools.{name}.pool must be prefork, threads, gevent, eventlet or solo"
                )
            args += ["-P", spec["pool"]]
        return args

    def queues(self) -> set[str]:
        """Queue names of every pool, skipping whatever is malformed."""
        out: set[str] = set()
        for spec in (self.pools or {}).values():
            queues = spec.get("queues") if isinstance(spec, dict) else None
            if isinstance(queues, list):
                out |= {q for q in queues if isinstance(q, str) and q}
        return out


def load_pools(pools_file: str | os.PathLike[str]) -> PoolsFile:
    """Read a pools file. A missing file or invalid YAML raises :class:`PoolsFileError`
    (the YAML error is its ``__cause__``); an unreadable file raises OSError."""
    path = Path(pools_file)
    if not path.is_file():
        raise PoolsFileError(
            f"no pools file at {path} (it defines pools: NAME: {{queues, concurrency, pool}})"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PoolsFileError(f"{path} is not valid YAML: {exc}") from exc
    pools = data.get("pools") if isinstance(data, dict) else None
    return PoolsFile(path=path, pools=pools if isinstance(pools, dict) else None)


__all__ = ["DEFAULT_POOLS_FILE", "POOL_TYPES", "PoolsFile", "load_pools"]
