"""`/api/v1/webhooks`: the subscription API in the shape PerfexAPI's REST API has, which the n8n
PerfexCRM Trigger node (package `n8n-nodes-perfexcrm`) calls to manage its own webhook (SPEC §4).

The node sends `X-API-KEY`, creates with `{"name", "url", "events", "secret"?, "is_active": 1}`,
reads `response.data.id`, checks existence with a truthy `response.data` and deletes by id. So:
answers are `{"data": ...}`; `is_active` (0/1, or a boolean) is our `enabled`; `name` is kept as the
endpoint's description; fields we do not use are ignored (the node's shape may grow); `mode`
defaults to async, `format` to perfexapi and `ordering` to none; `filter`, `max_rate` and `ordering`
(`resource`: ordered per resource, app/ordering.py) are ours (app/filters.py,
app/throttle.py). The secret is in the create answer only. Underneath
these are the same endpoints `/api/endpoints` manages.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from app.admin.context import AdminContext
from app.admin.http import ApiError, int_query, json_response, read_json
from app.endpoints import Endpoint, create_endpoint

PREFIX = "/v1/webhooks"


def _is_active(value: Any) -> bool:
    """0/1, true/false, or their strings (PHP clients send either)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise ApiError(400, "is_active: expected 0 or 1")


def _text(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name}: expected a string")
    return value


def _events(doc: dict[str, Any]) -> str | list[str] | None:
    value = doc.get("events")
    if value is None:
        return None
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise ApiError(400, "events: expected an array of event names or a comma-separated string")


def _filter(doc: dict[str, Any]) -> dict[str, Any] | None:
    value = doc.get("filter")
    if value is not None and not isinstance(value, dict):
        raise ApiError(400, "filter: expected an object such as {\"payload.status\": \"2\"}")
    return value


def view(ep: Endpoint) -> dict[str, Any]:
    """A webhook as this API shows it (never the secret)."""
    return {
        "id": ep.id,
        "name": ep.description,
        "url": ep.url,
        "events": list(ep.events),
        "is_active": 1 if ep.enabled else 0,
        "mode": ep.mode,
        "format": ep.format,
        "ordering": ep.ordering,
        "disabled_reason": ep.disabled_reason,
        "filter": ep.filter,
        "max_rate": ep.max_rate,
        "created_at": ep.created_at,
        "updated_at": ep.updated_at,
    }


class WebhooksV1Routes:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", PREFIX, self.list_all),
            ("POST", PREFIX, self.create),
            ("GET", PREFIX + "/{id}", self.show),
            ("PUT", PREFIX + "/{id}", self.update),
            ("DELETE", PREFIX + "/{id}", self.delete),
        ]

    async def list_all(self, request: web.Request) -> web.Response:
        page = int_query(request, "page", 1, 1, 1_000_000)
        per_page = int_query(request, "limit", 100, 1, 1000)
        await self.ctx.registry_fresh()
        eps = sorted(self.ctx.registry.all(), key=lambda e: e.created_at)
        rows = eps[(page - 1) * per_page : page * per_page]
        return json_response(
            {"data": [view(e) for e in rows], "meta": {"total": len(eps), "page": page, "limit": per_page}}
        )

    async def create(self, request: web.Request) -> web.Response:
        doc = await read_json(request)
        url, events = _text(doc, "url"), _events(doc)
        if not url:
            raise ApiError(400, "url: required")
        if not events:
            raise ApiError(400, "events: required")
        secret = _text(doc, "secret")
        description = _text(doc, "description") or _text(doc, "name") or ""
        enabled = _is_active(doc["is_active"]) if doc.get("is_active") is not None else True
        try:
            # validate_url resolves the host name: keep blocking DNS off the event loop.
            ep = await asyncio.to_thread(
                create_endpoint,
                self.ctx.settings,
                url=url,
                events=events,
                mode=_text(doc, "mode") or "async",
                format=_text(doc, "format") or "perfexapi",
                ordering=_text(doc, "ordering") or "none",
                secret=secret or None,
                description=description,
                enabled=enabled,
                filter=_filter(doc),
                max_rate=doc.get("max_rate"),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        async with self.ctx.write_lock:
            await self.ctx.store(ep.id, ep)
        # The only answer of this API that carries the secret.
        return json_response({"data": {**view(ep), "secret": ep.secret}}, 201)

    async def show(self, request: web.Request) -> web.Response:
        await self.ctx.registry_fresh()
        return json_response({"data": view(self.ctx.endpoint(request.match_info["id"]))})

    async def update(self, request: web.Request) -> web.Response:
        doc = await read_json(request)
        changes: dict[str, Any] = {}
        for ours, theirs in (("url", "url"), ("mode", "mode"), ("format", "format"), ("ordering", "ordering")):
            value = _text(doc, theirs)
            if value is not None:
                changes[ours] = value
        description = _text(doc, "description")
        description = description if description is not None else _text(doc, "name")
        if description is not None:
            changes["description"] = description
        events = _events(doc)
        if events is not None:
            changes["events"] = events
        if doc.get("is_active") is not None:
            changes["enabled"] = _is_active(doc["is_active"])
        for name in ("filter", "max_rate"):  # null removes it
            if name in doc:
                changes[name] = _filter(doc) if name == "filter" else doc[name]
        if not changes:
            raise ApiError(
                400, "nothing to change: give url, events, is_active, name, mode, format, filter, max_rate or ordering"
            )
        async with self.ctx.write_lock:
            await self.ctx.registry_fresh()
            new = await self.ctx.change(self.ctx.endpoint(request.match_info["id"]), changes)
        return json_response({"data": view(new)})

    async def delete(self, request: web.Request) -> web.Response:
        async with self.ctx.write_lock:
            await self.ctx.registry_fresh()
            ep = self.ctx.endpoint(request.match_info["id"])
            await self.ctx.store(ep.id, None)
        return json_response({"data": {"id": ep.id, "deleted": True}})
