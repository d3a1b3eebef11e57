"""Request and response helpers of the admin API: JSON responses, and input checks that turn every
bad input into an `ApiError` with a reason (a 4xx JSON `{"error": "..."}`, never a 500)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from app.config import ConfigError, parse_duration
from app.endpoints import MAX_GRACE
from app.events import InvalidEvent, parse_rfc3339


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status, headers)


async def read_body(request: web.Request, *, optional: bool = False, expected: str = "a JSON object") -> Any:
    """The request's JSON, whatever its type (an empty body is {} when optional)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, "body over the size limit") from exc
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, f"body: expected {expected}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON ({exc})") from exc


async def read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    doc = await read_body(request, optional=optional)
    if not isinstance(doc, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(doc).__name__}")
    return doc


_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def check_fields(
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


def time_value(value: Any, name: str) -> float | None:
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


def int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
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


def bool_query(request: web.Request, name: str) -> bool:
    text = (request.query.get(name) or "false").strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name}: expected true or false")
    return text in ("true", "1")


def grace_seconds(value: Any) -> float:
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
