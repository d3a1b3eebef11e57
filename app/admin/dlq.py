"""DLQ routes: list and show parked deliveries, replay one or a filtered set (app/dlq.py writes)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from app.admin.context import KAFKA_TIMEOUT, AdminContext
from app.admin.http import ApiError, check_fields, int_query, json_response, read_json, time_value
from app.dlq import Filter, is_replayable, replay_async, select, summary


def dlq_row(entry: dict[str, Any], with_history: bool = False) -> dict[str, Any]:
    row = summary(entry)
    if not with_history:
        row.pop("history", None)
    row["replayable"] = is_replayable(entry)
    return row


def dlq_filter(src: Any) -> Filter:
    for name in ("endpoint", "event"):
        if src.get(name) is not None and not isinstance(src.get(name), str):
            raise ApiError(400, f"{name}: expected string")
    return Filter(
        endpoint=src.get("endpoint") or None,
        event=src.get("event") or None,
        since=time_value(src.get("since"), "since"),
        until=time_value(src.get("until"), "until"),
    )


class DlqRoutes:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/dlq", self.list_entries),
            ("GET", "/dlq/{id}", self.show),
            ("POST", "/dlq/{id}/replay", self.replay_one),
            ("POST", "/dlq/replay", self.replay_all),
        ]

    async def list_entries(self, request: web.Request) -> web.Response:
        flt = dlq_filter(request.query)
        limit = int_query(request, "limit", 100, 1, 1000)
        offset = int_query(request, "offset", 0, 0, 10_000_000)  # pages: offset += limit
        view = await self.ctx.dlq_view()
        rows = select(view, flt)
        rows.reverse()  # newest first
        page = [e.id for e in rows[offset : offset + limit]]
        whole = await self.ctx.dlq_entries(page)  # the index has no history: read this page's
        return json_response(
            {
                "size": len(view),
                "total": len(rows),
                "entries": [dlq_row(whole[d_id]) for d_id in page if d_id in whole],
            }
        )

    async def show(self, request: web.Request) -> web.Response:
        d_id = request.match_info["id"]
        entry = (await self.ctx.dlq_entries([d_id])).get(d_id)
        if entry is None:
            raise ApiError(404, f"no DLQ entry {d_id[:80]}")
        row = dlq_row(entry, with_history=True)
        row["data"] = entry.get("data")
        row["previous"] = entry.get("previous")
        return json_response(row)

    def _warnings(self, entries: list[dict[str, Any]]) -> list[str]:
        out = []
        for ep_id in sorted({str(e.get("endpoint_id")) for e in entries}):
            ep = self.ctx.registry.get(ep_id)
            if ep is None:
                out.append(f"endpoint {ep_id} no longer exists: its deliveries return to the DLQ")
            elif not ep.enabled:
                out.append(f"endpoint {ep_id} is disabled: its deliveries return to the DLQ until enabled")
        return out

    async def replay_one(self, request: web.Request) -> web.Response:
        await read_json(request, optional=True)
        d_id = request.match_info["id"]
        await self.ctx.dlq_fresh()
        entry = (await self.ctx.dlq_entries([d_id])).get(d_id)
        if entry is None:
            raise ApiError(404, f"no DLQ entry {d_id[:80]} (already replayed, or never dead)")
        if not is_replayable(entry):
            raise ApiError(409, f"{d_id[:80]} cannot be replayed: {entry.get('dlq_reason')}")
        n = await self._replay([entry])
        return json_response({"replayed": n, "delivery_ids": [d_id], "warnings": self._warnings([entry])})

    async def replay_all(self, request: web.Request) -> web.Response:
        doc = await read_json(request, optional=True)
        check_fields(
            doc,
            {
                "endpoint": (str,),
                "event": (str,),
                "since": (str, int, float),
                "until": (str, int, float),
                "dry_run": (bool,),
            },
        )
        flt = dlq_filter(doc)
        if doc.get("dry_run"):
            await self.ctx.dlq_fresh()
            entries = select(await self.ctx.dlq_view(), flt)  # index entries
            todo = [e.id for e in entries if e.replayable]
            skipped = [e.id for e in entries if not e.replayable]
            return json_response({"dry_run": True, "would_replay": todo, "skipped": skipped})
        n, done, batch_entries = await self.replay_matching(flt)
        return json_response(
            {
                "replayed": n,
                "delivery_ids": done,
                "skipped": [e.id for e in select(await self.ctx.dlq_view(), flt) if not e.replayable],
                "warnings": self._warnings(batch_entries),
            }
        )

    async def replay_matching(self, flt: Filter) -> tuple[int, list[str], list[dict[str, Any]]]:
        """Replay every replayable entry `flt` selects (also re-enable with replay, app/admin/endpoints.py):
        how many, their ids, and one entry per endpoint (for warnings)."""
        await self.ctx.dlq_fresh()
        entries = select(await self.ctx.dlq_view(), flt)  # index entries
        todo = [e.id for e in entries if e.replayable]
        n, done, endpoints = 0, [], {}
        for i in range(0, len(todo), 500):  # bounded batches: payloads read, then produced
            whole = await self.ctx.dlq_entries(todo[i : i + 500])
            batch = [whole[d_id] for d_id in todo[i : i + 500] if d_id in whole]
            n += await self._replay(batch)
            done.extend(e["id"] for e in batch)
            endpoints.update({str(e.get("endpoint_id")): e for e in batch})
        return n, done, list(endpoints.values())

    async def _replay(self, entries: list[dict[str, Any]]) -> int:
        try:
            n = await asyncio.wait_for(replay_async(self.ctx.components.outbox, entries), KAFKA_TIMEOUT * 2)
        except TimeoutError as exc:
            raise ApiError(503, "Kafka did not acknowledge the replay; entries stay in the DLQ") from exc
        await self.ctx.dlq_fresh()  # the tombstones are in this worker's view before we answer
        return int(n)
