"""The web dashboard: a static single-page app that the REST API serves at ``/ui``.

The page and its assets (``orchestrator/ui/``: HTML, JavaScript, CSS and a vendored
Mermaid, so nothing is fetched from a CDN) load without a token; everything the page
shows comes from the authenticated ``/v1`` API, called from the browser. When a call
answers 401 the page asks for a token once, keeps it in ``sessionStorage`` (gone when
the tab closes) and sends it as ``Authorization: Bearer``; in the API's loopback dev
mode no call answers 401, so it never asks.

Every response of ``/ui`` carries a Content-Security-Policy that allows scripts and
connections to this server only, and the page writes data with ``textContent``, never
as HTML: a step output or input holding markup shows as text.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = ["UI_DIR", "mount_dashboard"]

#: Where the page and its assets live (package data).
UI_DIR = Path(__file__).with_name("ui")

#: Scripts, data and images from this server only; inline styles are allowed because
#: Mermaid puts a <style> element inside each SVG it draws.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on every load (a 304 when unchanged), so an upgrade is seen at once.
    "Cache-Control": "no-cache",
}


class _UIFiles(StaticFiles):
    """The files of ``UI_DIR`` with the dashboard's security and caching headers."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_HEADERS)
        return response


def mount_dashboard(app: FastAPI, path: str = "/ui") -> None:
    """Serve the dashboard at ``path`` (``/ui/``; ``/ui`` redirects there).

    Assets are gzipped on the way out (the vendored Mermaid is 3.5 MB, about 1 MB
    compressed). Raises ``RuntimeError`` when ``UI_DIR`` is missing, which means the
    package was installed without its data files.
    """
    path = path.rstrip("/")

    @app.api_route(path, methods=["GET", "HEAD"], include_in_schema=False)
    def dashboard_root() -> RedirectResponse:
        # Relative, so the redirect stays right behind a proxy that adds a path prefix.
        return RedirectResponse(f"{path.rsplit('/', 1)[-1]}/", status_code=307)

    files = _UIFiles(directory=UI_DIR, html=True)
    app.mount(path, GZipMiddleware(files, minimum_size=1024), name="dashboard")
