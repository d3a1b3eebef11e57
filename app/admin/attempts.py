"""Attempt routes: recent attempts, per endpoint (with its failure streak) and per delivery."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.admin.context import AdminContext
from app.admin.dlq import dlq_row
from app.admin.http import ApiError, int_query, json_response


class AttemptRoutes:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/endpoints/{id}/attempts", self.for_endpoint),
            ("GET", "/deliveries/{id}/attempts", self.for_delivery),
            ("GET", "/attempts", self.recent),
        ]

    async def for_endpoint(self, request: web.Request) -> web.Response:
        log = self.ctx.attempts
        ep_id = request.match_info["id"]
        limit = int_query(request, "limit", 100, 1, log.per_endpoint)
        if self.ctx.registry.get(ep_id) is None and not log.knows_endpoint(ep_id):
            raise ApiError(404, f"no endpoint {ep_id[:80]}")
        return json_response(
            {
                "endpoint_id": ep_id,
                "failure_streak": log.streak(ep_id),
                "attempts": log.recent(limit, endpoint=ep_id),
            }
        )

    async def for_delivery(self, request: web.Request) -> web.Response:
        d_id = request.match_info["id"]
        rows = self.ctx.attempts.for_delivery(d_id)
        entry = (await self.ctx.dlq_entries([d_id])).get(d_id) if d_id in await self.ctx.dlq_view() else None
        if not rows and entry is None:
            raise ApiError(
                404,
                f"no attempts known for {d_id[:80]} (workers keep the latest "
                f"{self.ctx.attempts.per_partition} per attempts-topic partition)",
            )
        return json_response(
            {"delivery_id": d_id, "attempts": rows, "dlq": None if entry is None else dlq_row(entry, True)}
        )

    async def recent(self, request: web.Request) -> web.Response:
        limit = int_query(request, "limit", 100, 1, 1000)
        ep_id = request.query.get("endpoint") or None
        return json_response({"attempts": self.ctx.attempts.recent(limit, endpoint=ep_id)})
