"""Worker observability that follows Kafka rather than a code path: DLQ size and Faust consumer lag.

- `DlqView` follows the compacted `webhooks.dlq` topic (delivery id -> entry; a replay's tombstone
  removes the entry) and keeps `webhooks_dlq_size` equal to the size of that view. Every worker
  follows the whole topic, so every worker reports the same number: dashboards take `max`, not
  `sum`. The admin API reuses it as `components.dlq_view` instead of following the topic twice.
- `update_faust_lag` sets `webhooks_consumer_lag{topic}` for `crm.events`, the topic Faust
  consumes: end offset minus committed offset (the fetch position until this group has committed
  anything), summed over the partitions this worker is assigned. Workers own disjoint partitions,
  so `sum by (topic)` over workers is the group's lag. The delivery agent (app/delivery_agent.py)
  measures the same for `webhooks.deliveries`, and the retry tiers for the tier topics (app/retry.py).

Topic label values are logical names (no WEBHOOKS_TOPIC_PREFIX): a bounded set that dashboards
can name.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mode import Service

from app import metrics
from app.config import Settings
from app.topic_tables import TopicTable

log = logging.getLogger(__name__)

DLQ_TOPIC = "webhooks.dlq"
FAUST_TOPICS = ("crm.events",)
LAG_INTERVAL = 1.0  # seconds between lag updates; a few cheap reads of consumer state


class DlqView(TopicTable):
    """The DLQ as a live view: `.data` (delivery id -> DLQ entry), `.ready`, `caught_up()`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, DLQ_TOPIC, on_change=self._changed)
        self.started = asyncio.Event()

    def _changed(self, key: str, value: Any | None) -> None:
        metrics.DLQ_SIZE.set(len(self.data))

    async def start(self) -> None:
        await super().start()
        metrics.DLQ_SIZE.set(len(self.data))
        self.started.set()

    async def caught_up(self, timeout: float = 10.0) -> None:
        # Usable before the worker finished starting: wait for the follower first.
        await asyncio.wait_for(self.started.wait(), timeout)
        await super().caught_up(timeout)

    def entries(self) -> list[dict[str, Any]]:
        return list(self.data.values())


async def update_faust_lag(app: Any, settings: Settings) -> dict[str, int]:
    """Set webhooks_consumer_lag for the Faust-consumed topics from this worker's assignment."""
    names = {settings.topic(t): t for t in FAUST_TOPICS}
    totals = dict.fromkeys(FAUST_TOPICS, 0)
    consumer = app.consumer
    # Faust's own record of what it committed per partition (None until it committed or read a
    # commit); there is no public accessor, and asking the broker every second would be wasteful.
    committed_map = getattr(consumer, "_committed_offset", {})
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
        done = committed_map.get(tp)
        if done is None:
            try:
                done = await asyncio.wait_for(consumer.position(tp), 1.0)
            except Exception:
                continue
            if done is None:
                continue
        totals[names[tp.topic]] += max(0, int(high) - int(done))
    for logical, lag in totals.items():
        metrics.CONSUMER_LAG.labels(topic=logical).set(lag)
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
            metrics.CONSUMER_LAG.labels(topic="webhooks.deliveries").set(comps.agent.lag)
        except Exception as exc:  # observability must never take the worker down
            log.warning("consumer lag not updated: %r", exc)
