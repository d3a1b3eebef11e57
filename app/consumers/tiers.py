"""Retry tiers: the consumer that waits out each tier (app/route.py decides which tier).

A record in tier i is due at (its Kafka timestamp + delay i). Every record of a tier has the same
delay, so each partition is already in due order: the consumer reads a partition until it meets a
record that is not due, seeks back to it, pauses the partition and resumes it when it is due, all
while still polling (no sleeping inside a consumer, no busy loop, nothing buffered in memory).
Offsets are committed only up to the first record not yet fully handled (app/consumers/base.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from app import metrics, route
from app.config import Settings
from app.consumers.base import RecordConsumer
from app.delivery import Delivery
from app.dispatch import Dispatcher
from app.health import HEALTH, is_fatal
from app.ordering import release_after_tier

log = logging.getLogger(__name__)


class RetryTiers(RecordConsumer[TopicPartition], ConsumerRebalanceListener):
    """Partitions are named by TopicPartition (one topic per tier)."""

    name = "retry tiers"

    def __init__(self, settings: Settings, dispatcher: Dispatcher, max_tasks: int = 256) -> None:
        super().__init__(settings, dispatcher, max_records=max_tasks)
        self.delays = dict(zip(route.tier_topics(settings), settings.retry_schedule, strict=True))
        self.index = {t: i for i, t in enumerate(route.tier_topics(settings))}
        self.paused: dict[TopicPartition, float] = {}  # not due yet: resumed at that time
        self.held_back: set[TopicPartition] = set()  # paused while every slot is held
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lag_at = 0.0
        self._lag_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=f"{self.settings.group_id}.retry",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=500,
            # A hung endpoint holds a record at most delivery_timeout; keep well inside this.
            max_poll_interval_ms=int(self.settings.max_poll_interval * 1000),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        self.consumer.subscribe(list(self.delays), listener=self)
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="retry-tiers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drain(set(self.book.partitions), timeout=self.settings.delivery_timeout + 2)
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()

    # ---- rebalance -------------------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._drain(set(revoked), timeout=self.settings.delivery_timeout + 2)
        for tp in revoked:
            self.paused.pop(tp, None)
            self.held_back.discard(tp)
        self.book.forget(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # Before the first await: aiokafka makes the new assignment fetchable before it calls this,
        # so `getmany` may return its records while the catch-up below runs. Each must find its
        # partition's book (or it is skipped, and a later commit passes it), and a pause made for a
        # record not yet due must not be cleared after the fact (the partition would stay paused
        # until the next rebalance): both lost an ordered head's retry (issue 18).
        for tp in assigned:
            self.paused.pop(tp, None)
            self.held_back.discard(tp)
        self.book.assign(assigned)
        if assigned:  # they may come from a worker that died: learn what it had delivered
            # `catching_up` is set at this call, before any record of theirs is dispatched: a
            # dispatch waits for the catch-up (`Dispatcher.dispatch`).
            n = await self.dispatcher.successes.catch_up_async()
            log.info("retry tiers: %d successes learnt from the attempt log", n)

    async def _drain(self, tps: set[TopicPartition], timeout: float) -> None:
        """Let in-flight records of these partitions finish, then commit what is finished."""
        await self.book.until_finished(tps, timeout)
        await self._commit(tps)

    async def _commit(self, tps: set[TopicPartition] | None = None) -> None:
        assert self.consumer is not None
        offsets = self.book.to_commit(tps)
        if offsets:
            try:
                await self.consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
            except Exception as exc:  # rebalancing: the next owner re-reads; duplicates, not loss
                log.warning("retry tiers: commit failed: %s", exc)
                self.book.failed(offsets)

    # ---- main loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self.consumer is not None
        c = self.consumer
        while True:
            try:
                if self.full:  # never wait for room: pause and keep polling (heartbeats, rebalances)
                    self.held_back |= set(c.assignment()) - set(self.paused)
                    c.pause(*self.held_back)
                elif self.held_back and self.has_room:
                    c.resume(*(tp for tp in self.held_back if tp in c.assignment() and tp not in self.paused))
                    self.held_back.clear()
                now = time.time()
                for tp, due in list(self.paused.items()):
                    if due <= now:
                        del self.paused[tp]
                        if tp in c.assignment() and tp not in self.held_back:
                            c.resume(tp)
                wait = min([0.5, *[due - now for due in self.paused.values()]])
                batches = await c.getmany(timeout_ms=max(10, int(wait * 1000)), max_records=500)
                now = time.time()
                for tp, records in batches.items():
                    self._read(tp, records, now)
                await self._commit()
                self._update_lag()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_fatal(exc) and isinstance(exc, KafkaError):  # e.g. a codec it cannot decode
                    HEALTH.fail("retry tiers consumer", exc)
                    return
                log.exception("retry tiers loop; continuing")
                await asyncio.sleep(1)

    def _read(self, tp: TopicPartition, records: list[Any], now: float) -> None:
        """Take a partition's fetched records up to the first one not due. Every record returned is
        either taken or sought back to: the fetch position has passed it, and a commit of a later
        record would pass it too, so a record merely skipped would be lost (issue 18)."""
        assert self.consumer is not None
        c = self.consumer
        if tp in self.paused:  # paused here but not in aiokafka (cannot be): again when it is due
            log.warning("retry tiers: %s returned while paused; read again from offset %d", tp, records[0].offset)
            c.seek(tp, records[0].offset)
            c.pause(tp)
            return
        delay = self.delays[tp.topic]
        for rec in records:
            due = route.due_of(rec.headers, rec.timestamp / 1000.0, delay)
            if due > now:
                c.seek(tp, rec.offset)
                c.pause(tp)
                self.paused[tp] = due
                log.debug("retry tiers: %s paused at offset %d, due in %.1f s", tp, rec.offset, due - now)
                return
            if not self.take(tp, rec.offset, rec.key, rec.value):
                # Assigned to aiokafka, not (yet, or any more) to the book: read it again later.
                log.warning("retry tiers: %s offset %d fetched outside its assignment; read again", tp, rec.offset)
                c.seek(tp, rec.offset)
                return

    def where(self, partition: TopicPartition) -> tuple[str, int]:
        return partition.topic, partition.partition

    async def deliver(self, partition: TopicPartition, delivery: Delivery) -> None:
        next_ = await self.dispatcher.dispatch(delivery, tier=self.index[partition.topic])
        if delivery.ordered:  # a sequence's head: its path through the tiers, for a stalled sequence
            log.debug("retry tiers: ordered head %s from %s: %s", delivery.id, partition, next_)
        await release_after_tier(self.dispatcher, delivery, next_)

    def _update_lag(self) -> None:
        """Refresh webhooks_consumer_lag for the tier topics at most once a second, off the poll loop."""
        now = time.monotonic()
        if now - self._lag_at < 1.0 or (self._lag_task is not None and not self._lag_task.done()):
            return
        self._lag_at = now
        self._lag_task = asyncio.create_task(self._refresh_lag(), name="retry-tiers-lag")

    async def _refresh_lag(self) -> None:
        """Lag = end offset - committed offset (the fetch position where this worker has not committed
        yet), summed per topic over this worker's partitions; records waiting out their delay count.
        End offsets come from the broker because a paused partition's fetch highwater goes stale.
        Topics with no partition here read 0, so a revoked partition is not reported twice.
        """
        assert self.consumer is not None
        c = self.consumer
        tps = list(c.assignment())
        totals = dict.fromkeys(self.delays, 0)
        try:
            ends = await asyncio.wait_for(c.end_offsets(tps), 2.0) if tps else {}
        except Exception as exc:  # broker busy or rebalancing: keep the last values
            log.debug("retry tiers lag: %s", exc)
            return
        for tp in tps:
            hw = ends.get(tp)
            if hw is None or tp not in c.assignment():
                continue
            pos = None
            if self.book.committed(tp) is None:
                try:
                    pos = await asyncio.wait_for(c.position(tp), 0.5)
                except Exception:
                    continue
            totals[tp.topic] = totals.get(tp.topic, 0) + (self.lag_of(tp, hw, pos) or 0)
        for topic, lag in totals.items():
            metrics.CONSUMER_LAG.labels(topic=topic.removeprefix(self.settings.topic_prefix)).set(lag)
