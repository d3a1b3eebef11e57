"""Ingest routes: `POST /api/events` (one change event onto `crm.events`, through the same gate the
fan-out applies) and `GET /api/catalog` (the events there are to send and subscribe to)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from app.admin.context import AdminContext
from app.admin.http import ApiError, check_fields, json_response, read_json
from app.catalog import load_catalog
from app.events import InvalidEvent, build_event, parse_event

EVENTS_TOPIC = "crm.events"


class IngestRoutes:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/catalog", self.catalog),
            ("POST", "/events", self.post_event),
        ]

    async def catalog(self, request: web.Request) -> web.Response:
        cat = load_catalog()
        return json_response(
            {
                **cat.as_dict(),
                "count": len(cat.events),
                "documented": sum(e.documented for e in cat.events.values()),
            }
        )

    async def post_event(self, request: web.Request) -> web.Response:
        limit = self.ctx.settings.max_event_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"event of {request.content_length} bytes over the {limit}-byte limit")
        doc = await read_json(request)
        check_fields(
            doc,
            {
                "event": (str,),
                "resource_id": (str, int),
                "data": (dict,),
                "previous": (dict,),
                "id": (str,),
                "occurred_at": (str,),
            },
            required=("event", "resource_id"),
        )
        if doc.get("id") is not None and not 0 < len(doc["id"]) <= 200:
            raise ApiError(400, "id: 1 to 200 characters")
        try:
            key, value = build_event(
                doc["event"],
                doc["resource_id"],
                doc.get("data"),
                doc.get("previous"),
                event_id=doc.get("id") or None,
                occurred_at=doc.get("occurred_at") or None,
            )
            raw = orjson.dumps(value)
            if len(raw) > limit:
                raise ApiError(413, f"event of {len(raw)} bytes over the {limit}-byte limit")
            # The same gate the fan-out applies: what this route accepts, the pipeline delivers.
            parse_event(key.encode(), raw, max_bytes=limit)
        except InvalidEvent as exc:
            raise ApiError(400, str(exc)) from exc
        await self.ctx.acked(EVENTS_TOPIC, key, raw)
        return json_response({"id": value["id"], "event": value["event"], "key": key}, 202)
