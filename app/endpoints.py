"""Endpoint registry: the compacted `webhooks.endpoints` topic, one record per endpoint id.

Workers follow the topic (`Registry`), the CLI reads it whole (`read_endpoints`); both write through
Kafka, so every worker and the CLI act on the same state. Secrets are stored in the record (the
workers sign with them), sealed with `WEBHOOKS_SECRETS_KEY` when it is set (app/secretbox.py; the
`Endpoint` in memory holds them in clear), and leave this module only through
`Endpoint.secrets_now()`; listings use `public()`, which omits them; the repr hides them.
"""

from __future__ import annotations

import functools
import logging
import secrets as _secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from app import filters, route, throttle
from app.catalog import load_catalog, matches
from app.config import Settings
from app.netguard import validate_url
from app.secretbox import SecretBox, SecretsKeyError, box_for, open_value
from app.signing import SECRET_PREFIX, generate_secret, whsec_key

MODES = ("immediate", "smart", "async")
ORDERINGS = ("none", "resource")  # resource: one resource's deliveries arrive in event order (app/ordering.py)
FORMATS = ("perfexapi", "standard")  # body shape (SPEC §3.2); perfexapi is the product page's
MIN_SECRET = 16
MAX_SECRET = 1024
MAX_GRACE = 24 * 3600.0
log = logging.getLogger(__name__)


def new_endpoint_id() -> str:
    return "ep_" + _secrets.token_hex(8)


@dataclass(frozen=True)
class Endpoint:
    id: str
    url: str
    events: tuple[str, ...]
    mode: str
    secret: str = field(repr=False)  # never in a repr, log line or error message
    enabled: bool = True
    description: str = ""
    grace_secret: str | None = field(default=None, repr=False)
    grace_expires_at: float | None = None
    disabled_reason: str | None = None
    format: str = "perfexapi"
    ordering: str = "none"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    version: int = 0  # as read from the registry; a write stores version + 1 (RegistryState)
    # Content filter over the delivery body (app/filters.py); None: every subscribed event.
    filter: dict[str, Any] | None = field(default=None, hash=False)
    max_rate: float | None = None  # deliveries/s over all workers (app/throttle.py); None: no limit

    def secrets_now(self, now: float | None = None) -> list[str]:
        """Live secrets, primary first; the grace secret expires by itself at grace_expires_at."""
        now = time.time() if now is None else now
        live = [self.secret]
        if self.grace_secret and self.grace_expires_at and now < self.grace_expires_at:
            live.append(self.grace_secret)
        return live

    @functools.cached_property
    def matcher(self) -> filters.Filter | None:
        """The filter compiled once per registry record (a changed endpoint is a new object)."""
        return None if self.filter is None else filters.compile_filter(self.filter)

    def wants(self, event: str) -> bool:
        """Whether the fan-out makes it a delivery. A disabled endpoint still gets its deliveries:
        they are parked in the DLQ (`endpoint_disabled`) for a replay on re-enable, never dropped."""
        return matches(self.events, event)

    def public(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        grace = bool(self.grace_secret and self.grace_expires_at and now < self.grace_expires_at)
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "mode": self.mode,
            "format": self.format,
            "ordering": self.ordering,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "description": self.description,
            "grace_secret_active": grace,
            "grace_expires_at": self.grace_expires_at if grace else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "version": self.version,
            "filter": self.filter,
            "max_rate": self.max_rate,
        }

    def record(self, box: SecretBox | None = None) -> dict[str, Any]:
        """The registry record; with a box (WEBHOOKS_SECRETS_KEY) the secrets are sealed in it."""
        d = asdict(self)
        d["events"] = list(self.events)
        if box is not None:
            d["secret"] = box.seal(self.secret)
            if self.grace_secret:
                d["grace_secret"] = box.seal(self.grace_secret)
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any], box: SecretBox | None = None) -> Endpoint:
        """Raises SecretsKeyError for a sealed secret that `box` cannot open (TypeError: not a record)."""
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        known["events"] = tuple(known.get("events") or ())
        known["version"] = record_version(d)
        for name in ("secret", "grace_secret"):
            if isinstance(known.get(name), str):
                known[name] = open_value(box, known[name])
        return cls(**known)

    def changed(self, **kw: Any) -> Endpoint:
        """Changed in memory; still at the version it was read at (the write raises it)."""
        return replace(self, updated_at=time.time(), **kw)

    def next_version(self) -> Endpoint:
        """What a write based on this endpoint stores: the version it was read at, plus one."""
        return replace(self, version=self.version + 1)


def record_version(d: Any) -> int:
    """A record's version; 0 for a record written before versions existed."""
    v = d.get("version") if isinstance(d, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class RegistryState:
    """The one rule by which every reader (each worker's Registry, the CLI) folds the registry topic,
    so that all of them agree on every endpoint whatever worker wrote what.

    Kafka has no compare-and-set, so a write based on a stale view still lands in the topic. Every
    write states the version it read plus one; a record is applied only if its version is higher
    than the applied record's. Of two writes based on the same version, the first in the topic (one
    partition: one order for every reader) wins and the second is ignored everywhere. A tombstone
    (delete) always applies, and ids are never reused, so a record for a deleted id is ignored.
    The losing writer learns it lost by reading back its own record (`ep_id`'s applied record is
    not the one it wrote), answers 409, and writes the winner again, so that compaction, which keeps
    only the last record per key, keeps the winner for readers that start later.
    """

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}  # the applied record per id, as read
        self.deleted: set[str] = set()  # ids seen deleted since this reader started

    def apply(self, key: str, value: Any) -> bool:
        """Fold one record in; False if it is ignored (stale, for a deleted id, or not a record)."""
        if value is None:
            self.records.pop(key, None)
            self.deleted.add(key)
            return True
        if not isinstance(value, dict) or key in self.deleted:
            return False
        current = self.records.get(key)
        if current is not None and record_version(value) <= record_version(current):
            return False
        self.records[key] = value
        return True


class StaleWrite(Exception):
    """A registry write lost to another one based on the same version (or to a delete)."""

    def __init__(self, ep_id: str, current: int | None) -> None:
        now = "it has been deleted" if current is None else f"it is now at version {current}"
        super().__init__(
            f"endpoint {ep_id} was changed by another writer ({now}); "
            "nothing of this change was kept: read it again and retry"
        )
        self.current = current


def check_version(ep: Endpoint, expected: int | None) -> None:
    """Refuse a change stated against another version than the one we read (If-Match, --if-version)."""
    if expected is not None and expected != ep.version:
        raise StaleWrite(ep.id, ep.version)


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    return mode


def validate_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def validate_ordering(ordering: str) -> str:
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering: {ordering!r} is not one of {', '.join(ORDERINGS)}")
    return ordering


def validate_secret(secret: str) -> str:
    """A user-supplied secret: any printable string of 16 to 1024 characters (n8n users type theirs).

    The hex signatures key with its UTF-8 bytes; so does Standard Webhooks, unless it starts with
    ``whsec_``: then the rest is the base64 key, as for generated secrets, and must decode as such
    (a receiver's Standard Webhooks library would otherwise fail on it).
    """
    if not MIN_SECRET <= len(secret) <= MAX_SECRET or not secret.isprintable():
        raise ValueError(
            f"secret: needs {MIN_SECRET} to {MAX_SECRET} printable characters (no control characters)"
        )
    if secret.startswith(SECRET_PREFIX) and len(whsec_key(secret)) < MIN_SECRET:
        raise ValueError(
            "secret: after whsec_ must come the base64 of at least 16 bytes (Standard Webhooks); "
            "leave the prefix out to use the string as it is"
        )
    return secret


def create_endpoint(
    settings: Settings,
    *,
    url: str,
    events: str | list[str],
    mode: str,
    secret: str | None = None,
    description: str = "",
    enabled: bool = True,
    format: str = "perfexapi",
    filter: Any = None,
    max_rate: Any = None,
    ordering: str = "none",
) -> Endpoint:
    """Validate and build a new endpoint (not yet stored)."""
    return Endpoint(
        id=new_endpoint_id(),
        url=validate_url(url, settings.allow_private_targets, allowed=settings.allowed_targets),
        events=tuple(load_catalog().validate_patterns(events)),
        mode=validate_mode(mode),
        secret=validate_secret(secret) if secret else generate_secret(),
        description=(description or "")[:500],
        enabled=enabled,
        format=validate_format(format),
        filter=filters.validate(filter),
        max_rate=throttle.parse_rate(max_rate),
        ordering=validate_ordering(ordering or "none"),
    )


def update_endpoint(settings: Settings, ep: Endpoint, changes: dict[str, Any]) -> Endpoint:
    """Apply validated changes (url, events, mode, format, ordering, description, enabled, filter,
    max_rate;
    a filter of {} or a max_rate of 0 removes it)."""
    kw: dict[str, Any] = {}
    unknown = set(changes) - {"url", "events", "mode", "format", "description", "enabled", "filter", "max_rate", "ordering"}
    if unknown:
        raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
    if "url" in changes:
        kw["url"] = validate_url(
            str(changes["url"]), settings.allow_private_targets, allowed=settings.allowed_targets
        )
    if "events" in changes:
        kw["events"] = tuple(load_catalog().validate_patterns(changes["events"]))
    if "mode" in changes:
        kw["mode"] = validate_mode(str(changes["mode"]))
    if "format" in changes:
        kw["format"] = validate_format(str(changes["format"]))
    if "filter" in changes:
        kw["filter"] = filters.validate(changes["filter"])
    if "max_rate" in changes:
        kw["max_rate"] = throttle.parse_rate(changes["max_rate"])
    if "ordering" in changes:
        kw["ordering"] = validate_ordering(str(changes["ordering"] or "none"))
    if "description" in changes:
        kw["description"] = str(changes["description"] or "")[:500]
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValueError("enabled: must be true or false")
        kw["enabled"] = changes["enabled"]
        if changes["enabled"]:
            kw["disabled_reason"] = None
    return ep.changed(**kw)


def rotate_secret(ep: Endpoint, grace: float = MAX_GRACE, new_secret: str | None = None) -> Endpoint:
    """New primary secret; the old one signs alongside it for `grace` seconds (at most 24 h)."""
    if grace < 0 or grace > MAX_GRACE:
        raise ValueError("grace: must be between 0 and 24h")
    return ep.changed(
        secret=validate_secret(new_secret) if new_secret else generate_secret(),
        grace_secret=ep.secret if grace > 0 else None,
        grace_expires_at=time.time() + grace if grace > 0 else None,
    )


# ---- reading and writing the registry ---------------------------------------------------------------
def read_endpoints(settings: Settings) -> dict[str, Endpoint]:
    from app.topic_tables import read_table

    box = box_for(settings.secrets_key)
    state = RegistryState()
    read_table(settings, route.ENDPOINTS, on_record=state.apply)
    out: dict[str, Endpoint] = {}
    for k, v in state.records.items():
        try:
            out[k] = Endpoint.from_record(v, box)
        except SecretsKeyError as exc:
            raise ValueError(f"endpoint {k}: {exc}") from None
    return out


def write_endpoint(settings: Settings, ep_id: str, ep: Endpoint | None) -> Endpoint | None:
    """The CLI's registry write (None: delete): written, then the topic read back whole with the
    readers' rule. Raises StaleWrite, after writing the winner again, if another write came first."""
    from app.producer import Producer
    from app.topic_tables import read_table

    ep = None if ep is None else ep.next_version()
    rec = None if ep is None else ep.record(box_for(settings.secrets_key))
    with Producer(settings) as p:
        p.send(route.ENDPOINTS, ep_id, rec)
    if ep is None:
        return None  # a delete always applies
    state = RegistryState()
    won: list[Any] = []

    def fold(key: str, value: Any) -> None:
        if state.apply(key, value) and key == ep_id and record_version(value) == ep.version:
            won.append(value)

    read_table(settings, route.ENDPOINTS, on_record=fold)
    if won and won[-1] == rec:
        return ep
    current = state.records.get(ep_id)
    with Producer(settings) as p:
        p.send(route.ENDPOINTS, ep_id, current)
    raise StaleWrite(ep_id, None if current is None else record_version(current))


def reencrypt_all(settings: Settings) -> int:
    """Write every endpoint record again, its secrets sealed with the newest key (the first one)."""
    from app.producer import Producer

    box = box_for(settings.secrets_key)
    if box is None:
        raise ValueError("WEBHOOKS_SECRETS_KEY is not set: there is no key to encrypt with")
    eps = read_endpoints(settings)
    with Producer(settings) as p:
        for ep in eps.values():
            # A new version, so readers apply it; one that loses to a concurrent write is simply
            # not needed (the winner was sealed by its writer).
            p.send(route.ENDPOINTS, ep.id, ep.next_version().record(box))
    return len(eps)


def find(endpoints: dict[str, Endpoint], ep_id: str) -> Endpoint:
    if ep_id not in endpoints:
        raise KeyError(f"no endpoint {ep_id}")
    return endpoints[ep_id]


class Registry:
    """A worker's live view of every endpoint, with a per-event-name match cache."""

    def __init__(self, settings: Settings, on_change: Callable[[], None] | None = None) -> None:
        from app.topic_tables import TopicTable

        self.settings = settings
        self.box = box_for(settings.secrets_key)
        self._by_event: dict[str, list[Endpoint]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self.state = RegistryState()
        # (id, version) of writes awaiting their read-back -> [the record applied at it, waiters]
        self._watch: dict[tuple[str, int], list[Any]] = {}
        self._notify = on_change
        self.on_delete: list[Callable[[str], None]] = []  # called with the id of a deleted endpoint
        self.table = TopicTable(settings, route.ENDPOINTS, on_change=self._changed)

    def _changed(self, key: str, value: Any) -> None:
        if not self.state.apply(key, value):
            if value is not None:
                log.info("endpoint %s: ignored a stale write (version %d)", key, record_version(value))
            return
        watch = self._watch.get((key, record_version(value))) if value is not None else None
        if watch is not None:
            watch[0] = value
        if value is None:
            if self._endpoints.pop(key, None) is not None:
                for forget in self.on_delete:
                    forget(key)
        else:
            try:
                self._endpoints[key] = Endpoint.from_record(value, self.box)
            except TypeError:
                return  # a record we cannot read is not an endpoint
            except SecretsKeyError as exc:
                log.error("endpoint %s skipped: %s", key, exc)
                return
        self._by_event.clear()
        if self._notify is not None:
            self._notify()

    async def start(self) -> None:
        await self.table.start()

    async def stop(self) -> None:
        await self.table.stop()

    @property
    def ready(self):  # asyncio.Event
        return self.table.ready

    def get(self, ep_id: str) -> Endpoint | None:
        return self._endpoints.get(ep_id)

    def all(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def matching(self, event: str) -> list[Endpoint]:
        hit = self._by_event.get(event)
        if hit is None:
            hit = self._by_event[event] = [e for e in self._endpoints.values() if e.wants(event)]
        return hit

    def applied(self, ep_id: str) -> dict[str, Any] | None:
        """The record this view applied for `ep_id` (as read from the topic; None: none or deleted)."""
        return self.state.records.get(ep_id)

    def record(self, ep: Endpoint) -> dict[str, Any]:
        """The record this worker writes for `ep` (secrets sealed when a key is set)."""
        return ep.record(self.box)

    async def write(
        self,
        ep_id: str,
        ep: Endpoint | None,
        send: Callable[[dict[str, Any] | None], Awaitable[Any]],
        timeout: float = 10.0,
    ) -> Endpoint | None:
        """Write `ep` (None: delete) through `send` (which waits for Kafka's ack), then read it back;
        returns what was written (at the version it was read at, plus one).

        Raises StaleWrite if another write based on the same version came first (RegistryState):
        the winner is written again first, so compaction cannot keep our record instead of it.
        Raises TimeoutError if this view cannot confirm the outcome within `timeout`.
        """
        if ep is None:
            await send(None)
            await self.table.caught_up(timeout)
            return None  # a delete always applies
        ep = ep.next_version()
        rec = self.record(ep)
        slot = (ep_id, ep.version)
        watch = self._watch.setdefault(slot, [None, 0])
        watch[1] += 1
        try:
            await send(rec)
            await self.table.caught_up(timeout)
            if watch[0] == rec:  # the record applied at our version is ours
                return ep
        finally:
            watch[1] -= 1
            if not watch[1]:
                self._watch.pop(slot, None)
        applied = self.applied(ep_id)
        await send(applied)  # the winner (None: the endpoint was deleted) is the last record again
        raise StaleWrite(ep_id, None if applied is None else record_version(applied))
