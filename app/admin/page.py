"""The admin page: static HTML plus an inline script that calls `/api` with the token. It renders
untrusted data (payloads, URLs) with textContent only, under a nonce-based Content-Security-Policy."""

from __future__ import annotations

import secrets
from functools import cache
from importlib import resources

from aiohttp import web

from app import __version__
from app.admin.context import AdminContext


@cache
def _template() -> str:
    return resources.files("app").joinpath("templates/admin.html").read_text(encoding="utf-8")


class Page:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    async def page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        html = (
            _template()
            .replace("{{nonce}}", nonce)
            .replace("{{version}}", __version__)
            .replace("{{insecure}}", "true" if self.ctx.insecure else "false")
            .replace("{{insecure_hidden}}", "" if self.ctx.insecure else "hidden")
        )
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'; "
            "frame-ancestors 'none'"
        )
        return web.Response(
            text=html,
            content_type="text/html",
            headers={
                "Content-Security-Policy": csp,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/admin")
