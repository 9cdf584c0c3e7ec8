"""The example ``pricing`` HTTP service that ``flows/order-pricing.yaml`` calls.

A stand-in for a team's microservice (stdlib only, a thread): ``POST /quote`` with
``{"sku", "quantity"}`` answers ``{"unit_price", "total", "currency"}``, and
``GET /stock/<sku>`` answers ``{"sku", "available"}``. Both want
``Authorization: Bearer <token>`` (401 otherwise). The demo starts one on a free port;
``python -m workers.pricing --port 8085 --token T`` runs one by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PRICES = {"widget": 4.5, "gadget": 19.99, "gizmo": 120.0}


def _price(sku: str) -> float:
    if sku in PRICES:
        return PRICES[sku]
    return round(1 + int(hashlib.sha256(sku.encode()).hexdigest()[:6], 16) % 5000 / 100, 2)


class PricingService:
    """The service on ``127.0.0.1:<port>`` (0: a free port); ``url`` once started."""

    def __init__(self, token: str, port: int = 0, host: str = "127.0.0.1"):
        self.token = token
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {service.token}":
                    return True
                self._answer(401, {"error": "missing or wrong bearer token"})
                return False

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                if not self._authorized():
                    return
                if self.path != "/quote":
                    return self._answer(404, {"error": "no such path"})
                try:
                    req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    unit, qty = _price(str(req["sku"])), int(req["quantity"])
                except (KeyError, TypeError, ValueError) as exc:
                    return self._answer(400, {"error": f"bad request: {exc}"})
                self._answer(
                    200, {"unit_price": unit, "total": round(unit * qty, 2), "currency": "EUR"}
                )

            def do_GET(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                if not self.path.startswith("/stock/"):
                    return self._answer(404, {"error": "no such path"})
                sku = self.path.removeprefix("/stock/")
                self._answer(200, {"sku": sku, "available": 0 if sku == "gizmo" else 250})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> PricingService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8085)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    svc = PricingService(args.token, args.port)
    print(f"pricing service on {svc.url}")
    svc.httpd.serve_forever()
