"""The worker's HTTP surface on WEBHOOKS_WEB_PORT: /metrics, /health, /ready (admin API and page: app/admin/).

`/metrics` needs `Authorization: Bearer $WEBHOOKS_METRICS_TOKEN` when that token is set (its labels
name endpoint ids). Each scrape first drops the series of endpoints that no longer exist.

A plain aiohttp app (aiohttp is already the delivery client and a Faust dependency) rather than
Faust's web views: ordinary routing and middleware, and it is up as soon as the components are.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import metrics as m
from app.config import Settings
from app.health import HEALTH
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
        if not self.settings.secrets_key:
            log.warning(
                "WEBHOOKS_SECRETS_KEY is not set: endpoint secrets are stored in clear in the endpoints "
                "topic (make a key with `perfex-webhooks secrets-key`; docs/operations.md)"
            )
        log.info(
            "web on http://%s:%s (/metrics, /admin, /api)", self.settings.web_host, self.settings.web_port
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        token = self.settings.metrics_token
        if token:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("utf-8", "replace"), token.encode("utf-8")
            )
            if not ok:
                return web.json_response(
                    {"error": "missing or wrong metrics token (Authorization: Bearer <token>)"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="perfex-webhooks metrics"'},
                )
        registry = getattr(self.components, "registry", None)
        if registry is not None and registry.ready.is_set():
            m.forget_endpoints({e.id for e in registry.all()})
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.components.ready.is_set() and HEALTH.ok  # a crashed component: restart me
        fapp = getattr(self.components, "faust_app", None)
        assigned = bool(fapp is not None and fapp.assignor.assigned_actives())
        body: dict[str, Any] = {"ready": ok, "assigned": assigned}
        if HEALTH.failure is not None:
            body["failure"] = HEALTH.failure
        return web.json_response(body, status=200 if ok else 503)
