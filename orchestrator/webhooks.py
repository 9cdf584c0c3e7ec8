"""Webhook signatures: HMAC-SHA256 over the timestamp and the raw body.

A sender signs each request to ``POST /v1/hooks/{flow}`` with the flow's webhook secret
(a secret ``Variable`` named by the flow's ``spec.webhook.secret``) and sends::

    X-Signature: t=<unix seconds>,sha256=<hex of HMAC-SHA256(secret, "<t>." + body)>

The server recomputes it over the bytes it received and refuses the request when the
header is missing or malformed, the digest differs, or ``t`` is more than five minutes
away from its clock (a captured request cannot be replayed later). Within those five
minutes the same signed request triggers once: its signature is the run's idempotency
key. :func:`sign` builds the header, for senders written in Python and for tests;
:func:`parse` and :meth:`Signature.matches` are :func:`verify` in two halves, for a
server that must do the same work whether or not the flow has a webhook.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from .errors import SignatureError

#: How far a signature's timestamp may be from the server's clock, in seconds.
TOLERANCE_S = 300
_HEADER = re.compile(r"^\s*t=(\d{1,12})\s*,\s*sha256=([0-9a-fA-F]{64})\s*$")


def sign(secret: str, body: bytes, timestamp: float | None = None) -> str:
    """The ``X-Signature`` header value for ``body``."""
    t = int(time.time() if timestamp is None else timestamp)
    return f"t={t},sha256={_digest(secret, t, body)}"


#: The refusal of a well-formed signature that is not the body's; a webhook of an unknown
#: flow, or of a flow without a webhook, is refused with it too (no flow names leak).
MISMATCH = "signature does not match the body"


@dataclass(frozen=True)
class Signature:
    """A well-formed, recent ``X-Signature``: its timestamp and the digest it claims."""

    t: int
    digest: str

    def matches(self, body: bytes, secret: str) -> bool:
        """Whether the digest is ``body``'s under ``secret`` (constant time)."""
        return hmac.compare_digest(self.digest, _digest(secret, self.t, body))


def parse(header: str | None, now: float | None = None) -> Signature:
    """The header's signature, or SignatureError when it is missing, malformed or too old.

    Nothing here depends on the flow or its secret, so the answer says nothing about them.
    """
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
    return Signature(t, given)


def verify(header: str | None, body: bytes, secret: str, now: float | None = None) -> str:
    """Check a signature; returns its digest (unique per request) or raises SignatureError."""
    sig = parse(header, now)
    if not sig.matches(body, secret):
        raise SignatureError(MISMATCH)
    return sig.digest


def _digest(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
