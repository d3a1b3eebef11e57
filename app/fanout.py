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

from app import metrics
from app.config import Settings
from app.delivery import Delivery
from app.dispatch import Dispatcher
from app.endpoints import Registry
from app.events import InvalidEvent, parse_event
from app.outbox import Outbox
from app.smart import MARKER_HEADER, MARKER_VALUE, add_event, due_at, event_of, marker, smart_key

log = logging.getLogger(__name__)

INVALID = "crm.events.invalid"
DELIVERIES = "webhooks.deliveries"


class FanOut:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        dispatcher: Dispatcher,
        outbox: Outbox,
        pending: MutableMapping[str, Any],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.dispatcher = dispatcher
        self.outbox = outbox
        self.pending = pending  # the smart table
        # Bounds the work this worker holds in memory; the agent waits when it is full.
        self.slots = asyncio.Semaphore(settings.max_in_flight * 8)
        self._tasks: set[asyncio.Task[Any]] = set()
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
                    waits.append(self._spawn(self.outbox.publish(DELIVERIES, d.resource_key, d.encode())))
            self._ack_when_done(waits, ack)
        except Exception:
            # Never let an exception escape the agent loop (its offset would be skipped). This is a
            # bug path: park the record with the reason so it can be inspected and re-emitted.
            log.exception("fan-out failed for a record; parking it in %s", INVALID)
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
        rec = {
            "reason": reason,
            "detail": detail,
            "key": None if key is None else key[:1000].decode("utf-8", "replace"),
            # The raw value as text (invalid UTF-8 replaced), capped so the parked record always fits
            # the topic's 1 MB limit: a control byte becomes a 6-byte \u escape (100 kB -> 600 kB).
            "value": None if value is None else value[:100_000].decode("utf-8", "replace"),
            "size": 0 if value is None else len(value),
            "at": time.time(),
        }
        await self.outbox.publish(INVALID, key, orjson.dumps(rec))

    # ---- smart -----------------------------------------------------------------------------------
    async def _flush(self, value: bytes | None) -> None:
        try:
            k = orjson.loads(value or b"{}")["key"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        entry = self.pending.get(k)
        now = time.time()
        if not entry or due_at(entry, self.settings.smart_window, self.settings.smart_max_wait) > now:
            return  # superseded by a newer event, or already flushed
        ep_id = k.split("|", 1)[0]
        ep = self.registry.get(ep_id)
        ev = event_of(entry)
        count = int(entry["count"])
        if ep is not None:
            d = Delivery.for_event(ev, ep, "smart", collapsed=count)
            await self.outbox.publish(DELIVERIES, d.resource_key, d.encode())
            metrics.SMART_DELIVERIES.inc()
            metrics.SMART_COLLAPSED.inc(count)
        del self.pending[k]
        self._marked.pop(k, None)

    async def send_due_markers(self, active_partitions: set[int]) -> int:
        """Timer body: a marker for every due item of a partition this worker owns."""
        now = time.time()
        window, max_wait = self.settings.smart_window, self.settings.smart_max_wait
        sent = 0
        n_pending = 0
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
            resource_key = k.split("|", 1)[1]
            await self.outbox.send(
                "crm.events",
                resource_key,
                marker(k),
                partition=int(entry["p"]),
                headers=[(MARKER_HEADER, MARKER_VALUE)],
            )
            sent += 1
        metrics.SMART_PENDING.set(n_pending)
        return sent


def _is_marker(headers: Any) -> bool:
    if not headers:
        return False
    items = headers.items() if isinstance(headers, dict) else headers
    return any(k == MARKER_HEADER and v == MARKER_VALUE for k, v in items)
