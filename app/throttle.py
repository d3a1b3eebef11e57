"""Per-endpoint throttling: at most `max_rate` deliveries/s to an endpoint, over all workers (issue 18).

Each worker spaces the attempts of a throttled endpoint by a virtual schedule (GCRA with no burst:
one attempt every 1 / (rate x share) seconds). A delivery that comes before its endpoint's next
free slot is not held in memory: it reserves that slot and goes back into a retry tier without an
attempt (`route.throttled`, a `Defer`), due exactly at its slot (`route.defer_due`; a slot further
ahead than the tier's delay is waited out in rounds of it, so it never holds its tier partition
longer than the tier's own records would). When it comes back it is attempted in its slot without
taking another. Other endpoints on the same partition are not held up: the consumer goes on with
the next record as soon as the deferred one is acknowledged by Kafka.

The approximation across workers: each worker takes a share of the rate proportional to the
partitions of `webhooks.deliveries` it owns (`share`, set by the delivery agent on every
rebalance: one worker of three with 4 of 12 partitions takes a third). Deliveries are keyed by
resource, so an endpoint's traffic spreads over the partitions, and so over the workers, in about
those proportions; the retry tiers' and the fan-out's partitions are balanced over the same workers.
Skewed keys, or a worker that owns no partition of `webhooks.deliveries`, make the total deviate
(that worker counts as owning one); deviations err to both sides by at most that skew. A
reservation lives in the worker that made it: a delivery that comes back to another worker after
a rebalance is simply judged again there. Reservations are bounded (`MAX_RESERVED`); past that
a throttled delivery comes back at the next free slot without one and competes again.
"""

from __future__ import annotations

import re
from typing import Any

MAX_RATE = 10_000.0  # deliveries/s; above it throttling is meaningless for one endpoint
MAX_RESERVED = 100_000  # reserved slots kept in memory per worker (a float and an id each)
_EPS = 0.002  # seconds: a delivery back this close to its slot is on time
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(value: Any) -> float | None:
    """Deliveries/s from `5`, `2.5`, `"5/s"`, `"120/m"`, `"600/h"`; None, 0 or "" mean no limit."""
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, bool):
        raise ValueError('max_rate: expected deliveries per second such as 5 or "5/s"')
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str) and (m := _RATE.fullmatch(value)):
        rate = float(m.group(1)) / _PER[m.group(2) or "s"]
        if rate == 0:
            return None
    else:
        raise ValueError(f"max_rate: {str(value)[:40]!r} is not a rate such as 5/s, 120/m or 600/h")
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"max_rate: must be above 0 and at most {MAX_RATE:g}/s (0 turns the limit off)")
    return rate


class Throttle:
    """One worker's schedule of throttled endpoints (only endpoints with a max_rate have state)."""

    def __init__(self) -> None:
        self.share = 1.0  # this worker's fraction of every endpoint's rate (see the module doc)
        self._next: dict[str, float] = {}  # endpoint id -> its next free slot (unix time)
        self._reserved: dict[str, tuple[str, float]] = {}  # delivery id -> (endpoint id, slot)

    def set_share(self, owned: int, total: int) -> None:
        self.share = min(1.0, max(1, owned) / total) if total > 0 else 1.0

    def admit(self, endpoint_id: str, rate: float, delivery_id: str, now: float) -> tuple[float | None, bool]:
        """(None, _): attempt it now. (slot, new): it comes back at `slot` (unix time) without an
        attempt; `new` is False when it already held that slot (a wait served in rounds)."""
        held = self._reserved.pop(delivery_id, None)
        if held is not None:
            slot = held[1]
            if now < slot - _EPS:  # back early (a slot beyond the tier's delay): wait on
                self._reserved[delivery_id] = held
                return slot, False
            if now <= slot + self.interval(rate):
                return None, False  # on time: its slot was counted when it was reserved
            # Long past its slot (held up behind other records): its slot is gone; judge it again.
        interval = self.interval(rate)
        free = max(self._next.get(endpoint_id, now), now)
        if free <= now + _EPS:
            self._next[endpoint_id] = free + interval
            return None, False
        if len(self._reserved) >= MAX_RESERVED:
            return free, True  # no room for a reservation: it competes again at that slot
        self._next[endpoint_id] = free + interval
        self._reserved[delivery_id] = (endpoint_id, free)
        return free, True

    def interval(self, rate: float) -> float:
        return 1.0 / (rate * self.share)

    def forget(self, endpoint_id: str) -> None:
        """A deleted endpoint's schedule and reservations go (endpoint ids are unbounded over time)."""
        self._next.pop(endpoint_id, None)
        for dlv in [k for k, (ep, _) in self._reserved.items() if ep == endpoint_id]:
            del self._reserved[dlv]

    @property
    def reserved(self) -> int:
        return len(self._reserved)
