"""A Python client for the admin API (`/api` of any worker), on httpx: `Client` and `AsyncClient`.

For operators and scripts without Kafka access: manage endpoints, read attempts, list and replay
the DLQ, post change events. Answers are typed (`Endpoint`, `Attempt`, `DlqEntry`,
`ReplayResult`); failures are named exceptions (`AuthError`, `NotFound`, `BadRequest`,
`Unavailable`, `TransportError`, all `ClientError`). A 429 or 503 is retried, no sooner than its
`Retry-After` asks (capped at `max_wait`), `retries` times; DLQ listings are fetched page by page.

    from app.client import Client
    with Client("http://localhost:6066", token) as api:
        ep = api.create_endpoint("https://n8n.example.com/webhook/x", ["invoice.*"], mode="smart")
        print(ep.id, ep.secret)  # the secret is only in create and rotate answers
        for entry in api.dlq(endpoint=ep.id):
            api.replay(entry.delivery_id)
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

import httpx

from app import __version__

__all__ = [
    "AsyncClient",
    "Attempt",
    "AuthError",
    "BadRequest",
    "Client",
    "ClientError",
    "DlqEntry",
    "Endpoint",
    "NotFound",
    "ReplayResult",
    "TransportError",
    "Unavailable",
]

T = TypeVar("T")
RETRY_STATUSES = (429, 503)


# ---- errors ------------------------------------------------------------------------------------------
class ClientError(Exception):
    """Any failure of an admin API call; `status` is the HTTP status (None without an answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AuthError(ClientError):
    """401: no token, or the wrong one."""


class NotFound(ClientError):
    """404: no such endpoint, delivery or DLQ entry."""


class BadRequest(ClientError):
    """4xx other than 401/404: the input was refused; the message says why."""


class Unavailable(ClientError):
    """429/503 still after the retries (Kafka did not acknowledge, a view is loading), or a 5xx."""


class TransportError(ClientError):
    """The worker could not be reached or did not answer in time."""


def _error(status: int, message: str) -> ClientError:
    if status == 401:
        return AuthError(message, status)
    if status == 404:
        return NotFound(message, status)
    if 400 <= status < 500 and status != 429:
        return BadRequest(message, status)
    return Unavailable(message, status)


# ---- models ------------------------------------------------------------------------------------------
def _build(cls: type[T], doc: dict[str, Any]) -> T:
    """A model from an API object: known fields only, so a newer worker's extra fields do no harm."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass(frozen=True)
class Attempt:
    delivery_id: str | None = None
    endpoint_id: str | None = None
    event: str | None = None
    mode: str | None = None
    n: int = 0
    at: float = 0.0
    outcome: str = ""
    status: int | None = None
    latency_ms: float = 0.0
    error: str | None = None
    # The request as sent ({"headers", "body", "body_bytes", "truncated"}): failed attempts and test
    # deliveries, from delivery_attempts(), while the worker holds it.
    request: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "success"


@dataclass(frozen=True)
class Endpoint:
    id: str
    url: str
    events: list[str]
    mode: str
    enabled: bool
    format: str = "perfexapi"
    ordering: str = "none"
    description: str = ""
    disabled_reason: str | None = None
    grace_secret_active: bool = False
    grace_expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    failure_streak: int = 0
    filter: dict[str, Any] | None = None
    max_rate: float | None = None
    last_attempt: Attempt | None = None
    breaker: dict[str, Any] | None = None  # the answering worker's circuit breaker (app/breaker.py)
    parked: int = 0  # replayable DLQ entries of this endpoint
    replayed: int | None = None  # from enable_endpoint(..., replay=True)
    secret: str | None = field(default=None, repr=False)  # only from create and rotate

    @classmethod
    def from_api(cls, doc: dict[str, Any]) -> Endpoint:
        ep = _build(cls, doc)
        last = doc.get("last_attempt")
        return _replace(ep, last_attempt=_build(Attempt, last) if isinstance(last, dict) else None)


@dataclass(frozen=True)
class DlqEntry:
    delivery_id: str
    endpoint_id: str | None = None
    event: str | None = None
    event_id: str | None = None
    resource: str | None = None
    reason: str | None = None
    dead_at: float = 0.0
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    replays: int = 0
    replayable: bool = True
    history: list[Attempt] = field(default_factory=list)  # only from dlq_entry()
    data: dict[str, Any] | None = None  # the resource, only from dlq_entry()
    previous: dict[str, Any] | None = None

    @classmethod
    def from_api(cls, doc: dict[str, Any]) -> DlqEntry:
        entry = _build(cls, doc)
        return _replace(entry, history=[_build(Attempt, a) for a in doc.get("history") or []])


@dataclass(frozen=True)
class ReplayResult:
    replayed: int = 0
    delivery_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False


def _replace(obj: T, **kw: Any) -> T:
    import dataclasses

    return dataclasses.replace(obj, **kw)  # type: ignore[type-var]


# ---- calls: one description per operation, run by either client ----------------------------------------
@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, Any] | None = None
    json: Any = None


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _dlq_page(doc: dict[str, Any]) -> tuple[int, list[DlqEntry]]:
    return int(doc.get("total") or 0), [DlqEntry.from_api(e) for e in doc.get("entries") or []]


class _Calls:
    """What each operation sends and how its answer is read; shared by Client and AsyncClient."""

    @staticmethod
    def list_endpoints() -> Call[list[Endpoint]]:
        return Call("GET", "/api/endpoints", lambda d: [Endpoint.from_api(e) for e in d["endpoints"]])

    @staticmethod
    def get_endpoint(ep_id: str) -> Call[Endpoint]:
        return Call("GET", f"/api/endpoints/{ep_id}", Endpoint.from_api)

    @staticmethod
    def create_endpoint(
        url: str,
        events: str | list[str],
        mode: str,
        format: str,
        secret: str | None,
        description: str,
        enabled: bool,
        filter: dict[str, Any] | None = None,
        max_rate: float | str | None = None,
        ordering: str = "none",
    ) -> Call[Endpoint]:
        body = _clean(
            {
                "ordering": ordering,
                "url": url,
                "events": events,
                "mode": mode,
                "format": format,
                "secret": secret,
                "description": description,
                "enabled": enabled,
                "filter": filter,
                "max_rate": max_rate,
            }
        )
        return Call("POST", "/api/endpoints", Endpoint.from_api, json=body)

    @staticmethod
    def update_endpoint(ep_id: str, changes: dict[str, Any]) -> Call[Endpoint]:
        return Call("PATCH", f"/api/endpoints/{ep_id}", Endpoint.from_api, json=_clean(changes))

    @staticmethod
    def set_enabled(ep_id: str, enabled: bool, replay: bool = False) -> Call[Endpoint]:
        action = "enable" if enabled else "disable"
        params = {"replay": "true"} if replay else None
        return Call("POST", f"/api/endpoints/{ep_id}/{action}", Endpoint.from_api, params=params)

    @staticmethod
    def breaker(ep_id: str) -> Call[dict[str, Any]]:
        return Call("GET", f"/api/endpoints/{ep_id}/breaker", dict)

    @staticmethod
    def delete_endpoint(ep_id: str) -> Call[None]:
        return Call("DELETE", f"/api/endpoints/{ep_id}", lambda _d: None)

    @staticmethod
    def rotate_secret(ep_id: str, grace: str | float, secret: str | None) -> Call[Endpoint]:
        body = _clean({"grace": grace, "secret": secret})
        return Call("POST", f"/api/endpoints/{ep_id}/rotate-secret", Endpoint.from_api, json=body)

    @staticmethod
    def attempts(endpoint: str | None, limit: int) -> Call[list[Attempt]]:
        return Call(
            "GET",
            "/api/attempts",
            lambda d: [_build(Attempt, a) for a in d["attempts"]],
            params=_clean({"endpoint": endpoint, "limit": limit}),
        )

    @staticmethod
    def delivery_attempts(delivery_id: str) -> Call[list[Attempt]]:
        return Call(
            "GET",
            f"/api/deliveries/{delivery_id}/attempts",
            lambda d: [_build(Attempt, a) for a in d["attempts"]],
        )

    @staticmethod
    def dlq_page(flt: dict[str, Any], offset: int, limit: int) -> Call[tuple[int, list[DlqEntry]]]:
        return Call("GET", "/api/dlq", _dlq_page, params=_clean({**flt, "offset": offset, "limit": limit}))

    @staticmethod
    def dlq_entry(delivery_id: str) -> Call[DlqEntry]:
        return Call("GET", f"/api/dlq/{delivery_id}", DlqEntry.from_api)

    @staticmethod
    def replay(delivery_id: str) -> Call[ReplayResult]:
        return Call("POST", f"/api/dlq/{delivery_id}/replay", lambda d: _build(ReplayResult, d))

    @staticmethod
    def replay_all(flt: dict[str, Any], dry_run: bool) -> Call[ReplayResult]:
        def parse(d: dict[str, Any]) -> ReplayResult:
            if d.get("dry_run"):
                return ReplayResult(delivery_ids=list(d["would_replay"]), skipped=d["skipped"], dry_run=True)
            return _build(ReplayResult, d)

        return Call("POST", "/api/dlq/replay", parse, json=_clean({**flt, "dry_run": dry_run or None}))

    @staticmethod
    def send_event(
        event: str, resource_id: str, data: dict[str, Any] | None, previous: dict[str, Any] | None
    ) -> Call[str]:
        body = _clean({"event": event, "resource_id": resource_id, "data": data, "previous": previous})
        return Call("POST", "/api/events", lambda d: str(d["id"]), json=body)


def _dlq_filter(endpoint: str | None, event: str | None, since: Any, until: Any) -> dict[str, Any]:
    return _clean({"endpoint": endpoint, "event": event, "since": since, "until": until})


def retry_after(value: str | None, attempt: int, max_wait: float, now: float | None = None) -> float:
    """Seconds to wait before retry `attempt` (1-based): the Retry-After (seconds or HTTP date) when
    given, else a short exponential backoff; never more than `max_wait`."""
    delay = min(0.5 * 2 ** (attempt - 1), 8.0)
    if value:
        text = value.strip()
        if text.isdigit():
            delay = float(text)
        else:
            try:
                when = email.utils.parsedate_to_datetime(text).timestamp()
                delay = max(0.0, when - (time.time() if now is None else now))
            except (TypeError, ValueError):
                pass
    return min(delay, max_wait)


class _Base:
    def __init__(self, base_url: str, token: str | None, retries: int, max_wait: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.max_wait = max_wait
        self.headers = {"User-Agent": f"perfex-webhooks-client/{__version__}", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def _result(self, call: Call[T], resp: httpx.Response) -> T:
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.is_success:
            if doc is None:
                raise Unavailable(f"{call.method} {call.path}: the answer is not JSON", resp.status_code)
            return call.parse(doc)
        message = doc.get("error") if isinstance(doc, dict) else None
        raise _error(resp.status_code, f"{call.method} {call.path}: {message or resp.reason_phrase}")


# ---- the clients --------------------------------------------------------------------------------------
class Client(_Base):
    """Synchronous client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        max_wait: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, retries, max_wait)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: Call[T]) -> T:
        for attempt in range(1, self.retries + 2):
            try:
                resp = self._http.request(call.method, call.path, params=call.params, json=call.json)
            except httpx.HTTPError as exc:
                raise TransportError(f"{call.method} {self.base_url}{call.path}: {exc}") from exc
            if resp.status_code in RETRY_STATUSES and attempt <= self.retries:
                time.sleep(retry_after(resp.headers.get("Retry-After"), attempt, self.max_wait))
                continue
            return self._result(call, resp)
        raise AssertionError("unreachable")  # the loop returns or raises

    # endpoints
    def list_endpoints(self) -> list[Endpoint]:
        return self._run(_Calls.list_endpoints())

    def get_endpoint(self, endpoint_id: str) -> Endpoint:
        return self._run(_Calls.get_endpoint(endpoint_id))

    def create_endpoint(
        self,
        url: str,
        events: str | list[str],
        *,
        mode: str = "async",
        format: str = "perfexapi",
        secret: str | None = None,
        description: str = "",
        enabled: bool = True,
        filter: dict[str, Any] | None = None,
        max_rate: float | str | None = None,
        ordering: str = "none",
    ) -> Endpoint:
        return self._run(
            _Calls.create_endpoint(url, events, mode, format, secret, description, enabled, filter, max_rate, ordering=ordering)
        )

    def update_endpoint(self, endpoint_id: str, **changes: Any) -> Endpoint:
        return self._run(_Calls.update_endpoint(endpoint_id, changes))

    def enable_endpoint(self, endpoint_id: str, replay: bool = False) -> Endpoint:
        """Enable; `replay=True` also replays its parked (DLQ) deliveries (`Endpoint.replayed`)."""
        return self._run(_Calls.set_enabled(endpoint_id, True, replay))

    def breaker(self, endpoint_id: str) -> dict[str, Any]:
        """The answering worker's circuit breaker of the endpoint."""
        return self._run(_Calls.breaker(endpoint_id))

    def disable_endpoint(self, endpoint_id: str) -> Endpoint:
        return self._run(_Calls.set_enabled(endpoint_id, False))

    def delete_endpoint(self, endpoint_id: str) -> None:
        self._run(_Calls.delete_endpoint(endpoint_id))

    def rotate_secret(
        self, endpoint_id: str, grace: str | float = "24h", secret: str | None = None
    ) -> Endpoint:
        return self._run(_Calls.rotate_secret(endpoint_id, grace, secret))

    # attempts
    def attempts(self, endpoint: str | None = None, limit: int = 100) -> list[Attempt]:
        return self._run(_Calls.attempts(endpoint, limit))

    def delivery_attempts(self, delivery_id: str) -> list[Attempt]:
        return self._run(_Calls.delivery_attempts(delivery_id))

    # DLQ
    def iter_dlq(
        self,
        endpoint: str | None = None,
        event: str | None = None,
        since: float | str | None = None,
        until: float | str | None = None,
        page_size: int = 100,
    ) -> Iterator[DlqEntry]:
        """Every matching entry, newest first, fetched `page_size` at a time."""
        flt, offset = _dlq_filter(endpoint, event, since, until), 0
        while True:
            total, rows = self._run(_Calls.dlq_page(flt, offset, page_size))
            yield from rows
            offset += len(rows)
            if not rows or offset >= total:
                return

    def dlq(self, **kw: Any) -> list[DlqEntry]:
        return list(self.iter_dlq(**kw))

    def dlq_entry(self, delivery_id: str) -> DlqEntry:
        return self._run(_Calls.dlq_entry(delivery_id))

    def replay(self, delivery_id: str) -> ReplayResult:
        return self._run(_Calls.replay(delivery_id))

    def replay_all(
        self,
        endpoint: str | None = None,
        event: str | None = None,
        since: float | str | None = None,
        until: float | str | None = None,
        dry_run: bool = False,
    ) -> ReplayResult:
        return self._run(_Calls.replay_all(_dlq_filter(endpoint, event, since, until), dry_run))

    # events
    def send_event(
        self,
        event: str,
        resource_id: str,
        data: dict[str, Any] | None = None,
        previous: dict[str, Any] | None = None,
    ) -> str:
        """Post a change event (`POST /api/events`); returns its id."""
        return self._run(_Calls.send_event(event, resource_id, data, previous))


class AsyncClient(_Base):
    """The same operations as `Client`, awaitable. Use `async with`, or `await aclose()`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        max_wait: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, retries, max_wait)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, call: Call[T]) -> T:
        for attempt in range(1, self.retries + 2):
            try:
                resp = await self._http.request(call.method, call.path, params=call.params, json=call.json)
            except httpx.HTTPError as exc:
                raise TransportError(f"{call.method} {self.base_url}{call.path}: {exc}") from exc
            if resp.status_code in RETRY_STATUSES and attempt <= self.retries:
                await asyncio.sleep(retry_after(resp.headers.get("Retry-After"), attempt, self.max_wait))
                continue
            return self._result(call, resp)
        raise AssertionError("unreachable")

    async def list_endpoints(self) -> list[Endpoint]:
        return await self._run(_Calls.list_endpoints())

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        return await self._run(_Calls.get_endpoint(endpoint_id))

    async def create_endpoint(
        self,
        url: str,
        events: str | list[str],
        *,
        mode: str = "async",
        format: str = "perfexapi",
        secret: str | None = None,
        description: str = "",
        enabled: bool = True,
        filter: dict[str, Any] | None = None,
        max_rate: float | str | None = None,
        ordering: str = "none",
    ) -> Endpoint:
        return await self._run(
            _Calls.create_endpoint(url, events, mode, format, secret, description, enabled, filter, max_rate, ordering=ordering)
        )

    async def update_endpoint(self, endpoint_id: str, **changes: Any) -> Endpoint:
        return await self._run(_Calls.update_endpoint(endpoint_id, changes))

    async def enable_endpoint(self, endpoint_id: str, replay: bool = False) -> Endpoint:
        return await self._run(_Calls.set_enabled(endpoint_id, True, replay))

    async def breaker(self, endpoint_id: str) -> dict[str, Any]:
        return await self._run(_Calls.breaker(endpoint_id))

    async def disable_endpoint(self, endpoint_id: str) -> Endpoint:
        return await self._run(_Calls.set_enabled(endpoint_id, False))

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self._run(_Calls.delete_endpoint(endpoint_id))

    async def rotate_secret(
        self, endpoint_id: str, grace: str | float = "24h", secret: str | None = None
    ) -> Endpoint:
        return await self._run(_Calls.rotate_secret(endpoint_id, grace, secret))

    async def attempts(self, endpoint: str | None = None, limit: int = 100) -> list[Attempt]:
        return await self._run(_Calls.attempts(endpoint, limit))

    async def delivery_attempts(self, delivery_id: str) -> list[Attempt]:
        return await self._run(_Calls.delivery_attempts(delivery_id))

    async def iter_dlq(
        self,
        endpoint: str | None = None,
        event: str | None = None,
        since: float | str | None = None,
        until: float | str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[DlqEntry]:
        flt, offset = _dlq_filter(endpoint, event, since, until), 0
        while True:
            total, rows = await self._run(_Calls.dlq_page(flt, offset, page_size))
            for row in rows:
                yield row
            offset += len(rows)
            if not rows or offset >= total:
                return

    async def dlq(self, **kw: Any) -> list[DlqEntry]:
        return [e async for e in self.iter_dlq(**kw)]

    async def dlq_entry(self, delivery_id: str) -> DlqEntry:
        return await self._run(_Calls.dlq_entry(delivery_id))

    async def replay(self, delivery_id: str) -> ReplayResult:
        return await self._run(_Calls.replay(delivery_id))

    async def replay_all(
        self,
        endpoint: str | None = None,
        event: str | None = None,
        since: float | str | None = None,
        until: float | str | None = None,
        dry_run: bool = False,
    ) -> ReplayResult:
        return await self._run(_Calls.replay_all(_dlq_filter(endpoint, event, since, until), dry_run))

    async def send_event(
        self,
        event: str,
        resource_id: str,
        data: dict[str, Any] | None = None,
        previous: dict[str, Any] | None = None,
    ) -> str:
        return await self._run(_Calls.send_event(event, resource_id, data, previous))
