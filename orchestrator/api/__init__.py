"""The REST API (FastAPI): trigger and inspect runs, decide approvals, send signals.

``create_api(settings, client=None, dev=False)`` builds the app; ``orchestrator api``
serves it with :func:`serve` (uvicorn). Every endpoint but ``/healthz`` and the webhooks
(``/v1/hooks/{flow}``, authenticated by signature) needs ``Authorization: Bearer <token>``
with a token from ``ORCHESTRATOR_API_TOKENS``, the OpenAPI schema and its pages
(``/openapi.json``, ``/docs``, ``/redoc``) included; with ``dev=True`` a request that
reached the server on a loopback address needs none. The token is checked before the
request body is read.

Every error is a JSON body (``{"error": ..., "message": ..., "field": ...}``); bad input
is a 4xx, never a 5xx:

* A body over ``max_request_bytes`` is refused while it is read, 413 (:mod:`.body`).
* A JSON body is UTF-8 only, each member nested at most ``max_nesting`` deep: a body
  nested 100,000 deep is a 422, not a ``RecursionError`` (:mod:`.body`).
* Values over a limit (``LimitExceeded``) are 413 for a size, 422 otherwise, naming the
  field and the limit; an idempotency key reused with other inputs is 409.

Responses are written by the API's own renderer (:mod:`.responses`), so a stored value
that JSON cannot carry is a marker named in the run's ``notes``, not a 500.

The app and its error answers are in :mod:`.app`; the routes, one module per resource:
:mod:`.runs` (with approvals and signals), :mod:`.flows`, :mod:`.events`, :mod:`.hooks`
(webhooks) and :mod:`.health` (``/healthz``, ``/metrics``); uvicorn in :mod:`.server`.
"""

from __future__ import annotations

from .app import create_api, is_loopback, token_list
from .server import serve

__all__ = ["create_api", "is_loopback", "serve", "token_list"]
