"""The webhook route: a signed POST triggers a flow, no bearer token (see webhooks.py)."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool

from ..client import Client
from ..errors import ExpressionError
from ..runtime import trigger_flow
from ..settings import Settings
from ..variables import resolve
from ..webhooks import MISMATCH, SignatureError
from ..webhooks import parse as parse_signature
from .body import parse_json_body
from .responses import OBJ, JSONBody, error_body, read_run, run_json

log = logging.getLogger(__package__)


def add_routes(router: APIRouter, client: Client, settings: Settings) -> None:
    """Add ``POST /v1/hooks/{flow}`` to ``router`` (the app's own: no token)."""
    hooks = _Hooks(client, settings)

    @router.post("/v1/hooks/{flow}", status_code=201, tags=["webhooks"], response_model=OBJ)
    async def webhook(
        flow: str,
        request: Request,
        x_signature: str | None = Header(None, alias="X-Signature"),
    ) -> JSONBody:
        """Trigger ``flow`` with the JSON body as its inputs; authenticated by signature.

        ``X-Signature: t=<unix time>,sha256=<HMAC-SHA256(secret, "<t>." + body)>`` with
        the flow's ``spec.webhook.secret``; no bearer token (senders rarely can add one).
        The same signed request within five minutes returns the same run (200). A flow
        that is not deployed or has no webhook is refused like a wrong signature (401).
        """
        body = await request.body()  # at most max_request_bytes: BodyLimit
        return await run_in_threadpool(hooks.trigger, flow, body, x_signature)


class _Hooks:
    """Verify a webhook request and trigger its flow (in the request thread pool)."""

    def __init__(self, client: Client, settings: Settings):
        self.client, self.settings = client, settings

    def secret(self, flow: str) -> str | None:
        """The flow's webhook secret, or None: not deployed, no webhook, secret missing.

        The same Redis reads whatever the answer (the flow, then a Variable), so the
        time taken does not tell a deployed flow from an unknown name.
        """
        client = self.client
        info = client.store.flow_info(flow)
        hook = client.plan(flow, info["version"]).resource.spec.webhook if info else None
        name = hook.secret if hook is not None else f"{flow}\0no-webhook"
        var = client.store.resource("Variable", name)
        if hook is None:
            return None
        if var is None:
            log.warning("webhook of %r: its secret variable %r is not deployed", flow, name)
            return None
        try:
            return str(resolve(name, var))
        except ExpressionError as exc:
            log.warning("webhook of %r cannot be verified here: %s", flow, exc)
            return None

    def trigger(self, flow: str, body: bytes, header: str | None) -> JSONBody:
        def refuse(message: str) -> JSONBody:
            return error_body(401, "invalid_signature", message, field="header.X-Signature")

        try:
            sig = parse_signature(header)  # depends on the header only, not on the flow
        except SignatureError as exc:
            return refuse(str(exc))
        secret = self.secret(flow)
        # Without a secret the HMAC is computed all the same (with a stand-in), and the
        # refusal is a wrong signature's: nothing tells an unknown flow from a known one.
        matched = sig.matches(body, secret if secret is not None else sig.digest)
        if secret is None or not matched:
            return refuse(MISMATCH)
        try:
            inputs = parse_json_body(body, self.settings) if body.strip() else {}
        except json.JSONDecodeError as exc:
            return error_body(400, "invalid_json", f"request body is not valid JSON: {exc}")
        if not isinstance(inputs, dict):
            return error_body(
                422, "invalid_request", "the body must be a JSON object of inputs", field="body"
            )
        client = self.client
        run_id, created, _, _ = trigger_flow(
            client.store, client.app, client.plan, flow, inputs, f"hook:{sig.digest}"
        )
        run, notes = read_run(client, run_id)
        return JSONBody(run_json(run, self.settings.max_nesting, notes), 201 if created else 200)
