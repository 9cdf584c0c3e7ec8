"""Routes for operators: liveness (``/healthz``, no token) and Prometheus ``/metrics``."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

from ..client import Client
from ..metrics import metrics_registry
from .responses import JSONBody, unavailable


def add_routes(router: APIRouter, client: Client, token: list[Any]) -> None:
    """Add ``/healthz`` and ``/metrics`` (behind ``token``) to ``router`` (the app's own)."""

    @router.get("/healthz", tags=["health"])
    def healthz() -> JSONBody:
        """Liveness: pings Redis; 503 when it cannot be reached."""
        try:
            client.store.ping()
        except redis.RedisError as exc:
            return unavailable(f"cannot reach Redis: {exc}", status="down")
        return JSONBody({"status": "ok", "redis": "ok"})

    registry = metrics_registry(client)

    @router.get("/metrics", tags=["health"], dependencies=token)
    def metrics(request: Request) -> Response:
        """Prometheus metrics of every worker and run, read from Redis (see metrics.py)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)
