"""Serving the API with uvicorn: headers bounded, and malformed HTTP answered in JSON."""

from __future__ import annotations

import http
import json

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .body import MAX_HEADER_BYTES


class H11JSONErrors(H11Protocol):
    """uvicorn's h11 protocol, answering a request it cannot parse with a JSON body:
    431 when the request line and headers pass ``h11_max_incomplete_event_size``, else
    400 (uvicorn's own answer is plain text)."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or MAX_HEADER_BYTES
        if len(self.conn.trailing_data[0]) > limit:
            status, error = 431, "headers_too_large"
            message = f"the request line and headers are over {limit:,} bytes"
        else:
            status, error, message = 400, "bad_request", f"{msg} (malformed HTTP)"
        body = json.dumps({"error": error, "message": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        reason = http.HTTPStatus(status).phrase.encode()
        for event in (
            h11.Response(status_code=status, headers=headers, reason=reason),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn (h11, headers up to :data:`MAX_HEADER_BYTES`)."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=H11JSONErrors,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
