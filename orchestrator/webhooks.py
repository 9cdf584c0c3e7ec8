"""Webhook signatures: HMAC-SHA256 over the timestamp and the raw body.

A sender signs each request to ``POST /v1/hooks/{flow}`` with the flow's webhook secret
(a secret ``Variable`` named by the flow's ``spec.webhook.secret``) and sends::

    X-Signature: t=<unix seconds>,sha256=<hex of HMAC-SHA256(secret, "<t>." + body)>

The server recomputes it over the bytes it received and refuses the request when the
header is missing or malformed, the digest differs, or ``t`` is more than five minutes
away from its clock (a captured request cannot be replayed later). Within those five
minutes the same signed request triggers once: its signature is the run's idempotency
key. :func:`sign` builds the header, for senders written in Python and for tests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

#: How far a signature's timestamp may be from the server's clock, in seconds.
TOLERANCE_S = 300
_HEADER = re.compile(r"^\s*t=(\d{1,12})\s*,\s*sha256=([0-9a-fA-F]{64})\s*$")


class SignatureError(Exception):
    """The request's signature is missing, malformed, wrong or too old."""


def sign(secret: str, body: bytes, timestamp: float | None = None) -> str:
    """The ``X-Signature`` header value for ``body``."""
    t = int(time.time() if timestamp is None else timestamp)
    return f"t={t},sha256={_digest(secret, t, body)}"


def verify(header: str | None, body: bytes, secret: str, now: float | None = None) -> str:
    """Check a signature; returns its digest (unique per request) or raises SignatureError."""
    if not header:
        raise SignatureError("missing X-Signature header (t=<unix time>,sha256=<hex digest>)")
    m = _HEADER.match(header)
    if not m:
        raise SignatureError("malformed X-Signature header: expected t=<unix time>,sha256=<hex>")
    t, given = int(m.group(1)), m.group(2).lower()
    now = time.time() if now is None else now
    if abs(now - t) > TOLERANCE_S:
        raise SignatureError(
            f"signature timestamp is {abs(now - t):.0f}s away from the server's clock "
            f"(more than {TOLERANCE_S}s): refused as a replay"
        )
    if not hmac.compare_digest(given, _digest(secret, t, body)):
        raise SignatureError("signature does not match the body")
    return given


def _digest(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
