"""Who may call the admin API, and the middleware that turns every failure into a JSON error (never
the request body in a log line: it may hold a secret).

Three scoped tokens (docs/admin.md): `WEBHOOKS_ADMIN_TOKEN` may do everything, the optional
`WEBHOOKS_READ_TOKEN` every GET, the optional `WEBHOOKS_INGEST_TOKEN` only `POST /api/events`. A token
comes as `Authorization: Bearer <token>` or `X-API-KEY: <token>` (the n8n node's header). An unknown
token gets 401, a known one without the right 403. Every configured token is compared, in constant
time, whatever the first match: the answer's timing says nothing about which token is close.
`GET /api/whoami` tells any known token its own scope (the page hides write controls from a read
token).

Insecure mode (no token, local development) is open to this machine only, so it guards against
the browser: writes must be `application/json` (a cross-site form or `text/plain` POST gets 415),
a foreign `Origin`/`Referer` gets 403, and a `Host` that is not loopback or the configured host
gets 403 (a DNS-rebinding page's requests carry its own name).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from app.admin.context import AdminContext, log
from app.admin.http import ApiError, error_response, json_response
from app.config import Settings, is_loopback_host

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ADMIN, READ, INGEST = "admin", "read", "ingest"
READ_METHODS = frozenset({"GET", "HEAD"})
INGEST_ROUTE = ("POST", "/api/events")
WHOAMI_ROUTE = ("GET", "/api/whoami")  # any known token may ask its own scope
SCOPE_KEY = web.RequestKey("scope", str)  # the caller's scope, set by `authorise`


def given_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("X-API-KEY", "").strip()
    return key or None


def token_scope(settings: Settings, given: str | None) -> str | None:
    """The scope of the token given, or None if it is no token of ours."""
    if given is None:
        return None
    raw = given.encode("utf-8", "replace")
    found = None
    for scope, token in ((ADMIN, settings.admin_token), (READ, settings.read_token), (INGEST, settings.ingest_token)):
        # No early exit: every configured token costs the same comparison on every request.
        if token and hmac.compare_digest(raw, token.encode("utf-8")) and found is None:
            found = scope
    return found


def needed_scope(request: web.Request) -> str:
    if (request.method, request.path.rstrip("/")) == INGEST_ROUTE:
        return INGEST
    return READ if request.method in READ_METHODS else ADMIN


def allowed(scope: str, needed: str) -> bool:
    return scope == ADMIN or scope == needed


class TokenBucket:
    """`rate` requests a second on average, `burst` at once; `take()` says how long to wait if empty."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(max(burst, 1))
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Limits:
    """One ingest bucket per token (per scope: each scope has one token)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buckets: dict[str, TokenBucket] = {}

    def check(self, key: str) -> None:
        if self.settings.ingest_rate <= 0:
            return
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.settings.ingest_rate, self.settings.ingest_burst)
        wait = bucket.take()
        if wait > 0:
            raise RateLimited(math.ceil(wait))


class RateLimited(ApiError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(429, f"ingest rate limit reached; retry after {retry_after}s")
        self.retry_after = retry_after


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else url.lower()


def check_local_request(settings: Settings, request: web.Request) -> None:
    """Insecure mode: only this machine's own page and tools, never another site in a browser."""
    host = request.host or ""
    name = urlsplit("//" + host).hostname or ""
    if not (is_loopback_host(name) or name == settings.web_host.strip("[]").lower()):
        raise ApiError(403, "Host header is not this machine (insecure mode answers loopback names only)")
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if origin is not None and _origin(origin) != f"{request.scheme}://{host}".lower():
        raise ApiError(403, "cross-origin request refused (insecure mode accepts only its own page)")
    if request.method not in READ_METHODS and request.content_type != "application/json":
        raise ApiError(415, "writes need Content-Type: application/json")


def authorise(ctx: AdminContext, limits: Limits, request: web.Request) -> None:
    scope: str | None
    if ctx.insecure:
        check_local_request(ctx.settings, request)
        scope = ADMIN
    else:
        scope = token_scope(ctx.settings, given_token(request))
        if scope is None:
            raise ApiError(
                401, "missing or wrong token (Authorization: Bearer <token>, or X-API-KEY: <token>)"
            )
        needed = needed_scope(request)
        if not allowed(scope, needed) and (request.method, request.path.rstrip("/")) != WHOAMI_ROUTE:
            raise ApiError(403, f"the {scope} token may not call {request.method} {request.path[:100]}")
    request[SCOPE_KEY] = scope
    if (request.method, request.path.rstrip("/")) == INGEST_ROUTE:
        limits.check(scope)


class WhoamiRoutes:
    """`GET /api/whoami`: the caller's scope, so the page shows write controls to admins only."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/whoami", self.whoami)]

    async def whoami(self, request: web.Request) -> web.Response:
        return json_response({"scope": request[SCOPE_KEY], "insecure": self.ctx.insecure})


def middleware(ctx: AdminContext) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    limits = Limits(ctx.settings)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            authorise(ctx, limits, request)
            await ctx.follow_attempts()
            return await handler(request)
        except RateLimited as exc:
            return error_response(429, exc.message, {"Retry-After": str(exc.retry_after)})
        except ApiError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="perfex-webhooks"'} if exc.status == 401 else None
            return error_response(exc.status, exc.message, headers)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            if exc.status < 400:
                raise
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            message = {
                404: f"no such route: {request.method} {request.path[:100]} (see docs/openapi.yaml)",
                405: f"{request.method} is not allowed on {request.path[:100]}",
                413: "body over the size limit",
            }.get(exc.status, exc.reason)
            return error_response(exc.status, message, allow)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin API %s %s failed", request.method, request.path)
            return error_response(500, "internal error; see the worker log")

    return guard
