"""Ingest routes: `POST /api/events` (one change event, or a batch of them, onto `crm.events`,
through the same gate the fan-out applies) and `GET /api/catalog` (the events there are to send and
subscribe to)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from app import route
from app.admin.context import KAFKA_TIMEOUT, AdminContext
from app.admin.http import ApiError, check_fields, json_response, read_body
from app.catalog import load_catalog
from app.events import InvalidEvent, build_event, parse_event
from app.outbox import PublishError

MAX_BATCH_ITEMS = 500  # events per batch; the body's bytes are bounded by WEBHOOKS_MAX_EVENT_BYTES
_EVENT_FIELDS: dict[str, tuple[type, ...]] = {
    "event": (str,),
    "resource_id": (str, int),
    "data": (dict,),
    "previous": (dict,),
    "id": (str,),
    "occurred_at": (str,),
}


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
        """One event (an object: 202) or a batch (an array: 200, one result per item)."""
        limit = self.ctx.settings.max_event_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"body of {request.content_length} bytes over the {limit}-byte limit")
        doc = await read_body(request, expected="a JSON object (one event) or an array (a batch)")
        if isinstance(doc, list):
            return json_response(await ingest_batch(self.ctx.components.prompt_outbox, doc, limit))
        if not isinstance(doc, dict):
            raise ApiError(400, f"body: expected a JSON object or an array, got {type(doc).__name__}")
        key, raw, value = prepare_event(doc, limit)
        await self.ctx.acked(route.EVENTS, key, raw)
        return json_response({"id": value["id"], "event": value["event"], "key": key}, 202)


def prepare_event(doc: Any, limit: int) -> tuple[str, bytes, dict[str, Any]]:
    """Validate one posted event; returns (key, encoded value, value) or raises ApiError 400/413."""
    if not isinstance(doc, dict):
        raise ApiError(400, f"expected a JSON object, got {type(doc).__name__}")
    check_fields(doc, _EVENT_FIELDS, required=("event", "resource_id"))
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
    return key, raw, value


async def ingest_batch(outbox: Any, items: list[Any], limit: int) -> dict[str, Any]:
    """Produce a batch of events: each item is validated and acknowledged on its own, and one result
    per item comes back in order (202 accepted, 400/413 refused, 503 not acknowledged: send again).

    Every valid item is queued first and the acks are awaited together, so a batch costs one broker
    round trip, not one per item. Items of one resource keep their order on its partition; after an
    enqueue failure (the producer's queue stays full: Kafka is away) the rest of the batch is not
    queued, so no later event of a resource overtakes an earlier one that was not written.
    """
    if not items:
        raise ApiError(400, "empty batch: give at least one event")
    if len(items) > MAX_BATCH_ITEMS:
        raise ApiError(413, f"batch of {len(items)} events over the {MAX_BATCH_ITEMS}-event limit")
    results: list[dict[str, Any]] = []
    valid: list[tuple[dict[str, Any], str, bytes]] = []
    for index, doc in enumerate(items):
        try:
            key, raw, value = prepare_event(doc, limit)
        except ApiError as exc:
            results.append({"index": index, "status": exc.status, "error": exc.message})
            continue
        row: dict[str, Any] = {"index": index, "status": 202, "id": value["id"], "event": value["event"], "key": key}
        results.append(row)
        valid.append((row, key, raw))
    # Queued in order under one deadline (a send waits only while librdkafka's queue is full): no
    # task and no timer per event, which cost twice the validation (docs/performance.md 9).
    pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
    try:
        async with asyncio.timeout(KAFKA_TIMEOUT):
            for row, key, raw in valid:
                pending.append((row, await outbox.send(route.EVENTS, key, raw)))
    except (TimeoutError, OSError, PublishError) as exc:
        queue_failed = f"Kafka did not take the event ({type(exc).__name__}); send it again"
        for row, _, _ in valid[len(pending) :]:
            row.update(status=503, error=queue_failed)
    if pending:
        await asyncio.wait([fut for _, fut in pending], timeout=KAFKA_TIMEOUT)
    for row, fut in pending:
        if not fut.done():
            fut.cancel()
            row.update(status=503, error="Kafka did not acknowledge the event in time; send it again")
        elif fut.exception() is not None:
            row.update(status=503, error=f"Kafka refused the event: {fut.exception()}; send it again")
    return {
        "accepted": sum(r["status"] == 202 for r in results),
        "refused": sum(400 <= r["status"] < 500 for r in results),
        "retry": sum(r["status"] == 503 for r in results),
        "results": results,
    }
