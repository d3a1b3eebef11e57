"""A delivery and its HTTP attempt: the one place a webhook request is built and sent.

Used by every mode (immediate from the fan-out, async and smart from `webhooks.deliveries`) and by
the retry tiers. The body and headers follow SPEC §3.2; redirects are not followed; the response
body is read up to a small cap; connections go through the SSRF-guarded resolver.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import hashlib
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import yarl

from app import __version__
from app.config import Settings
from app.endpoints import Endpoint
from app.events import ChangeEvent
from app.netguard import ForbiddenTarget, GuardedResolver, check_literal_host, target_allowed
from app.signing import build_headers, dumps

_HEADER_SAFE = re.compile(r"[!-~]{1,200}")


def new_delivery_id() -> str:
    return "dlv_" + secrets.token_urlsafe(16)


def delivery_id_for(event_id: str, endpoint_id: str, mode: str, collapsed: int | None = None) -> str:
    """The same id whenever the same event is fanned out to the same endpoint again.

    After a crash the fan-out re-reads events whose offsets were not committed yet; a random id
    would give those duplicates a new idempotency key (SPEC §5: duplicates carry the same id).
    """
    seed = f"{event_id}\x00{endpoint_id}\x00{mode}\x00{collapsed or 0}".encode()
    digest = hashlib.sha256(seed).digest()[:16]
    return "dlv_" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(slots=True)
class Delivery:
    """What travels through webhooks.deliveries, the retry tiers and the DLQ (as compact JSON)."""

    id: str
    endpoint_id: str
    event: str
    event_id: str
    occurred_at: str
    occurred_ts: float
    resource_key: str
    data: dict[str, Any]
    previous: dict[str, Any] | None = None
    collapsed: int | None = None
    mode: str = "async"
    created_at: float = field(default_factory=time.time)
    # Failed attempts since the delivery (re)entered the pipeline: picks the next tier.
    failures: int = 0
    not_before: float | None = None  # from a Retry-After
    attempts: list[dict[str, Any]] = field(default_factory=list)  # whole history, across replays
    replays: int = 0
    # Delivered in its resource's order (app/ordering.py): set on one that leaves the delivery agent
    # for a tier, so the tier that finishes it releases the deliveries held behind it.
    ordered: bool = False

    @classmethod
    def for_event(
        cls, ev: ChangeEvent, endpoint: Endpoint, mode: str, collapsed: int | None = None
    ) -> Delivery:
        return cls(
            id=delivery_id_for(ev.id, endpoint.id, mode, collapsed),
            endpoint_id=endpoint.id,
            event=ev.event,
            event_id=ev.id,
            occurred_at=ev.occurred_at,
            occurred_ts=ev.occurred_ts,
            resource_key=ev.key,
            data=ev.data,
            previous=ev.previous,
            collapsed=collapsed,
            mode=mode,
        )

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "endpoint_id": self.endpoint_id,
            "event": self.event,
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "occurred_ts": self.occurred_ts,
            "resource_key": self.resource_key,
            "data": self.data,
            "previous": self.previous,
            "collapsed": self.collapsed,
            "mode": self.mode,
            "created_at": self.created_at,
            "failures": self.failures,
            "not_before": self.not_before,
            "attempts": self.attempts,
            "replays": self.replays,
            **({"ordered": True} if self.ordered else {}),
        }

    def encode(self, data: orjson.Fragment | None = None) -> bytes:
        """The record as JSON; `data`: the resource already encoded (the fan-out encodes it once per
        event, not once per endpoint)."""
        rec = self.record()
        if data is not None:
            rec["data"] = data
        return orjson.dumps(rec)

    @classmethod
    def decode(cls, raw: bytes | dict[str, Any]) -> Delivery:
        """The delivery a record holds, checked strictly (`validate`): a record the pipeline did not
        write raises `InvalidDelivery` here, before anything could POST it."""
        try:
            d = orjson.loads(raw) if isinstance(raw, (bytes, bytearray, memoryview, str)) else raw
        except orjson.JSONDecodeError as exc:
            raise InvalidDelivery(f"not JSON: {exc}") from exc
        validate(d)
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})  # type: ignore[attr-defined]

    def body(self, timestamp: int, fmt: str = "perfexapi") -> bytes:
        """The request body in the endpoint's format (SPEC §3.2), compact JSON n8n can round-trip.

        ``perfexapi``: the resource under ``payload`` (what the product page's receiver snippet reads)
        beside the delivery's id, event, times and, when present, ``previous`` and ``collapsed``.
        ``standard``: Standard Webhooks' recommended ``{"type", "timestamp", "data"}``; the delivery id,
        event id and ``collapsed`` travel in headers (`format_headers`), ``previous`` is not sent.
        """
        if fmt == "standard":
            return dumps({"type": self.event, "timestamp": self.occurred_at, "data": self.data})
        doc: dict[str, Any] = {
            "id": self.id,
            "event": self.event,
            "event_id": self.event_id,
            "timestamp": timestamp,
            "occurred_at": self.occurred_at,
            "payload": self.data,
        }
        if self.previous is not None:
            doc["previous"] = self.previous
        if self.collapsed and self.collapsed > 1:
            doc["collapsed"] = self.collapsed
        return dumps(doc)

    def format_headers(self, fmt: str) -> dict[str, str]:
        """Headers carrying what the ``standard`` body leaves out (none for ``perfexapi``)."""
        if fmt != "standard":
            return {}
        extra = {}
        # Event ids come from producers: send one only if it is a safe header value.
        if _HEADER_SAFE.fullmatch(self.event_id):
            extra["X-PerfexAPI-Event-Id"] = self.event_id
        if self.collapsed and self.collapsed > 1:
            extra["X-PerfexAPI-Collapsed"] = str(int(self.collapsed))
        return extra


class InvalidDelivery(ValueError):
    """A record on webhooks.deliveries or a tier that is not a delivery the pipeline wrote."""


_STR = (str,)
_NUM = (int, float)
# field -> (accepted types, required). bool is an int in Python: refused separately below.
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": (_STR, True),
    "endpoint_id": (_STR, True),
    "event": (_STR, True),
    "event_id": (_STR, True),
    "occurred_at": (_STR, True),
    "occurred_ts": (_NUM, True),
    "resource_key": (_STR, True),
    "data": ((dict,), True),
    "previous": ((dict, type(None)), False),
    "collapsed": ((int, type(None)), False),
    "mode": (_STR, False),
    "created_at": (_NUM, False),
    "failures": ((int,), False),
    "not_before": ((int, float, type(None)), False),
    "attempts": ((list,), False),
    "replays": ((int,), False),
    "ordered": ((bool,), False),
    # Written by a replay (route.replay_record), read by nothing but people.
    "replayed_at": (_NUM, False),
}
MODES = ("immediate", "async", "smart")
# The same table for the hot path (every record the delivery agent and the tiers read): a field's
# value is accepted at once when its exact type is one of these (what orjson produces); anything
# else (a subclass, a bool where a number goes, a wrong type) gets the full check above.
_EXACT = tuple(
    (name, frozenset(types), required, types is _STR)
    for name, (types, required) in _FIELDS.items()
)
_MISSING = object()


def validate(d: Any) -> None:
    """Raise `InvalidDelivery` unless `d` has every field of a delivery with its type (strictly: no
    number as a string, no bool as a number). Fields it does not know are ignored: a newer worker
    may write more during a rolling upgrade."""
    if not isinstance(d, dict):
        raise InvalidDelivery(f"not a JSON object but {type(d).__name__}")
    get = d.get
    for name, exact, required, nonempty in _EXACT:
        v = get(name, _MISSING)
        if v is _MISSING:
            if required:
                raise InvalidDelivery(f"{name} is missing")
        elif type(v) not in exact or (nonempty and not v):
            _check_field(name, v)
    if get("mode", "async") not in MODES:
        raise InvalidDelivery(f"mode {str(d['mode'])[:20]!r} is not one of {', '.join(MODES)}")
    if get("failures", 0) < 0 or get("replays", 0) < 0:
        raise InvalidDelivery("failures and replays cannot be negative")
    attempts = get("attempts")
    if attempts and not all(isinstance(a, dict) for a in attempts):
        raise InvalidDelivery("attempts holds something other than objects")


def _check_field(name: str, v: Any) -> None:
    """The full check of one present field (the exact-type test in `validate` did not accept it)."""
    types, _ = _FIELDS[name]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise InvalidDelivery(f"{name} is {type(v).__name__}, not {'/'.join(t.__name__ for t in types)}")
    if types is _STR and not v:
        raise InvalidDelivery(f"{name} is empty")


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int
    at: float
    outcome: str  # success | http_error | gone | timeout | connect_error | tls_error | forbidden | error
    status: int | None
    latency_ms: float
    error: str | None = None
    retry_after: float | None = None  # seconds, from a 429/503 Retry-After
    # The request as sent (references, no copy), for the attempt log's delivery detail only: it is
    # not in record(), so it never grows a delivery's own history.
    sent_headers: dict[str, str] | None = None
    sent_body: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "success"

    @property
    def request(self) -> dict[str, Any] | None:
        """The request as sent, bounded (see `request_record`); None if it was never built."""
        if self.sent_headers is None or self.sent_body is None:
            return None
        return request_record(self.sent_headers, self.sent_body)

    def record(self) -> dict[str, Any]:
        return {
            "n": self.number,
            "at": round(self.at, 3),
            "outcome": self.outcome,
            "status": self.status,
            "latency_ms": round(self.latency_ms, 2),
            "error": self.error,
        }


REQUEST_BODY_CAP = 2048  # bytes of a request body kept in the attempt log


def request_record(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    return {
        "headers": headers,
        "body": body[:REQUEST_BODY_CAP].decode("utf-8", "ignore"),
        "body_bytes": len(body),
        "truncated": len(body) > REQUEST_BODY_CAP,
    }


@functools.lru_cache(maxsize=4096)
def _parsed_url(url: str) -> yarl.URL:
    # Endpoint URLs are few and reused for every delivery: parse each once, not per request.
    return yarl.URL(url)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped at 24 h."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), 86400.0)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when - now), 86400.0)


class HttpSender:
    """The aiohttp session of a worker. One per process; connections are pooled per host."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_in_flight * 2,
            limit_per_host=0,
            resolver=GuardedResolver(self.settings.allow_private_targets, self.settings.allowed_targets),
            ttl_dns_cache=30,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.settings.delivery_timeout),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def attempt(self, delivery: Delivery, endpoint: Endpoint) -> Attempt:
        """One signed POST. Never raises: every failure becomes an Attempt outcome."""
        assert self._session is not None, "HttpSender.start() first"
        number = len(delivery.attempts) + 1
        started = time.time()
        t0 = time.perf_counter()
        ts = int(started)
        status: int | None = None
        retry_after = None
        headers: dict[str, str] | None = None
        body: bytes | None = None
        try:
            fmt = endpoint.format
            body = delivery.body(ts, fmt)
            headers = build_headers(
                body,
                delivery_id=delivery.id,
                event=delivery.event,
                timestamp=ts,
                attempt=number,
                secrets=endpoint.secrets_now(started),
                version=__version__,
            )
            headers.update(delivery.format_headers(fmt))
            url = _parsed_url(endpoint.url)
            allow = self.settings.allow_private_targets or target_allowed(
                url.host, url.port, self.settings.allowed_targets
            )
            check_literal_host(url.host or "", allow)
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                # Read at most a small cap: the body only matters for the attempt log.
                snippet = await resp.content.read(self.settings.response_body_cap)
                if 200 <= status < 300:
                    outcome, error = "success", None
                elif status == 410:
                    outcome, error = "gone", "410 Gone"
                else:
                    outcome = "http_error"
                    error = f"HTTP {status}: " + snippet[:200].decode("utf-8", "replace")
                    if status in (429, 503):
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"), started)
        except TimeoutError:
            outcome, error = "timeout", f"no answer within {self.settings.delivery_timeout:g}s"
        except ForbiddenTarget as exc:
            outcome, error = "forbidden", str(exc)
        except aiohttp.ClientConnectorCertificateError as exc:
            outcome, error = "tls_error", str(exc)[:300]
        except aiohttp.ClientSSLError as exc:
            outcome, error = "tls_error", str(exc)[:300]
        except ssl.SSLError as exc:
            outcome, error = "tls_error", str(exc)[:300]
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error
            if isinstance(cause, ForbiddenTarget):
                outcome, error = "forbidden", str(cause)
            else:
                outcome, error = "connect_error", str(exc)[:300]
        except (aiohttp.ClientError, OSError) as exc:
            outcome, error = "connect_error", f"{type(exc).__name__}: {exc}"[:300]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or hostile data must not kill the worker
            outcome, error = "error", f"{type(exc).__name__}: {exc}"[:300]
        return Attempt(
            number=number,
            at=started,
            outcome=outcome,
            status=status,
            latency_ms=(time.perf_counter() - t0) * 1000,
            error=error,
            retry_after=retry_after,
            sent_headers=headers,
            sent_body=body,
        )
