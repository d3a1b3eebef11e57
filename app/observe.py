"""Worker observability that follows Kafka rather than a code path: DLQ size and Faust consumer lag.

- `DlqView` follows the compacted `webhooks.dlq` topic (delivery id -> entry; a replay's tombstone
  removes the entry) and keeps `webhooks_dlq_size` equal to the size of that view. Every worker
  follows the whole topic, so every worker reports the same number: dashboards take `max`, not
  `sum`. The admin API reuses it as `components.dlq_view` instead of following the topic twice.
- `update_faust_lag` sets `webhooks_consumer_lag{topic}` for `crm.events`, the topic Faust
  consumes: end offset minus committed offset (the fetch position until this group has committed
  anything), summed over the partitions this worker is assigned. Workers own disjoint partitions,
  so `sum by (topic)` over workers is the group's lag. The delivery agent (app/consumers/deliveries.py)
  measures the same for `webhooks.deliveries`, and the retry tiers for the tier topics
  (app/consumers/), all with `app.offsets.lag`.

Topic label values are logical names (no WEBHOOKS_TOPIC_PREFIX): a bounded set that dashboards
can name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any

from aiokafka import TopicPartition
from mode import Service

from app import faust_guard, metrics, route
from app.config import Settings
from app.offsets import lag
from app.topic_tables import TopicTable, open_reader

log = logging.getLogger(__name__)

FAUST_TOPICS = (route.EVENTS,)
LAG_INTERVAL = 1.0  # seconds between lag updates; a few cheap reads of consumer state


class DlqIndexEntry:
    """What a worker keeps of one DLQ entry: enough to list, filter, count and order replays, and
    where the entry is in Kafka, so its payload (data, attempt history) is read only when asked.

    About 300 bytes each (slots; endpoint ids, events and reasons interned) against the 10+ KB
    of a whole entry: 100,000 entries stay within tens of MiB (docs/performance.md).
    """

    __slots__ = ("attempts", "dead_at", "endpoint_id", "event", "id", "offset", "partition", "reason", "replayable", "replays")

    def __init__(self, key: str, entry: dict[str, Any], partition: int, offset: int) -> None:
        from app.dlq import is_replayable

        self.id = key
        self.endpoint_id = sys.intern(str(entry.get("endpoint_id") or "")) or None
        self.event = sys.intern(str(entry.get("event") or "")) or None
        self.reason = sys.intern(str(entry.get("dlq_reason") or "")) or None
        try:
            self.dead_at = float(entry.get("dead_at") or 0)
        except (TypeError, ValueError):
            self.dead_at = 0.0
        attempts = entry.get("attempts")
        self.attempts = len(attempts) if isinstance(attempts, list) else 0
        try:
            self.replays = int(entry.get("replays") or 0)
        except (TypeError, ValueError):
            self.replays = 0
        self.replayable = is_replayable(entry)
        self.partition = partition
        self.offset = offset

    def get(self, name: str, default: Any = None) -> Any:
        """Dict-style reads, so DLQ filters (app/dlq.py) work on index entries and whole ones."""
        if name == "dlq_reason":
            name = "reason"
        value = getattr(self, name, default) if name in self.__slots__ else default
        return default if value is None else value


class DlqView(TopicTable):
    """The DLQ as a live index: `.data` (delivery id -> DlqIndexEntry), `.ready`, `caught_up()`;
    `fetch(ids)` reads whole entries from Kafka (the admin's show and replay)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, route.DLQ, on_change=self._changed)
        self.started = asyncio.Event()
        self._reader: Any = None
        self._reader_lock = asyncio.Lock()

    def _apply(self, rec: Any) -> None:
        key = (rec.key or b"").decode("utf-8", "replace")
        val = self._decode(rec.value)
        if isinstance(val, dict):
            self.data[key] = DlqIndexEntry(key, val, rec.partition, rec.offset)
        else:  # a tombstone (or a record that is not an entry) removes the key
            self.data.pop(key, None)
        self._changed(key, val)

    def _changed(self, key: str, value: Any | None) -> None:
        metrics.DLQ_SIZE.set(len(self.data))

    async def start(self) -> None:
        await super().start()
        metrics.DLQ_SIZE.set(len(self.data))
        self.started.set()

    async def stop(self) -> None:
        await super().stop()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.stop()

    async def caught_up(self, timeout: float = 10.0) -> None:
        # Usable before the worker finished starting: wait for the follower first.
        await asyncio.wait_for(self.started.wait(), timeout)
        await super().caught_up(timeout)

    async def fetch(self, ids: list[str], timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        """The whole entries of these delivery ids, read from Kafka at the offsets the index holds.

        One partition range at a time (lowest to highest wanted offset). An id the index does not
        hold, or whose record is no longer there, is missing from the answer.
        """
        wanted: dict[int, dict[int, str]] = {}
        for d_id in ids:
            e = self.data.get(d_id)
            if e is not None:
                wanted.setdefault(e.partition, {})[e.offset] = d_id
        out: dict[str, dict[str, Any]] = {}
        if not wanted:
            return out
        async with self._reader_lock:
            if self._reader is None:
                self._reader, _ = await open_reader(self.settings, self.topic)
            reader = self._reader
            deadline = time.monotonic() + timeout
            for partition, offsets in wanted.items():
                tp = TopicPartition(self.topic, partition)
                last = max(offsets)
                reader.seek(tp, min(offsets))
                while time.monotonic() < deadline:
                    batch = await reader.getmany(tp, timeout_ms=500, max_records=500)
                    for rec in batch.get(tp, []):
                        d_id = offsets.get(rec.offset)
                        if d_id is not None and (rec.key or b"").decode("utf-8", "replace") == d_id:
                            val = self._decode(rec.value)
                            if isinstance(val, dict):
                                out[d_id] = val
                    if await reader.position(tp) > last:
                        break
        return out

    async def fetch_one(self, d_id: str) -> dict[str, Any] | None:
        return (await self.fetch([d_id])).get(d_id)


async def update_faust_lag(app: Any, settings: Settings) -> dict[str, int]:
    """Set webhooks_consumer_lag for the Faust-consumed topics from this worker's assignment."""
    names = {settings.topic(t): t for t in FAUST_TOPICS}
    totals = dict.fromkeys(FAUST_TOPICS, 0)
    consumer = app.consumer
    tps = [tp for tp in consumer.assignment() if tp.topic in names]  # not changelogs
    if tps:
        # End offsets from the broker: a paused partition's fetch highwater goes stale.
        ends = await asyncio.wait_for(consumer.highwaters(*tps), 2.0)
    else:
        ends = {}
    for tp in tps:
        high = ends.get(tp)
        if high is None:
            continue
        # Faust's own record of its commits (asking the broker every second would be wasteful).
        committed = faust_guard.committed_offset(consumer, tp)
        position = None
        if committed is None:
            try:
                position = await asyncio.wait_for(consumer.position(tp), 1.0)
            except Exception:
                continue
        totals[names[tp.topic]] += lag(high, committed, position) or 0
    for logical, total in totals.items():
        metrics.CONSUMER_LAG.labels(topic=logical).set(total)
    return totals


def install(app: Any, comps: Any) -> None:
    """Hook observability into a worker: the DLQ follower (as comps.dlq_view) and the lag timer."""
    settings: Settings = comps.settings
    view = DlqView(settings)
    comps.dlq_view = view
    comps.dispatcher.dlq_view = view  # orders a replayed delivery's re-park after its tombstone

    class DlqViewService(Service):
        async def on_start(self) -> None:
            await view.start()

        async def on_stop(self) -> None:
            await view.stop()

    app.service(DlqViewService)

    @app.timer(LAG_INTERVAL)
    async def consumer_lag() -> None:
        if not comps.ready.is_set():
            return
        try:
            await update_faust_lag(app, settings)
            metrics.CONSUMER_LAG.labels(topic=route.DELIVERIES).set(comps.agent.lag)
        except Exception as exc:  # observability must never take the worker down
            log.warning("consumer lag not updated: %r", exc)
