"""The input contract (SPEC §3.1): building and parsing change events on `crm.events`.

`parse_event` is the single gate every record passes before fan-out: anything that is not a valid
envelope raises `InvalidEvent` with a short machine reason (a bounded metric label) and a human
detail, and the caller parks the record on `crm.events.invalid`.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from app.catalog import Catalog, load_catalog

MAX_DEPTH = 32  # Perfex resources are shallow; deep nesting is hostile input (and orjson caps at 254)
REQUIRED = ("id", "event", "occurred_at", "resource_id", "data")

# Reasons are metric labels: keep this set closed.
REASONS = (
    "too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "unknown_event",
    "bad_timestamp",
    "too_deep",
    "missing_key",
    "key_mismatch",
)


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    id: str
    event: str
    occurred_at: str
    occurred_ts: float  # epoch seconds of occurred_at, for end-to-end latency
    resource: str
    resource_id: str
    data: dict[str, Any]
    previous: dict[str, Any] | None

    @property
    def key(self) -> str:
        return resource_key(self.resource, self.resource_id)


def resource_key(resource: str, resource_id: str) -> str:
    return f"{resource}:{resource_id}"


def new_event_id() -> str:
    return "evt_" + secrets.token_urlsafe(16)


_SECOND: tuple[int, str] = (-1, "")  # the last whole second formatted (strftime is dear: per event)


def now_rfc3339(ts: float | None = None) -> str:
    """`ts` (default: now) as RFC 3339 UTC with milliseconds, e.g. 2026-11-28T02:06:27.123Z."""
    global _SECOND
    frac, whole = math.modf(time.time() if ts is None else ts)  # as datetime.fromtimestamp rounds
    micros, second = round(frac * 1_000_000), int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    if _SECOND[0] != second:
        _SECOND = (second, datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{_SECOND[1]}{micros // 1000:03d}Z"


def parse_rfc3339(text: str) -> float:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise InvalidEvent("bad_timestamp", f"occurred_at {text[:40]!r} is not RFC 3339") from exc
    if dt.tzinfo is None:
        raise InvalidEvent("bad_timestamp", "occurred_at needs a timezone (use Z for UTC)")
    return dt.timestamp()


def build_event(
    event: str,
    resource_id: str | int,
    data: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    occurred_at: str | None = None,
    catalog: Catalog | None = None,
) -> tuple[str, dict[str, Any]]:
    """Validate and build one envelope; returns (kafka key, value). Raises InvalidEvent."""
    cat = catalog or load_catalog()
    if event not in cat:
        raise InvalidEvent(
            "unknown_event", f"{event!r} is not in the catalog (see `perfex-webhooks catalog`)"
        )
    rid = str(resource_id).strip() if resource_id is not None else ""
    if not rid:
        raise InvalidEvent("missing_field", "resource_id is required")
    if data is None:
        data = {"id": rid}
    if not isinstance(data, dict):
        raise InvalidEvent("wrong_type", "data must be a JSON object")
    if previous is not None and not isinstance(previous, dict):
        raise InvalidEvent("wrong_type", "previous must be a JSON object")
    value: dict[str, Any] = {
        "id": event_id or new_event_id(),
        "event": event,
        "occurred_at": occurred_at or now_rfc3339(),
        "resource_id": rid,
        "data": data,
    }
    if previous is not None:
        value["previous"] = previous
    return resource_key(cat.resource_of(event), rid), value


def _depth_ok(obj: Any, limit: int = MAX_DEPTH) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        cur, d = stack.pop()
        if d > limit:
            return False
        if isinstance(cur, dict):
            stack.extend((v, d + 1) for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            stack.extend((v, d + 1) for v in cur if isinstance(v, (dict, list)))
    return True


def parse_event(
    key: bytes | None,
    value: bytes | None,
    *,
    max_bytes: int = 1_000_000,
    catalog: Catalog | None = None,
) -> ChangeEvent:
    """Validate one raw `crm.events` record; raises InvalidEvent with a reason."""
    cat = catalog or load_catalog()
    if value is None:
        raise InvalidEvent("not_json", "empty record (null value)")
    if len(value) > max_bytes:
        raise InvalidEvent("too_large", f"{len(value)} bytes over the {max_bytes}-byte limit")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        # orjson reports nesting past its limit as "recursion limit" or "depth limit exceeded".
        if "recursion" in msg.lower() or "depth limit" in msg.lower():
            raise InvalidEvent("too_deep", "JSON nested too deeply") from exc
        if "utf-8" in msg.lower() or "surrogate" in msg.lower():
            raise InvalidEvent("not_utf8", msg[:200]) from exc
        raise InvalidEvent("not_json", msg[:200]) from exc
    if not isinstance(doc, dict):
        raise InvalidEvent("not_object", f"expected a JSON object, got {type(doc).__name__}")
    missing = [f for f in REQUIRED if f not in doc or doc[f] is None or doc[f] == ""]
    if missing:
        raise InvalidEvent("missing_field", "missing " + ", ".join(missing))
    for f in ("id", "event", "occurred_at"):
        if not isinstance(doc[f], str):
            raise InvalidEvent("wrong_type", f"{f} must be a string")
    rid = doc["resource_id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise InvalidEvent("wrong_type", "resource_id must be a string")
    rid = str(rid)
    if not isinstance(doc["data"], dict):
        raise InvalidEvent("wrong_type", "data must be a JSON object")
    prev = doc.get("previous")
    if prev is not None and not isinstance(prev, dict):
        raise InvalidEvent("wrong_type", "previous must be a JSON object or absent")
    name = doc["event"]
    if name not in cat:
        raise InvalidEvent("unknown_event", f"{name[:100]!r} is not in the catalog")
    # Nesting deeper than MAX_DEPTH needs more than MAX_DEPTH opening brackets in the raw bytes (those
    # in strings only add to the count): a flat Perfex record skips the walk, a fifth of the gate's
    # CPU per event (docs/performance.md).
    if value.count(b"{") + value.count(b"[") > MAX_DEPTH and not _depth_ok(doc):
        raise InvalidEvent("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")
    # The limit holds for what we write too: `1e15` re-encodes as `1000000000000000.0`, so a record
    # under the limit as sent could yield delivery records (deliveries, tiers, DLQ) over the topics'.
    if len(value) * 4 > max_bytes and len(orjson.dumps(doc)) > max_bytes:
        raise InvalidEvent("too_large", f"over the {max_bytes}-byte limit once re-encoded")
    ts = parse_rfc3339(doc["occurred_at"])
    resource = cat.resource_of(name)
    if key is None:
        raise InvalidEvent("missing_key", f"record has no key; expected {resource}:{rid}")
    expected = resource_key(resource, rid)
    if key != expected.encode():
        shown = key[:80].decode("utf-8", "replace")
        raise InvalidEvent("key_mismatch", f"key {shown!r} should be {expected!r}")
    return ChangeEvent(
        id=doc["id"],
        event=name,
        occurred_at=doc["occurred_at"],
        occurred_ts=ts,
        resource=resource,
        resource_id=rid,
        data=doc["data"],
        previous=prev,
    )
