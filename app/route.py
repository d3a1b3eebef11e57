"""The route: every topic name, and every decision about where a record goes next.

Topic names are logical (SPEC §3.3, declared in topics.yaml); `Settings.topic()` puts the install's
WEBHOOKS_TOPIC_PREFIX in front. No other module spells one. The life of a record:

    crm.events ─ bad input ─────────────────────────────► INVALID      invalid_record()
        │ one delivery per matching endpoint, by mode:
        │   immediate: attempted in the fan-out; smart: the pending table, then queue_for("smart");
        │   async: queue_for("async")
        ▼
    before_attempt(): Dead(endpoint_deleted | endpoint_disabled) | Defer(tier) | attempt
    circuit breaker open (app/breaker.py) ─► held(): Tier(n) | Dead(retries_exhausted), no attempt
    attempt ─ 2xx ─► Done
            ─ else ► after_failure(): Tier(n) (a retry scheduled) | Dead(gone | forbidden_target | retries_exhausted)
    endpoint saturated ─► deferred(): Defer(tier) | Tier(n)
    over its max_rate ──► throttled(): Defer(tier)   (due at its slot: app/throttle.py)
    into a tier: due at retry_due() (delay ±10 % jitter) or defer_due(), in the DUE_HEADER
    Dead(reason) ─► DLQ                                          dead_record(), poison_record()
    replay ─► REPLAYS (= DELIVERIES), then a tombstone on DLQ    replay_record()

The outcome types name where a delivery goes; the Dispatcher (app/dispatch.py) carries them out.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from app.config import DEFAULT_RETRY_SCHEDULE, Settings

# ---- topics (logical names) -----------------------------------------------------------------------
EVENTS = "crm.events"  # input change events, keyed "<resource>:<id>"; smart flush markers too
INVALID = "crm.events.invalid"  # bad input, parked with its reason
ENDPOINTS = "webhooks.endpoints"  # the endpoint registry (compacted)
DELIVERIES = "webhooks.deliveries"  # async and smart deliveries, and DLQ replays
ATTEMPTS = "webhooks.attempts"  # one record per HTTP attempt (observability)
DLQ = "webhooks.dlq"  # dead deliveries (compacted, keyed by delivery id)
# Ordered delivery per resource (app/ordering.py): which (endpoint, resource) sequences are blocked
# behind a failing head (compacted), and the deliveries held behind them; both partitioned like
# DELIVERIES (a key's records go to the partition its deliveries are read from).
ORDERING = "webhooks.ordering"
HELD = "webhooks.ordering.held"
SMART_TABLE = "smart-pending"  # the Faust table of pending smart items
SMART_CHANGELOG = f"perfex-webhooks-{SMART_TABLE}-changelog"  # its changelog: Faust's "<app id>-<table>-changelog"
# Tier topic names are public contracts and fixed by position: a shortened schedule (tests use
# 200 ms tiers) changes how long each tier waits, never what the topics are called.
TIER_PREFIX = "webhooks.retry."
TIERS = tuple(f"{TIER_PREFIX}{x}" for x in DEFAULT_RETRY_SCHEDULE.split(","))

_QUEUES = {"async": DELIVERIES, "smart": DELIVERIES}
REPLAYS = DELIVERIES  # a replayed delivery of any mode waits here for the delivery agent


def queue_for(mode: str) -> str:
    """The topic a delivery of this mode waits in for its first attempt (immediate has none)."""
    return _QUEUES[mode]


def tier_topics(settings: Settings) -> list[str]:
    """Full names of the tier topics in use, in order, one per configured delay."""
    return [settings.topic(name) for name in TIERS[: len(settings.retry_schedule)]]


# ---- where a delivery goes next -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Done:
    """Delivered: nothing more to do."""


@dataclass(frozen=True, slots=True)
class Tier:
    """A retry scheduled: wait in tier `index` (0-based), then try again."""

    index: int

    @property
    def topic(self) -> str:
        return TIERS[self.index]

    @property
    def label(self) -> str:
        """The tier's metric label: "30s", "1m", ..."""
        return self.topic.removeprefix(TIER_PREFIX)


@dataclass(frozen=True, slots=True)
class Defer:
    """Back into tier `index` without an attempt (not due yet, or its endpoint is saturated)."""

    index: int

    @property
    def topic(self) -> str:
        return TIERS[self.index]


@dataclass(frozen=True, slots=True)
class Dead:
    """Parked in the DLQ: gone | forbidden_target | retries_exhausted | endpoint_deleted |
    endpoint_disabled (and `POISON` for a record that is not a delivery we can handle:
    `poison_record`)."""

    reason: str
    topic = DLQ


Next = Done | Tier | Defer | Dead
# Outcomes that park a delivery at once, with their DLQ reason (SPEC: dlq_reason).
_DEAD_AT_ONCE = {"gone": "gone", "forbidden": "forbidden_target"}
DONE = Done()


def before_attempt(enabled: bool | None, not_before: float | None, tier: int | None, now: float) -> Next | None:
    """Where a delivery goes instead of an attempt, or None to attempt it.

    `enabled` is None for an endpoint that no longer exists. A delivery in a tier whose Retry-After
    (`not_before`) asked for more time than the tier gave waits another round in the same tier.
    """
    if enabled is None:
        return Dead("endpoint_deleted")
    if not enabled:
        return Dead("endpoint_disabled")
    if not_before and now < not_before and tier is not None:
        return Defer(tier)
    return None


def after_failure(settings: Settings, failures: int, outcome: str) -> Tier | Dead:
    """Where a delivery goes after a failed attempt; `failures` already counts this one.

    After failure n it waits in tier n; after failure len(schedule)+1 it is dead. 410 Gone and a
    target the SSRF guard refused are dead at once.
    """
    if outcome in _DEAD_AT_ONCE:  # the endpoint said so, or the SSRF guard refused it: a retry cannot help
        return Dead(_DEAD_AT_ONCE[outcome])
    return _tier_for(settings, failures)


def deferred(settings: Settings, failures: int, tier: int | None) -> Tier | Defer | Dead:
    """Where a delivery goes that is not attempted now because its endpoint is saturated: back into
    its own tier, or (not in a tier yet) into the tier its failures point to (the first, normally)."""
    if tier is not None:
        return Defer(tier)
    return _tier_for(settings, failures)


def held(settings: Settings, failures: int) -> Tier | Dead:
    """Where a delivery goes that its endpoint's open circuit breaker holds back (app/breaker.py):
    on to the next tier without an attempt. `failures` already counts the hold as one, so a held
    delivery walks the schedule like a failing one and, after the last tier, is parked in the DLQ
    with its id (`retries_exhausted`): nothing is lost while the breaker is open."""
    return _tier_for(settings, failures)


def throttled(tier: int | None) -> Defer:
    """Where a delivery goes that is over its endpoint's max_rate: back into its own tier, or the
    first (fresh), to come back at the slot app/throttle.py reserved for it."""
    return Defer(0 if tier is None else tier)


# ---- when a record in a tier is due -------------------------------------------------------------
# Retries are spread ±10 % around their tier's delay, so deliveries that failed together (an
# endpoint's outage) do not all come back in the same instant when it recovers.
JITTER = 0.10
DUE_HEADER = "perfex-webhooks-due"  # unix time (text) a tier record is due at; absent: timestamp + delay


def retry_due(delay: float, now: float, not_before: float | None = None, rand: Callable[[], float] = random.random) -> float:
    """When a retry scheduled now into a tier of `delay` seconds is due: now + delay x U(0.9, 1.1).
    After a Retry-After (`not_before`) the delay is not jittered: never before what the endpoint asked,
    never before the tier's delay; a longer Retry-After is waited out exactly (`defer_due`)."""
    if not_before is not None:
        return now + delay
    return now + delay * (1 + JITTER * (2 * rand() - 1))


def defer_due(delay: float, now: float, wanted: float | None, rand: Callable[[], float] = random.random) -> float:
    """When a delivery put back into a tier without an attempt is due: exactly at `wanted` (its
    Retry-After time, or its throttle slot), without jitter, or after one tier delay if that is
    sooner (a longer wait is served in rounds: no record holds its partition longer than its tier's
    own delay). Without a time it waits (saturated endpoint): the delay, jittered."""
    if wanted is None or wanted <= now:
        return retry_due(delay, now, None, rand)
    return min(wanted, now + delay)


def due_header(due: float) -> list[tuple[str, bytes]]:
    return [(DUE_HEADER, f"{due:.3f}".encode())]


def due_of(headers: Iterable[tuple[str, bytes]] | None, timestamp: float, delay: float) -> float:
    """When a tier record is due: its header's time, but never later than the latest jittered
    retry could be (a bad header must not pause a partition for long); timestamp + delay without."""
    latest = timestamp + delay * (1 + JITTER)
    for k, v in headers or ():
        if k == DUE_HEADER:
            try:
                return min(float(v), latest)
            except (TypeError, ValueError):
                break
    return timestamp + delay


def _tier_for(settings: Settings, failures: int) -> Tier | Dead:
    if failures > len(settings.retry_schedule):
        return Dead("retries_exhausted")
    return Tier(max(failures, 1) - 1)


# ---- parked and replayed records ------------------------------------------------------------------
def dead_record(delivery: dict[str, Any], reason: str) -> dict[str, Any]:
    """The DLQ entry of a delivery (its `record()`), keyed by its id."""
    return {**delivery, "dlq_reason": reason, "dead_at": time.time()}


TRIES = 3  # tries of a valid record whose handling raises before it is parked as poison
POISON = "poison"  # the DLQ reason of a record that cannot be decoded, validated or handled
# Raw bytes kept in a parked record: base64 of this (1.87 MB) still fits the DLQ topic's 2 MiB
# (topics.yaml), and covers any record of WEBHOOKS_MAX_EVENT_BYTES' default re-encoded.
RAW_CAP = 1_400_000


def poison_key(topic: str, partition: int, offset: int) -> str:
    """A poison record's DLQ key names where it was read, so parking it again (after a crash) keeps
    one entry, and two poison records never share one."""
    return f"poison:{topic}:{partition}:{offset}"


def poison_record(
    key: bytes | None, value: bytes | None, topic: str, partition: int, offset: int, error: BaseException
) -> dict[str, Any]:
    """The DLQ entry of a record that is not a delivery we can handle: its raw bytes (base64), where
    it was read and why it was refused. Not replayable (no endpoint_id): it needs a person."""
    raw = value or b""
    return {
        "id": poison_key(topic, partition, offset),
        "dlq_reason": POISON,
        "error_class": type(error).__name__,
        "error": str(error)[:300],
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "key_b64": None if key is None else base64.b64encode(key[:1000]).decode(),
        "raw_b64": None if value is None else base64.b64encode(raw[:RAW_CAP]).decode(),
        "raw_size": len(raw),
        "raw_truncated": len(raw) > RAW_CAP,
        "dead_at": time.time(),
    }


def invalid_record(key: bytes | None, value: bytes | None, reason: str, detail: str) -> dict[str, Any]:
    """Bad input parked on INVALID (same key) with its reason."""
    return {
        "reason": reason,
        "detail": detail,
        "key": None if key is None else key[:1000].decode("utf-8", "replace"),
        # The raw value as text (invalid UTF-8 replaced), capped so the parked record always fits
        # the topic's 1 MB limit: a control byte becomes a 6-byte \u escape (100 kB -> 600 kB).
        "value": None if value is None else value[:100_000].decode("utf-8", "replace"),
        "size": 0 if value is None else len(value),
        "at": time.time(),
    }


def replay_record(entry: dict[str, Any]) -> dict[str, Any]:
    """A DLQ entry's delivery to publish again on DELIVERIES: same id and history, retries reset, no
    Retry-After wait. After it is acknowledged the entry gets a tombstone on DLQ."""
    rec = {k: v for k, v in entry.items() if k not in ("dlq_reason", "dead_at")}
    rec["failures"] = 0
    rec["not_before"] = None
    rec["replays"] = int(entry.get("replays") or 0) + 1
    rec["replayed_at"] = time.time()
    return rec


def replay_key(entry: dict[str, Any]) -> str:
    """A replayed delivery keeps its resource's key, so it stays in order with that resource."""
    return str(entry.get("resource_key") or entry["id"])
