"""The worker's HTTP surface on WEBHOOKS_WEB_PORT: /metrics, /health, /ready (admin API and page: app/admin/).

A plain aiohttp app (aiohttp is already the delivery client and a Faust dependency) rather than
Faust's web views: ordinary routing and middleware, and it is up as soon as the components are.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.config import Settings
from app.metrics import REGISTRY

log = logging.getLogger(__name__)


class WebServer:
    def __init__(self, settings: Settings, components: Any) -> None:
        self.settings = settings
        self.components = components
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=settings.max_event_bytes + 65536)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/ready", self.ready)
        from app.admin import install

        install(self.app, settings, components)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.web_host, self.settings.web_port)
        await site.start()
        log.info(
            "web on http://%s:%s (/metrics, /admin, /api)", self.settings.web_host, self.settings.web_port
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.components.ready.is_set()
        fapp = getattr(self.components, "faust_app", None)
        assigned = bool(fapp is not None and fapp.assignor.assigned_actives())
        return web.json_response({"ready": ok, "assigned": assigned}, status=200 if ok else 503)
