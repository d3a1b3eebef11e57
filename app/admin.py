"""Admin API (`/api`) and admin page (`/admin`) of every worker (SPEC §2.5, §2.6, §4, §5).

State lives in Kafka, so any worker gives the same answers: endpoints come from the worker's
registry view, the DLQ from a view of `webhooks.dlq` started here, recent attempts from a bounded
follower of `webhooks.attempts` (app/attempt_log.py). Writes go through the worker's producer to
the same topics the CLI writes, and are applied to this worker's views before the response
(read-your-writes); other workers see them within about a second.

Every `/api` route needs `Authorization: Bearer $WEBHOOKS_ADMIN_TOKEN`. Bad input is a 4xx JSON
`{"error": "..."}`, never a 500. Secrets leave only in the create and rotate responses.
The page is static HTML + an inline script that calls `/api` with the token; it renders untrusted
data (payloads, URLs) with textContent only, under a nonce-based Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from app import __version__
from app.attempt_log import AttemptLog
from app.config import ConfigError, Settings, parse_duration
from app.endpoints import MAX_GRACE, Endpoint, create_endpoint, rotate_secret, update_endpoint
from app.endpoints import TOPIC as ENDPOINTS_TOPIC
from app.events import InvalidEvent, build_event, parse_event, parse_rfc3339
from app.outbox import PublishError

log = logging.getLogger(__name__)

DLQ_TOPIC = "webhooks.dlq"
EVENTS_TOPIC = "crm.events"
KAFKA_TIMEOUT = 15.0  # seconds to wait for Kafka to acknowledge an admin write

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


# ---- input helpers: every bad input becomes an ApiError with a reason ----------------------------
async def _read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, "body over the size limit") from exc
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "body: expected a JSON object")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(doc).__name__}")
    return doc


_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _check_fields(
    doc: dict[str, Any], types: dict[str, tuple[type, ...]], required: tuple[str, ...] = ()
) -> None:
    unknown = sorted(set(doc) - set(types))
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)[:200]}")
    for name in required:
        if doc.get(name) is None or doc.get(name) == "":
            raise ApiError(400, f"{name}: required")
    for name, allowed in types.items():
        value = doc.get(name)
        if value is None:
            continue
        # bool is an int in Python: accept it only where bool is asked for.
        if isinstance(value, bool) and bool not in allowed:
            raise ApiError(400, f"{name}: wrong type")
        if not isinstance(value, allowed):
            names = " or ".join(_TYPE_NAMES[t] for t in allowed)
            raise ApiError(400, f"{name}: expected {names}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ApiError(400, f"{name}: expected an array of strings")


def _time_value(value: Any, name: str) -> float | None:
    """A unix time (number or digits) or an RFC 3339 timestamp."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(400, f"{name}: expected a unix time or RFC 3339 timestamp")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else parse_rfc3339(text)
    except InvalidEvent as exc:
        raise ApiError(400, f"{name}: {text[:40]!r} is not a unix time or RFC 3339 timestamp") from exc


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError as exc:
        raise ApiError(400, f"{name}: {text[:20]!r} is not an integer") from exc
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}: must be between {lo} and {hi}")
    return value


def _grace_seconds(value: Any) -> float:
    if value is None:
        return MAX_GRACE
    if isinstance(value, bool):
        raise ApiError(400, "grace: expected a duration like 24h, 90m or 30s")
    try:
        grace = float(value) if isinstance(value, (int, float)) else parse_duration(str(value), "grace")
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from exc
    if grace < 0 or grace > MAX_GRACE:
        raise ApiError(400, "grace: must be between 0 and 24h")
    return grace


def _dlq_row(entry: dict[str, Any], with_history: bool = False) -> dict[str, Any]:
    from app.dlq import is_replayable, summary

    row = summary(entry)
    if not with_history:
        row.pop("history", None)
    row["replayable"] = is_replayable(entry)
    return row


# ---- the admin service -----------------------------------------------------------------------------
class Admin:
    def __init__(self, settings: Settings, components: Any) -> None:
        from app.topic_tables import TopicTable

        self.settings = settings
        self.components = components
        # The worker's DLQ follower (app/observe.py, which also keeps webhooks_dlq_size) when it
        # has one; otherwise our own, so the topic is followed once per worker either way.
        shared = getattr(components, "dlq_view", None)
        self._own_dlq = shared is None
        self.dlq = TopicTable(settings, DLQ_TOPIC, on_change=self._dlq_changed) if shared is None else shared
        # Followed from the first API request on, not from start: reading back every attempt record
        # costs a worker CPU per delivery, and most workers never serve the admin API.
        self.attempts = AttemptLog(settings)
        self._attempts_lock = asyncio.Lock()
        self._attempts_started = False
        self._write_lock = asyncio.Lock()
        self.insecure = not settings.admin_token and settings.admin_insecure

    # lifecycle (aiohttp on_startup / on_cleanup of the web app)
    async def on_startup(self, app: web.Application) -> None:
        if self._own_dlq:
            await self.dlq.start()

    async def on_cleanup(self, app: web.Application) -> None:
        for part in (self.attempts, self.dlq) if self._own_dlq else (self.attempts,):
            try:
                await part.stop()
            except Exception:
                log.exception("stopping %s", type(part).__name__)

    def _dlq_changed(self, key: str, value: Any) -> None:
        from app import metrics

        metrics.DLQ_SIZE.set(len(self.dlq.data))

    async def _follow_attempts(self, timeout: float = 10.0) -> None:
        """Start following webhooks.attempts if this is the first API request; wait until the view
        holds what was written before it (the latest records per partition), within `timeout`."""
        if not self._attempts_started:
            async with self._attempts_lock:
                if not self._attempts_started:
                    try:
                        await self.attempts.start()
                    except Exception as exc:  # Kafka unreachable: answer without attempts, retry later
                        log.warning("attempt log not available: %s", exc)
                        return
                    self._attempts_started = True
        if not self.attempts.ready.is_set():
            try:
                await asyncio.wait_for(self.attempts.ready.wait(), timeout)
            except TimeoutError:
                log.info("attempt log still catching up; answering from what it has")

    # ---- auth and error handling --------------------------------------------------------------------
    def authorised(self, request: web.Request) -> bool:
        token = self.settings.admin_token
        if not token:
            return self.insecure
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode("utf-8"))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if not self.authorised(request):
                raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            await self._follow_attempts()
            return await handler(request)
        except ApiError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="perfex-webhooks"'} if exc.status == 401 else None
            return _error(exc.status, exc.message, headers)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            if exc.status < 400:
                raise
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            message = {
                404: f"no such route: {request.method} {request.path[:100]} (see docs/openapi.yaml)",
                405: f"{request.method} is not allowed on {request.path[:100]}",
                413: "body over the size limit",
            }.get(exc.status, exc.reason)
            return _error(exc.status, message, allow)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never the request body in the log: it may hold a secret.
            log.exception("admin API %s %s failed", request.method, request.path)
            return _error(500, "internal error; see the worker log")

    # ---- Kafka helpers ------------------------------------------------------------------------------
    async def _acked(self, topic: str, key: str, value: Any) -> None:
        try:
            fut = await asyncio.wait_for(self.components.outbox.send(topic, key, value), KAFKA_TIMEOUT)
            await asyncio.wait_for(fut, KAFKA_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            raise ApiError(503, "Kafka did not acknowledge the write; try again") from exc
        except PublishError as exc:
            raise ApiError(503, f"Kafka refused the write: {exc}") from exc

    async def _registry_fresh(self) -> None:
        """Include every registry write acknowledged before this request (e.g. by the CLI)."""
        try:
            await asyncio.wait_for(self.components.registry.table.caught_up(5), 6)
        except Exception as exc:  # Kafka unreachable: answer from the view we have
            log.info("registry view not confirmed fresh: %s", exc)

    async def _dlq_view(self) -> dict[str, dict[str, Any]]:
        try:
            await asyncio.wait_for(self.dlq.ready.wait(), 15)
        except TimeoutError as exc:
            raise ApiError(503, "the DLQ view is still loading; try again") from exc
        return self.dlq.data

    async def _dlq_fresh(self) -> None:
        try:
            await asyncio.wait_for(self.dlq.caught_up(5), 6)
        except Exception as exc:
            log.info("DLQ view not confirmed fresh: %s", exc)

    def _endpoint(self, ep_id: str) -> Endpoint:
        ep = self.components.registry.get(ep_id)
        if ep is None:
            raise ApiError(404, f"no endpoint {ep_id[:80]}")
        return ep

    def _endpoint_view(self, ep: Endpoint) -> dict[str, Any]:
        view = ep.public()
        view["failure_streak"] = self.attempts.streak(ep.id)
        view["last_attempt"] = self.attempts.last(ep.id)
        return view

    async def _store(self, ep_id: str, ep: Endpoint | None) -> None:
        await self._acked(ENDPOINTS_TOPIC, ep_id, None if ep is None else ep.record())
        self.components.registry.apply_local(ep, ep_id)

    # ---- endpoints ----------------------------------------------------------------------------------
    async def list_endpoints(self, request: web.Request) -> web.Response:
        await self._registry_fresh()
        eps = sorted(self.components.registry.all(), key=lambda e: e.created_at)
        return _json({"endpoints": [self._endpoint_view(e) for e in eps]})

    async def create_endpoint(self, request: web.Request) -> web.Response:
        doc = await _read_json(request)
        _check_fields(
            doc,
            {
                "url": (str,),
                "events": (str, list),
                "mode": (str,),
                "secret": (str,),
                "description": (str,),
                "enabled": (bool,),
            },
            required=("url", "events"),
        )
        try:
            # validate_url resolves the host name: keep blocking DNS off the event loop.
            ep = await asyncio.to_thread(
                create_endpoint,
                self.settings,
                url=doc["url"],
                events=doc["events"],
                mode=doc.get("mode") or "async",
                secret=doc.get("secret") or None,
                description=doc.get("description") or "",
                enabled=doc.get("enabled", True),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        async with self._write_lock:
            await self._store(ep.id, ep)
        # The only response (with rotate-secret) that carries the secret.
        return _json({**self._endpoint_view(ep), "secret": ep.secret}, 201)

    async def show_endpoint(self, request: web.Request) -> web.Response:
        await self._registry_fresh()
        return _json(self._endpoint_view(self._endpoint(request.match_info["id"])))

    async def patch_endpoint(self, request: web.Request) -> web.Response:
        doc = await _read_json(request)
        _check_fields(
            doc,
            {"url": (str,), "events": (str, list), "mode": (str,), "description": (str,), "enabled": (bool,)},
        )
        if not doc:
            raise ApiError(400, "nothing to change: give url, events, mode, description or enabled")
        changes = {k: v for k, v in doc.items() if v is not None}
        return await self._change(request.match_info["id"], changes)

    async def enable_endpoint(self, request: web.Request) -> web.Response:
        await _read_json(request, optional=True)
        return await self._change(request.match_info["id"], {"enabled": True})

    async def disable_endpoint(self, request: web.Request) -> web.Response:
        await _read_json(request, optional=True)
        return await self._change(request.match_info["id"], {"enabled": False})

    async def _change(self, ep_id: str, changes: dict[str, Any]) -> web.Response:
        async with self._write_lock:
            await self._registry_fresh()
            ep = self._endpoint(ep_id)
            try:
                new = await asyncio.to_thread(update_endpoint, self.settings, ep, changes)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
            if changes.get("enabled") is False:
                new = new.changed(disabled_reason="disabled by operator")
            await self._store(new.id, new)
        return _json(self._endpoint_view(new))

    async def delete_endpoint(self, request: web.Request) -> web.Response:
        async with self._write_lock:
            await self._registry_fresh()
            ep = self._endpoint(request.match_info["id"])
            await self._store(ep.id, None)
        return _json({"id": ep.id, "deleted": True})

    async def rotate(self, request: web.Request) -> web.Response:
        doc = await _read_json(request, optional=True)
        _check_fields(doc, {"grace": (str, int, float), "secret": (str,)})
        grace = _grace_seconds(doc.get("grace"))
        async with self._write_lock:
            await self._registry_fresh()
            ep = self._endpoint(request.match_info["id"])
            try:
                new = rotate_secret(ep, grace, doc.get("secret") or None)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
            await self._store(new.id, new)
        log.info("endpoint %s: secret rotated (grace %.0fs)", new.id, grace)
        return _json({**self._endpoint_view(new), "secret": new.secret})

    # ---- attempts -----------------------------------------------------------------------------------
    async def endpoint_attempts(self, request: web.Request) -> web.Response:
        ep_id = request.match_info["id"]
        limit = _int_query(request, "limit", 100, 1, self.attempts.per_endpoint)
        if self.components.registry.get(ep_id) is None and not self.attempts.knows_endpoint(ep_id):
            raise ApiError(404, f"no endpoint {ep_id[:80]}")
        return _json(
            {
                "endpoint_id": ep_id,
                "failure_streak": self.attempts.streak(ep_id),
                "attempts": self.attempts.recent(limit, endpoint=ep_id),
            }
        )

    async def delivery_attempts(self, request: web.Request) -> web.Response:
        d_id = request.match_info["id"]
        rows = self.attempts.for_delivery(d_id)
        entry = (await self._dlq_view()).get(d_id)
        if not rows and entry is None:
            raise ApiError(
                404,
                f"no attempts known for {d_id[:80]} (workers keep the latest "
                f"{self.attempts.per_partition} per attempts-topic partition)",
            )
        return _json(
            {"delivery_id": d_id, "attempts": rows, "dlq": None if entry is None else _dlq_row(entry, True)}
        )

    async def recent_attempts(self, request: web.Request) -> web.Response:
        limit = _int_query(request, "limit", 100, 1, 1000)
        ep_id = request.query.get("endpoint") or None
        return _json({"attempts": self.attempts.recent(limit, endpoint=ep_id)})

    # ---- DLQ ----------------------------------------------------------------------------------------
    def _filter(self, src: Any) -> Any:
        from app.dlq import Filter

        for name in ("endpoint", "event"):
            if src.get(name) is not None and not isinstance(src.get(name), str):
                raise ApiError(400, f"{name}: expected string")
        return Filter(
            endpoint=src.get("endpoint") or None,
            event=src.get("event") or None,
            since=_time_value(src.get("since"), "since"),
            until=_time_value(src.get("until"), "until"),
        )

    async def dlq_list(self, request: web.Request) -> web.Response:
        from app.dlq import select

        flt = self._filter(request.query)
        limit = _int_query(request, "limit", 100, 1, 1000)
        view = await self._dlq_view()
        rows = select(view, flt)
        rows.reverse()  # newest first
        return _json({"size": len(view), "total": len(rows), "entries": [_dlq_row(e) for e in rows[:limit]]})

    async def dlq_show(self, request: web.Request) -> web.Response:
        entry = (await self._dlq_view()).get(request.match_info["id"])
        if entry is None:
            raise ApiError(404, f"no DLQ entry {request.match_info['id'][:80]}")
        row = _dlq_row(entry, with_history=True)
        row["data"] = entry.get("data")
        row["previous"] = entry.get("previous")
        return _json(row)

    def _replay_warnings(self, entries: list[dict[str, Any]]) -> list[str]:
        out = []
        for ep_id in sorted({str(e.get("endpoint_id")) for e in entries}):
            ep = self.components.registry.get(ep_id)
            if ep is None:
                out.append(f"endpoint {ep_id} no longer exists: its deliveries return to the DLQ")
            elif not ep.enabled:
                out.append(f"endpoint {ep_id} is disabled: its deliveries return to the DLQ until enabled")
        return out

    async def dlq_replay_one(self, request: web.Request) -> web.Response:
        from app.dlq import is_replayable, replay_async

        await _read_json(request, optional=True)
        d_id = request.match_info["id"]
        await self._dlq_fresh()
        entry = (await self._dlq_view()).get(d_id)
        if entry is None:
            raise ApiError(404, f"no DLQ entry {d_id[:80]} (already replayed, or never dead)")
        if not is_replayable(entry):
            raise ApiError(409, f"{d_id[:80]} cannot be replayed: {entry.get('dlq_reason')}")
        n = await self._replay(replay_async, [entry])
        return _json({"replayed": n, "delivery_ids": [d_id], "warnings": self._replay_warnings([entry])})

    async def dlq_replay_all(self, request: web.Request) -> web.Response:
        from app.dlq import is_replayable, replay_async, select

        doc = await _read_json(request, optional=True)
        _check_fields(
            doc,
            {
                "endpoint": (str,),
                "event": (str,),
                "since": (str, int, float),
                "until": (str, int, float),
                "dry_run": (bool,),
            },
        )
        flt = self._filter(doc)
        await self._dlq_fresh()
        entries = select(await self._dlq_view(), flt)
        todo = [e for e in entries if is_replayable(e)]
        skipped = [str(e.get("id")) for e in entries if not is_replayable(e)]
        if doc.get("dry_run"):
            return _json({"dry_run": True, "would_replay": [e["id"] for e in todo], "skipped": skipped})
        n = 0
        for i in range(0, len(todo), 500):  # bounded batches of in-flight produce futures
            n += await self._replay(replay_async, todo[i : i + 500])
        return _json(
            {
                "replayed": n,
                "delivery_ids": [e["id"] for e in todo],
                "skipped": skipped,
                "warnings": self._replay_warnings(todo),
            }
        )

    async def _replay(self, replay_async: Any, entries: list[dict[str, Any]]) -> int:
        try:
            n = await asyncio.wait_for(replay_async(self.components.outbox, entries), KAFKA_TIMEOUT * 2)
        except TimeoutError as exc:
            raise ApiError(503, "Kafka did not acknowledge the replay; entries stay in the DLQ") from exc
        await self._dlq_fresh()  # the tombstones are in this worker's view before we answer
        return int(n)

    # ---- catalog and event ingest ---------------------------------------------------------------------
    async def catalog(self, request: web.Request) -> web.Response:
        from app.catalog import load_catalog

        cat = load_catalog()
        return _json(
            {
                **cat.as_dict(),
                "count": len(cat.events),
                "documented": sum(e.documented for e in cat.events.values()),
            }
        )

    async def post_event(self, request: web.Request) -> web.Response:
        limit = self.settings.max_event_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"event of {request.content_length} bytes over the {limit}-byte limit")
        doc = await _read_json(request)
        _check_fields(
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
        await self._acked(EVENTS_TOPIC, key, raw)
        return _json({"id": value["id"], "event": value["event"], "key": key}, 202)

    # ---- page -------------------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        html = (
            _page_template()
            .replace("{{nonce}}", nonce)
            .replace("{{version}}", __version__)
            .replace("{{insecure}}", "true" if self.insecure else "false")
            .replace("{{insecure_hidden}}", "" if self.insecure else "hidden")
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

    # ---- routing ----------------------------------------------------------------------------------------
    def routes(self) -> list[tuple[str, str, Handler]]:
        """Every /api route (relative to /api); docs/openapi.yaml describes exactly these."""
        return [
            ("GET", "/endpoints", self.list_endpoints),
            ("POST", "/endpoints", self.create_endpoint),
            ("GET", "/endpoints/{id}", self.show_endpoint),
            ("PATCH", "/endpoints/{id}", self.patch_endpoint),
            ("DELETE", "/endpoints/{id}", self.delete_endpoint),
            ("POST", "/endpoints/{id}/enable", self.enable_endpoint),
            ("POST", "/endpoints/{id}/disable", self.disable_endpoint),
            ("POST", "/endpoints/{id}/rotate-secret", self.rotate),
            ("GET", "/endpoints/{id}/attempts", self.endpoint_attempts),
            ("GET", "/deliveries/{id}/attempts", self.delivery_attempts),
            ("GET", "/attempts", self.recent_attempts),
            ("GET", "/dlq", self.dlq_list),
            ("GET", "/dlq/{id}", self.dlq_show),
            ("POST", "/dlq/{id}/replay", self.dlq_replay_one),
            ("POST", "/dlq/replay", self.dlq_replay_all),
            ("GET", "/catalog", self.catalog),
            ("POST", "/events", self.post_event),
        ]


_TEMPLATE: str | None = None


def _page_template() -> str:
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = resources.files("app").joinpath("templates/admin.html").read_text(encoding="utf-8")
    return _TEMPLATE


ADMIN_KEY = web.AppKey("admin", Admin)
API_KEY = web.AppKey("admin_api", web.Application)


def install(app: web.Application, settings: Settings, components: Any) -> Admin:
    """Add `/api` (a sub-application with its own auth middleware) and `/admin` to the worker's app."""
    admin = Admin(settings, components)
    api = web.Application(middlewares=[admin.middleware])
    for method, path, handler in admin.routes():
        api.router.add_route(method, path, handler)
    app.add_subapp("/api", api)
    app.router.add_get("/admin", admin.page)
    app.router.add_get("/", admin.root, allow_head=False)
    app.on_startup.append(admin.on_startup)
    app.on_cleanup.append(admin.on_cleanup)
    app[ADMIN_KEY] = admin
    app[API_KEY] = api
    if admin.insecure:
        banner = "!" * 78
        log.warning(
            "\n%s\n!! ADMIN API OPEN: WEBHOOKS_ADMIN_INSECURE=true and no WEBHOOKS_ADMIN_TOKEN.\n"
            "!! Anyone who reaches port %s can read and change endpoints and replay deliveries.\n"
            "!! Set WEBHOOKS_ADMIN_TOKEN for anything but local development.\n%s",
            banner,
            settings.web_port,
            banner,
        )
    elif not settings.admin_token:
        log.warning("WEBHOOKS_ADMIN_TOKEN is not set: every /api call is refused (401)")
    return admin
