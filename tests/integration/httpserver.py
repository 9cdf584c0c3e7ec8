"""A real local HTTP server for http and service steps (a thread, a free port).

Routes (every request is recorded in ``server.requests`` as (method, path, headers, body)):

* ``/json``            200 ``{"ok": true, "method": ..., "query": {...}, "body": <json>}``
* ``/flaky/<key>/<n>`` 503 for the first ``n`` requests of ``key``, then 200 ``{"tries": k}``
* ``/status/<code>``   answers that status with a short text body
* ``/slow/<seconds>``  sleeps, then 200
* ``/auth``            200 ``{"authorized": true}`` when ``Authorization: Bearer <token>``
                       matches ``server.token``, else 401
* ``/quote``           a service: ``{"amount": n, "currency": c}`` ->
                       ``{"total": n * 1.2, "currency": c}``; ``/quote-bad`` answers a
                       string ``total``
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlparse


class LocalHttpServer:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.tries: Counter[str] = Counter()
        self.token = ""
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode()
                url = urlparse(self.path)
                with server._lock:
                    server.requests.append((self.command, url.path, dict(self.headers), body))
                status, answer = server.route(
                    self.command, url.path, dict(parse_qsl(url.query)), body, self.headers
                )
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                ctype = "text/plain" if isinstance(answer, str) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def route(
        self, method: str, path: str, query: dict, body: Any, headers: Any
    ) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts[0] == "json":
            return 200, {"ok": True, "method": method, "query": query, "body": body}
        if parts[0] == "flaky":
            key, n = parts[1], int(parts[2])
            with self._lock:
                self.tries[key] += 1
                k = self.tries[key]
            return (503, "try again later") if k <= n else (200, {"tries": k})
        if parts[0] == "status":
            return int(parts[1]), f"status {parts[1]}"
        if parts[0] == "slow":
            time.sleep(float(parts[1]))
            return 200, {"slept": float(parts[1])}
        if parts[0] == "auth":
            ok = bool(self.token) and headers.get("Authorization") == f"Bearer {self.token}"
            return (200, {"authorized": True}) if ok else (401, "unauthorized")
        if parts[0] in ("quote", "quote-bad"):
            total = body["amount"] * 1.2
            if parts[0] == "quote-bad":
                return 200, {"total": "lots", "currency": body["currency"]}
            return 200, {"total": round(total, 2), "currency": body["currency"], "extra": 1}
        return 404, "no such route"

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for _, p, _, _ in self.requests if p == path)

    def start(self) -> LocalHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
