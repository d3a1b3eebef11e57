"""Dead-letter queue: the view of `webhooks.dlq` and replay.

`webhooks.dlq` is compacted and keyed by delivery id. Replay re-publishes the delivery to
`webhooks.deliveries` with the same delivery id (receivers dedupe on it), its retry count reset,
and then writes a tombstone for that id, so the entry leaves the view; a second replay finds
nothing to do. A replayed delivery that fails again goes through the tiers again and, in the end,
back into the DLQ under the same key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from app import route
from app.config import Settings


@dataclass(frozen=True)
class Filter:
    endpoint: str | None = None
    event: str | None = None
    since: float | None = None  # dead_at >= since
    until: float | None = None  # dead_at < until

    def __call__(self, entry: dict[str, Any]) -> bool:
        if self.endpoint and entry.get("endpoint_id") != self.endpoint:
            return False
        if self.event:
            from app.catalog import matches

            if not matches([self.event], str(entry.get("event", ""))):
                return False
        dead = float(entry.get("dead_at") or 0)
        if self.since is not None and dead < self.since:
            return False
        return not (self.until is not None and dead >= self.until)


def summary(entry: dict[str, Any]) -> dict[str, Any]:
    """The listing form of a DLQ entry: its history, never the endpoint's secrets (not stored)."""
    attempts = entry.get("attempts") or []
    last = attempts[-1] if attempts else {}
    return {
        "delivery_id": entry.get("id"),
        "endpoint_id": entry.get("endpoint_id"),
        "event": entry.get("event"),
        "event_id": entry.get("event_id"),
        "resource": entry.get("resource_key"),
        "reason": entry.get("dlq_reason"),
        "dead_at": entry.get("dead_at"),
        "attempts": len(attempts),
        "last_status": last.get("status"),
        "last_error": last.get("error"),
        "replays": entry.get("replays", 0),
        "history": attempts,
    }


def select(view: dict[str, dict[str, Any]], flt: Filter) -> list[dict[str, Any]]:
    return sorted((e for e in view.values() if flt(e)), key=lambda e: float(e.get("dead_at") or 0))


def is_replayable(entry: dict[str, Any]) -> bool:
    return bool(entry.get("endpoint_id")) and "data" in entry


# ---- CLI side (sync) --------------------------------------------------------------------------
def read_view(settings: Settings) -> dict[str, dict[str, Any]]:
    from app.topic_tables import read_table

    return read_table(settings, route.DLQ)


def replay(
    settings: Settings,
    entries: Iterable[dict[str, Any]],
    progress: Callable[[int], None] | None = None,
    chunk: int = 500,
) -> int:
    """Re-publish entries, then tombstone them; returns how many were replayed.

    Tombstones are written only after Kafka acknowledged the re-published deliveries: a crash in
    between leaves an entry in the view (replaying again is harmless: receivers dedupe on the
    delivery id), never loses it.
    """
    from app import metrics
    from app.producer import Producer

    todo = [e for e in entries if is_replayable(e)]
    with Producer(settings) as p:
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            for entry in part:
                p.send(route.REPLAYS, route.replay_key(entry), route.replay_record(entry))
            p.flush()
            for entry in part:
                p.send(route.DLQ, entry["id"], None)
            p.flush()
            metrics.REPLAYS.inc(len(part))
            if progress is not None:
                progress(len(part))
    return len(todo)


async def replay_async(outbox: Any, entries: Iterable[dict[str, Any]]) -> int:
    """The same for the admin API, through the worker's producer."""
    import asyncio

    from app import metrics

    todo = [e for e in entries if is_replayable(e)]
    if not todo:
        return 0
    queue = route.REPLAYS
    futs = [await outbox.send(queue, route.replay_key(e), route.replay_record(e)) for e in todo]
    await asyncio.gather(*futs)
    futs = [await outbox.send(route.DLQ, e["id"], None) for e in todo]
    await asyncio.gather(*futs)
    metrics.REPLAYS.inc(len(todo))
    return len(todo)
