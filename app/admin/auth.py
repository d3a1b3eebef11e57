"""Who may call the admin API: the bearer token check and the middleware that turns every failure
into a JSON error (never the request body in a log line: it may hold a secret)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.admin.context import AdminContext, log
from app.admin.http import ApiError, error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorised(ctx: AdminContext, request: web.Request) -> bool:
    token = ctx.settings.admin_token
    if not token:
        return ctx.insecure
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode("utf-8"))


def middleware(ctx: AdminContext) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if not authorised(ctx, request):
                raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            await ctx.follow_attempts()
            return await handler(request)
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
