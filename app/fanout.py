"""Fan-out: one `crm.events` record to every subscribed endpoint, in each endpoint's mode.

- bad input goes to `crm.events.invalid` with its reason (and a metric); the loop goes on;
- immediate: dispatched here, concurrently, with no extra topic hop;
- smart: folded into the pending table (see app/smart.py), delivered by a flush marker later;
- async: published to `webhooks.deliveries` for the delivery agent.

Publishing retries through a broker outage (`Outbox.publish`): a record is acked, and so its
offset committed, only after what it produced has landed.

The agent acks a record only once all of its work is safe (delivered, or its next record
acknowledged by Kafka); Faust commits the contiguous acked prefix, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from app import metrics, route
from app.config import Settings
from app.delivery import Delivery
from app.dispatch import Dispatcher
from app.endpoints import Registry
from app.events import InvalidEvent, parse_event
from app.outbox import Outbox
from app.smart import (
    MARKER_BATCH,
    MARKER_HEADER,
    MARKER_VALUE,
    add_event,
    due_at,
    event_of,
    marker_batch,
    marker_keys,
    smart_key,
)

log = logging.getLogger(__name__)


class FanOut:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        dispatcher: Dispatcher,
        outbox: Outbox,
        pending: MutableMapping[str, Any],
        tasks: set[asyncio.Future[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.dispatcher = dispatcher
        self.outbox = outbox
        self.pending = pending  # the smart table
        # Bounds the work this worker holds in memory; the agent waits when it is full.
        self.slots = asyncio.Semaphore(settings.max_in_flight * 8)
        # Work started for records not yet acked; the worker drains it before a graceful stop.
        self._tasks: set[asyncio.Future[Any]] = set() if tasks is None else tasks
        self._marked: dict[str, float] = {}

    # ---- per record ------------------------------------------------------------------------------
    async def handle(
        self, key: bytes | None, value: bytes | None, headers: Any, partition: int, ack: Callable[[], Any]
    ) -> None:
        """Route one record; `ack` is called once everything it started is safe. Never raises."""
        try:
            if _is_marker(headers):
                await self._flush(value)
                ack()
                return
            try:
                ev = parse_event(key, value, max_bytes=self.settings.max_event_bytes)
            except InvalidEvent as exc:
                await self.slots.acquire()
                self._ack_when_done([self._spawn(self._invalid(key, value, exc.reason, exc.detail))], ack)
                return
            metrics.EVENTS_CONSUMED.labels(event=ev.event).inc()
            waits: list[Awaitable[Any]] = []
            now = time.time()
            for ep in self.registry.matching(ev.event):
                if ep.mode == "immediate":
                    await self.slots.acquire()
                    waits.append(
                        self._spawn(self.dispatcher.dispatch(Delivery.for_event(ev, ep, "immediate")))
                    )
                elif ep.mode == "smart":
                    k = smart_key(ep.id, ev.key)
                    self.pending[k] = add_event(self.pending.get(k), ev, now, partition)
                else:
                    d = Delivery.for_event(ev, ep, "async")
                    await self.slots.acquire()
                    topic = route.queue_for("async")
                    waits.append(self._spawn(self.outbox.publish(topic, d.resource_key, d.encode())))
            self._ack_when_done(waits, ack)
        except Exception:
            # Never let an exception escape the agent loop (its offset would be skipped). This is a
            # bug path: park the record with the reason so it can be inspected and re-emitted.
            log.exception("fan-out failed for a record; parking it in %s", route.INVALID)
            try:
                await self._invalid(key, value, "internal_error", "see worker log")
            finally:
                ack()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        async def run() -> None:
            try:
                await coro
            finally:
                self.slots.release()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ack_when_done(self, waits: list[Awaitable[Any]], ack: Callable[[], Any]) -> None:
        if not waits:
            ack()
            return

        async def wait_then_ack() -> None:
            results = await asyncio.gather(*waits, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                # Not acked: the record is consumed again after a restart or rebalance.
                log.error("fan-out work failed, record left unacked: %r", errors[0])
                return
            ack()

        task = asyncio.ensure_future(wait_then_ack())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _invalid(self, key: bytes | None, value: bytes | None, reason: str, detail: str) -> None:
        metrics.INVALID_EVENTS.labels(reason=reason).inc()
        rec = route.invalid_record(key, value, reason, detail)
        await self.outbox.publish(route.INVALID, key, orjson.dumps(rec))

    # ---- smart -----------------------------------------------------------------------------------
    async def _flush(self, value: bytes | None) -> None:
        """Deliver the due items a marker names. An item leaves the table only once its delivery
        record is acknowledged, so a crash in between re-reads the marker and loses nothing."""
        try:
            keys = marker_keys(orjson.loads(value or b"{}"))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return
        now = time.time()
        due: list[tuple[str, Any]] = []
        for k in keys:
            entry = self.pending.get(k)
            if not entry or due_at(entry, self.settings.smart_window, self.settings.smart_max_wait) > now:
                continue  # superseded by a newer event, or already flushed
            due.append((k, entry))
        if not due:
            return
        sends: list[Awaitable[Any]] = []
        delivered: list[bool] = []
        for k, entry in due:
            ep = self.registry.get(k.split("|", 1)[0])
            delivered.append(ep is not None)
            if ep is None:
                continue  # endpoint deleted: nothing to deliver, the item just leaves the table
            d = Delivery.for_event(event_of(entry), ep, "smart", collapsed=int(entry["count"]))
            sends.append(self.outbox.publish(route.queue_for("smart"), d.resource_key, d.encode()))
        # Publish the batch together: one broker round trip (and linger) instead of one per item.
        results = iter(await asyncio.gather(*sends, return_exceptions=True))
        error: BaseException | None = None
        for (k, entry), sent in zip(due, delivered, strict=True):
            if sent:
                res = next(results)
                if isinstance(res, BaseException):
                    error = error or res  # stays pending; its marker is sent again later
                    continue
                metrics.SMART_DELIVERIES.inc()
                metrics.SMART_COLLAPSED.inc(int(entry["count"]))
            del self.pending[k]
            self._marked.pop(k, None)
        if error is not None:
            raise error

    async def send_due_markers(self, active_partitions: set[int]) -> int:
        """Timer body: a marker for every due item of a partition this worker owns."""
        now = time.time()
        window, max_wait = self.settings.smart_window, self.settings.smart_max_wait
        sent = 0
        n_pending = 0
        due: dict[int, list[str]] = {}
        for k, entry in list(self.pending.items()):
            if not entry or entry.get("p") not in active_partitions:
                continue
            n_pending += 1
            if due_at(entry, window, max_wait) > now:
                continue
            last = self._marked.get(k)
            if last is not None and now - last < max(1.0, window):
                continue
            self._marked[k] = now
            due.setdefault(int(entry["p"]), []).append(k)
        # One marker per partition and batch of items, in that partition (so the agent that owns
        # the items' table partition handles it, in order with the partition's events).
        for partition, keys in due.items():
            for i in range(0, len(keys), MARKER_BATCH):
                batch = keys[i : i + MARKER_BATCH]
                await self.outbox.send(
                    route.EVENTS,
                    batch[0].split("|", 1)[1],
                    marker_batch(batch),
                    partition=partition,
                    headers=[(MARKER_HEADER, MARKER_VALUE)],
                )
                sent += len(batch)
        metrics.SMART_PENDING.set(n_pending)
        return sent


def _is_marker(headers: Any) -> bool:
    if not headers:
        return False
    items = headers.items() if isinstance(headers, dict) else headers
    return any(k == MARKER_HEADER and v == MARKER_VALUE for k, v in items)
