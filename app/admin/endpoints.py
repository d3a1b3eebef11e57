"""Endpoint routes: list, create, show, change, enable/disable, delete, rotate the secret.

Writes are read-modify-write on the registry view, serialised per worker by `ctx.write_lock`; each
states the version it read (the view's after `registry_fresh`, or the client's `If-Match`) and is
read back before the response: one based on a stale version answers 409 (app/endpoints.py
`RegistryState`). Secrets leave only in create and rotate answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from app.admin.context import AdminContext, log
from app.admin.http import ApiError, bool_query, check_fields, grace_seconds, json_response, read_json
from app.catalog import load_catalog, matches
from app.delivery import Delivery, new_delivery_id
from app.endpoints import Endpoint, StaleWrite, check_version, create_endpoint, rotate_secret
from app.events import now_rfc3339


def test_delivery(ep: Endpoint) -> Delivery:
    """A made-up delivery of the first catalog event of `ep`'s first pattern (`test` in the data)."""
    names = list(load_catalog().events)
    event = next((n for pattern in ep.events for n in names if matches([pattern], n)), "test.event")
    resource = event.split(".", 1)[0]
    now = time.time()
    return Delivery(
        id=new_delivery_id(),
        endpoint_id=ep.id,
        event=event,
        event_id="evt_test_" + new_delivery_id()[4:],
        occurred_at=now_rfc3339(now),
        occurred_ts=now,
        resource_key=f"{resource}:test",
        data={"id": "test", "test": "true", "note": "test event sent from the admin page"},
        mode=ep.mode,
    )


def if_match(request: web.Request) -> int | None:
    """The version the client based its change on (`If-Match: 3` or `"3"`), if it stated one."""
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    try:
        return int(raw.strip().removeprefix("W/").strip('"'))
    except ValueError:
        raise ApiError(400, "If-Match: give the endpoint's version, e.g. If-Match: \"3\"") from None


class EndpointRoutes:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/endpoints", self.list_all),
            ("POST", "/endpoints", self.create),
            ("GET", "/endpoints/{id}", self.show),
            ("PATCH", "/endpoints/{id}", self.patch),
            ("DELETE", "/endpoints/{id}", self.delete),
            ("POST", "/endpoints/{id}/enable", self.enable),
            ("GET", "/endpoints/{id}/breaker", self.breaker),
            ("POST", "/endpoints/{id}/disable", self.disable),
            ("POST", "/endpoints/{id}/rotate-secret", self.rotate),
            ("POST", "/endpoints/{id}/test", self.send_test),
        ]

    async def list_all(self, request: web.Request) -> web.Response:
        await self.ctx.registry_fresh()
        eps = sorted(self.ctx.registry.all(), key=lambda e: e.created_at)
        parked = self.ctx.parked_counts()
        return json_response({"endpoints": [self.ctx.endpoint_view(e, parked) for e in eps]})

    async def create(self, request: web.Request) -> web.Response:
        doc = await read_json(request)
        check_fields(
            doc,
            {
                "url": (str,),
                "events": (str, list),
                "mode": (str,),
                "format": (str,),
                "ordering": (str,),
                "secret": (str,),
                "description": (str,),
                "enabled": (bool,),
                "filter": (dict,),
                "max_rate": (int, float, str),
            },
            required=("url", "events"),
        )
        try:
            # validate_url resolves the host name: keep blocking DNS off the event loop.
            ep = await asyncio.to_thread(
                create_endpoint,
                self.ctx.settings,
                url=doc["url"],
                events=doc["events"],
                mode=doc.get("mode") or "async",
                secret=doc.get("secret") or None,
                description=doc.get("description") or "",
                enabled=doc.get("enabled", True),
                format=doc.get("format") or "perfexapi",
                filter=doc.get("filter"),
                max_rate=doc.get("max_rate"),
                ordering=doc.get("ordering") or "none",
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        async with self.ctx.write_lock:
            ep = await self.ctx.store(ep.id, ep) or ep
        # The only response (with rotate-secret) that carries the secret.
        return json_response({**self.ctx.endpoint_view(ep), "secret": ep.secret}, 201)

    async def show(self, request: web.Request) -> web.Response:
        await self.ctx.registry_fresh()
        return json_response(self.ctx.endpoint_view(self.ctx.endpoint(request.match_info["id"])))

    async def patch(self, request: web.Request) -> web.Response:
        doc = await read_json(request)
        check_fields(
            doc,
            {
                "url": (str,),
                "events": (str, list),
                "mode": (str,),
                "format": (str,),
                "ordering": (str,),
                "description": (str,),
                "enabled": (bool,),
                "filter": (dict,),
                "max_rate": (int, float, str),
            },
        )
        if not doc:
            raise ApiError(
                400, "nothing to change: give url, events, mode, format, ordering, description, enabled, filter or max_rate"
            )
        # null removes a filter or a rate limit; for the other fields it means "unchanged".
        changes = {k: v for k, v in doc.items() if v is not None or k in ("filter", "max_rate")}
        return await self._change(request, changes)

    async def enable(self, request: web.Request) -> web.Response:
        """Enable; with `?replay=true` (or `{"replay": true}`) also replay every replayable DLQ entry
        of the endpoint: what was parked while it was disabled, or failed before (app/breaker.py)."""
        doc = await read_json(request, optional=True)
        check_fields(doc, {"replay": (bool,)})
        replay = doc.get("replay", bool_query(request, "replay"))
        answer = await self._change(request, {"enabled": True})
        if not replay:
            return answer
        from app.admin.dlq import DlqRoutes
        from app.dlq import Filter

        ep_id = request.match_info["id"]
        n, ids, _ = await DlqRoutes(self.ctx).replay_matching(Filter(endpoint=ep_id))
        log.info("endpoint %s enabled; %d parked deliveries replayed", ep_id, n)
        await self.ctx.dlq_fresh()
        view = self.ctx.endpoint_view(self.ctx.endpoint(ep_id))
        return json_response({**view, "replayed": n, "replayed_ids": ids})

    async def breaker(self, request: web.Request) -> web.Response:
        """The circuit breaker of the answering worker (app/breaker.py: one per worker), with the
        failure streak all workers' attempts show and the deliveries parked for the endpoint."""
        await self.ctx.registry_fresh()
        await self.ctx.follow_attempts()
        ep = self.ctx.endpoint(request.match_info["id"])
        view = self.ctx.endpoint_view(ep)
        return json_response(
            {
                "endpoint_id": ep.id,
                "enabled": ep.enabled,
                "disabled_reason": ep.disabled_reason,
                **view["breaker"],
                "failure_streak": view["failure_streak"],
                "parked": view["parked"],
                "settings": {
                    **{k: v for k, v in vars(self.ctx.settings.health).items() if not k.startswith("operator")},
                    "operator_webhook": bool(self.ctx.settings.health.operator_webhook_url),
                },
            }
        )

    async def disable(self, request: web.Request) -> web.Response:
        await read_json(request, optional=True)
        return await self._change(request, {"enabled": False})

    async def _current(self, request: web.Request) -> Endpoint:
        """The endpoint as of every acknowledged write, at the version the client read (or 409)."""
        expected = if_match(request)
        await self.ctx.registry_fresh()
        ep = self.ctx.endpoint(request.match_info["id"])
        try:
            check_version(ep, expected)
        except StaleWrite as exc:
            raise ApiError(409, str(exc)) from exc
        return ep

    async def _change(self, request: web.Request, changes: dict[str, Any]) -> web.Response:
        async with self.ctx.write_lock:
            new = await self.ctx.change(await self._current(request), changes)
        return json_response(self.ctx.endpoint_view(new))

    async def delete(self, request: web.Request) -> web.Response:
        async with self.ctx.write_lock:
            ep = await self._current(request)
            await self.ctx.store(ep.id, None)
        return json_response({"id": ep.id, "deleted": True})

    async def send_test(self, request: web.Request) -> web.Response:
        """One signed test delivery to this endpoint only, attempted now and never retried: the
        first catalog event of its first pattern, with a small made-up resource. Answers the attempt."""
        await read_json(request, optional=True)
        await self.ctx.registry_fresh()
        ep = self.ctx.endpoint(request.match_info["id"])
        delivery = test_delivery(ep)
        try:
            attempt = await self.ctx.components.dispatcher.attempt_once(delivery)
        except KeyError as exc:
            raise ApiError(404, f"no endpoint {ep.id}") from exc
        return json_response(
            {
                "delivery_id": delivery.id,
                "event": delivery.event,
                "attempt": {**attempt.record(), "request": attempt.request},
            }
        )

    async def rotate(self, request: web.Request) -> web.Response:
        doc = await read_json(request, optional=True)
        check_fields(doc, {"grace": (str, int, float), "secret": (str,)})
        grace = grace_seconds(doc.get("grace"))
        async with self.ctx.write_lock:
            ep = await self._current(request)
            try:
                new = rotate_secret(ep, grace, doc.get("secret") or None)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
            new = await self.ctx.store(new.id, new) or new
        log.info("endpoint %s: secret rotated (grace %.0fs)", new.id, grace)
        return json_response({**self.ctx.endpoint_view(new), "secret": new.secret})
