"""Admin API (`/api`) and admin page (`/admin`) of every worker (SPEC §2.5, §2.6, §4, §5).

State lives in Kafka, so any worker gives the same answers: endpoints come from the worker's
registry view, the DLQ from the worker's one DLQ view (app/observe.py), recent attempts from a
bounded follower of `webhooks.attempts` (app/attempt_log.py). Writes go through the worker's
producer to the same topics the CLI writes, and are applied to this worker's views before the
response (read-your-writes); other workers see them within about a second.

One module per concern: `http` (responses, input checks), `context` (shared state, Kafka writes),
`auth` (token, middleware, whoami), `endpoints`, `attempts`, `dlq`, `ingest`, `page`, and `webhooks_v1` (the
PerfexAPI-shaped `/api/v1/webhooks` the n8n PerfexCRM Trigger node calls).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.admin.attempts import AttemptRoutes
from app.admin.auth import WhoamiRoutes, middleware
from app.admin.context import AdminContext, log
from app.admin.dlq import DlqRoutes
from app.admin.endpoints import EndpointRoutes
from app.admin.ingest import IngestRoutes
from app.admin.page import Page
from app.admin.webhooks_v1 import WebhooksV1Routes
from app.config import Settings

__all__ = ["ADMIN_KEY", "API_KEY", "AdminContext", "api_routes", "install"]

ADMIN_KEY = web.AppKey("admin", AdminContext)
API_KEY = web.AppKey("admin_api", web.Application)


def api_routes(ctx: AdminContext) -> list[tuple[str, str, Any]]:
    """Every /api route (relative to /api); docs/openapi.yaml describes exactly these."""
    groups = (EndpointRoutes, AttemptRoutes, DlqRoutes, IngestRoutes, WebhooksV1Routes, WhoamiRoutes)
    return [route for group in groups for route in group(ctx).routes()]


def install(app: web.Application, settings: Settings, components: Any) -> AdminContext:
    """Add `/api` (a sub-application with its own auth middleware) and `/admin` to the worker's app."""
    ctx = AdminContext(settings, components)
    api = web.Application(middlewares=[middleware(ctx)])
    for method, path, handler in api_routes(ctx):
        api.router.add_route(method, path, handler)
    app.add_subapp("/api", api)
    page = Page(ctx)
    app.router.add_get("/admin", page.page)
    app.router.add_get("/", page.root, allow_head=False)

    async def on_cleanup(_app: web.Application) -> None:
        await ctx.stop()

    app.on_cleanup.append(on_cleanup)
    app[ADMIN_KEY] = ctx
    app[API_KEY] = api
    if ctx.insecure:
        banner = "!" * 78
        log.warning(
            "\n%s\n!! ADMIN API OPEN: WEBHOOKS_ADMIN_INSECURE=true and no WEBHOOKS_ADMIN_TOKEN.\n"
            "!! Any program on this machine that reaches %s:%s can read and change endpoints.\n"
            "!! Browsers are held off (JSON-only writes, own Origin and loopback Host only).\n"
            "!! Set WEBHOOKS_ADMIN_TOKEN for anything but local development.\n%s",
            banner,
            settings.web_host,
            settings.web_port,
            banner,
        )
    elif not settings.admin_token:
        log.warning("WEBHOOKS_ADMIN_TOKEN is not set: every /api call is refused (401)")
    return ctx
