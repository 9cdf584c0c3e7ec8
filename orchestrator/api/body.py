"""What a request may carry: the size limits (an ASGI middleware) and the JSON body parser.

* A body over ``max_request_bytes`` is refused while it is read (:class:`BodyLimit`): a
  ``Content-Length`` over the limit at once, a chunked body once it passes the limit;
  413, and the connection is closed so the rest is never read.
* A JSON body is parsed by :func:`parse_json_body`: UTF-8 only, no lone surrogates, each
  member nested at most ``max_nesting`` deep (a body nested 100,000 deep is a 422, not a
  ``RecursionError``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import LimitExceeded
from ..limits import check_value
from ..settings import Settings
from ..status import ACTIVE, ENDED
from .responses import error_body

#: The run statuses a ``status`` query may name.
STATUSES = (*ACTIVE, *ENDED)
#: A Redis stream entry id (``<ms>`` or ``<ms>-<seq>``, each below 2**64); Redis rejects others.
STREAM_ID = r"^[0-9]{1,19}(-[0-9]{1,19})?$"
#: Largest request line plus headers (bytes); beyond it the server answers 431.
MAX_HEADER_BYTES = 16 * 1024


class Refused(StarletteHTTPException):
    """A request refused before its handler ran (body too big, not JSON, too deep).

    An HTTPException, so FastAPI's body reading passes it on instead of turning it into
    its generic 400; the handler writes ``error``, ``message`` and ``extra`` as the body.
    """

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.error, self.extra = error, extra


class BodyLimit:
    """ASGI middleware: no request body over ``max_bytes`` is read, no headers over
    :data:`MAX_HEADER_BYTES` are served (431; headers that reach the server in one piece
    pass h11's own limit, which only bounds a request still incomplete).

    A ``Content-Length`` over the limit is answered 413 before the app runs (the body is
    never read); a body without one (chunked) is counted as it streams in and refused
    the moment it passes the limit. Either way the 413 closes the connection, so the
    rest of the body is not read either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self) -> Refused:
        return Refused(
            413,
            "limit_exceeded",
            f"request body is over the limit of {self.max_bytes:,} bytes "
            "(limit: ORCHESTRATOR_MAX_REQUEST_BYTES)",
            headers={"Connection": "close"},
            field="body",
            limit="max_request_bytes",
        )

    async def _send_refusal(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = self._refusal()
        response = error_body(exc.status_code, exc.error, exc.detail, exc.headers, **exc.extra)
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(k) + len(v) + 4 for k, v in headers)
        if size > MAX_HEADER_BYTES:
            response = error_body(
                431,
                "headers_too_large",
                f"the request line and headers are over {MAX_HEADER_BYTES:,} bytes",
                {"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        length = Headers(raw=headers).get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await self._send_refusal(scope, receive, send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._refusal()
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, sending)
        except Refused as exc:  # read by something that does not answer it (not FastAPI)
            if started or exc.status_code != 413:
                raise
            await self._send_refusal(scope, receive, send)


def parse_json_body(body: bytes, settings: Settings) -> Any:
    """A request body as JSON: UTF-8 only, each member nested at most ``max_nesting``.

    Raises :class:`Refused` (400 not UTF-8; 422 too deep or a lone surrogate, naming the
    place) or ``json.JSONDecodeError`` (not JSON).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(
            400, "invalid_json", f"request body is not UTF-8 (byte {exc.start})", field="body"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise Refused(
            400, "invalid_json", f"request body is not valid JSON: {exc}", field="body"
        ) from None
    except RecursionError:
        raise Refused(
            422,
            "limit_exceeded",
            f"request body is nested more than {settings.max_nesting} levels deep "
            "(limit: ORCHESTRATOR_MAX_NESTING)",
            field="body",
            limit="max_nesting",
        ) from None
    # An object body's members are the values (inputs, data, ...): each gets the limit.
    members = value.items() if isinstance(value, dict) else [(None, value)]
    try:
        for key, member in members:
            field = "body" if key is None else f"body.{key}"
            if key is not None and not _encodable(key):
                raise LimitExceeded(f"{field} (a key)", "holds a lone surrogate")
            check_value(
                member,
                field,
                max_bytes=settings.max_request_bytes,
                max_nesting=settings.max_nesting,
                size_limit="max_request_bytes",
            )
    except LimitExceeded as exc:
        raise Refused(
            422, "limit_exceeded", f"{exc.field} {exc.reason}", field=exc.field, limit=exc.limit
        ) from None
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class JSONRequest(Request):
    """A request whose ``json()`` is :func:`parse_json_body` under the app's settings."""

    settings: Settings

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body(), self.settings)
        return self._json
