"""A real local Redis Cluster for tests: three masters (no replicas), free ports, temp dirs."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import redis
from redis.cluster import RedisCluster as ClusterClient

from tests.support import REDIS_SERVER_BIN, RedisServer, wait_for

REDIS_CLI_BIN = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisCluster:
    """Three ``redis-server --cluster-enabled yes`` nodes joined with ``redis-cli --cluster``."""

    def __init__(self, nodes: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="orch-cluster-"))
        self.servers: list[RedisServer] = []
        self.count = nodes

    @property
    def url(self) -> str:
        """A seed node's URL (``RedisCluster.from_url`` discovers the others)."""
        return self.servers[0].url

    def start(self) -> RedisCluster:
        for i in range(self.count):
            node_dir = self.dir / f"node{i}"
            node_dir.mkdir()
            server = RedisServer(
                data_dir=node_dir,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            server.start()
            self.servers.append(server)
        addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            [REDIS_CLI_BIN, "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ready() -> bool:
            for s in self.servers:
                info = s.client(decode_responses=True).cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
            return True

        wait_for(ready, timeout=30, message="cluster_state:ok on every node")
        return self

    def client(self) -> ClusterClient:
        return ClusterClient.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        for s in self.servers:
            with contextlib.suppress(redis.RedisError):
                s.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["REDIS_SERVER_BIN", "RedisCluster"]
