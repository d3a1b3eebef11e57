"""Fan-out: one `crm.events` record to every subscribed endpoint, in each endpoint's mode.

- bad input goes to `crm.events.invalid` with its reason (and a metric); the loop goes on;
- immediate: dispatched here, concurrently, with no extra topic hop;
- smart: folded into the pending table (see app/smart.py), delivered by a flush marker later;
- async: published to `webhooks.deliveries` for the delivery agent: no task and no asyncio future
  per record, the delivery reports of a linger batch count their records down in one poll, and the
  resource is encoded once per event whatever the number of endpoints (docs/performance.md).

Publishing retries through a broker outage (`Outbox.publish`): a record is acked, and so its
offset committed, only after what it produced has landed.

The agent acks a record only once all of its work is safe (delivered, or its next record
acknowledged by Kafka); Faust commits the contiguous acked prefix, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from app import filters, metrics, route
from app.config import Settings
from app.delivery import Delivery
from app.dispatch import Dispatcher
from app.endpoints import Registry
from app.events import InvalidEvent, parse_event
from app.ordering import is_ordered
from app.outbox import Outbox
from app.route import TRIES
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
        self._open = 0  # records with async publishes not yet reported (see _busy)
        self._idle: asyncio.Future[None] | None = None

    # ---- per record ------------------------------------------------------------------------------
    async def handle(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        partition: int,
        ack: Callable[[], Any],
        offset: int = -1,
    ) -> None:
        """Route one record; `ack` is called once everything it started is safe. Never raises.

        Bad input (the `parse_event` gate) is parked on crm.events.invalid. Work that raises is tried
        `TRIES` times; if it still fails, or handling itself raises, the record is parked in the DLQ
        as poison (`Dispatcher.park_poison`, which returns only once it landed) and acked: its
        partition's commits never wait on it, and nothing of it is lost."""
        poison = functools.partial(self._poison, key, value, partition, offset)
        rec: _Record | None = None
        try:
            if _is_marker(headers):
                await self._flush(value)
                ack()
                return
            try:
                ev = parse_event(key, value, max_bytes=self.settings.max_event_bytes)
            except InvalidEvent as exc:
                await self.slots.acquire()
                invalid = functools.partial(self._invalid, key, value, exc.reason, exc.detail)
                self._ack_when_done([self._spawn(invalid)], ack, poison)
                return
            metrics.child(metrics.EVENTS_CONSUMED, ev.event).inc()
            rec = _Record(self, ack, poison)
            now = time.time()
            bodies: dict[str, Any] = {}  # what filters read, built once per event and format
            data: orjson.Fragment | None = None  # the resource, encoded once for all its deliveries
            for ep in self.registry.matching(ev.event):
                if not filters.passes(ep, ev, bodies):
                    continue
                # Ordered immediate deliveries queue like async ones: their order is kept where the
                # resource's deliveries meet, in the delivery agent (app/ordering.py).
                if ep.mode == "immediate" and not is_ordered(ep):
                    await self.slots.acquire()
                    d = Delivery.for_event(ev, ep, "immediate")
                    # A fresh copy per try: a failed try may have changed the delivery it dispatched.
                    rec.wait(self._spawn(lambda d=d: self.dispatcher.dispatch(dataclasses.replace(d, attempts=[]))))
                elif ep.mode == "smart":
                    k = smart_key(ep.id, ev.key)
                    self.pending[k] = add_event(self.pending.get(k), ev, now, partition)
                else:
                    if data is None:
                        data = orjson.Fragment(orjson.dumps(ev.data))
                    d = Delivery.for_event(ev, ep, ep.mode if ep.mode == "immediate" else "async")
                    await self.slots.acquire()
                    # No task and no future: librdkafka's delivery report counts the record down.
                    await rec.publish(route.queue_for("async"), d.resource_key, d.encode(data))
            rec.seal()
        except Exception as exc:
            # Never let an exception escape the agent loop (its offset would be skipped). This is a
            # bug path: the record is parked so it can be inspected and re-emitted, then acked.
            log.exception("fan-out failed for a record; parking it in %s", route.DLQ)
            if rec is None or rec.sealed:
                self._ack_when_done([], ack, poison, exc)
            else:  # parked once what it already started is done
                rec.error = exc
                rec.seal()

    def _busy(self, delta: int) -> None:
        """Count records whose work is under way without a task of their own (async publishes): a
        graceful stop waits for one future per busy spell, not one per record."""
        self._open += delta
        if self._open > 0 and self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
            self._tasks.add(self._idle)
            self._idle.add_done_callback(self._tasks.discard)
        elif self._open == 0 and self._idle is not None:
            self._idle.set_result(None)
            self._idle = None

    def _spawn(self, make: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        """Run `make()` as a task, trying it `TRIES` times in all before its error is returned."""

        async def run() -> None:
            try:
                for n in range(1, TRIES + 1):
                    try:
                        await make()
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        if n == TRIES:
                            raise
                        log.exception("fan-out work failed (try %d of %d); trying again", n, TRIES)
                        await asyncio.sleep(0.2 * n)
            finally:
                self.slots.release()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_when_free(self, make: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        """`_spawn` from a callback: the task takes its slot first."""

        async def later() -> None:
            await self.slots.acquire()
            await self._spawn(make)

        task = asyncio.ensure_future(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ack_when_done(
        self,
        waits: list[Awaitable[Any]],
        ack: Callable[[], Any],
        poison: Callable[[BaseException], Awaitable[None]],
        error: BaseException | None = None,
    ) -> None:
        if not waits and error is None:
            ack()
            return

        async def wait_then_ack() -> None:
            results = await asyncio.gather(*waits, return_exceptions=True)
            failed = error or next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                # Parked (retried until it lands), then acked: the partition's commits go on.
                await poison(failed)
            ack()

        task = asyncio.ensure_future(wait_then_ack())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poison(
        self, key: bytes | None, value: bytes | None, partition: int, offset: int, error: BaseException
    ) -> None:
        topic = self.settings.topic(route.EVENTS)
        await self.dispatcher.park_poison(key, value, topic, partition, offset, error)

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


class _Record:
    """One event's work in flight: async publishes (counted down by their delivery reports) and
    tasks (immediate dispatches). Acks the event once all of it is safe; a publish the broker
    refused is retried like any other work (`FanOut._spawn`), and poison handling takes what still
    fails. The happy path costs no task and no asyncio future per record."""

    __slots__ = ("ack", "counted", "error", "failed", "fanout", "open", "poison", "sealed", "tasks")

    def __init__(self, fanout: FanOut, ack: Callable[[], Any], poison: Callable[[BaseException], Awaitable[None]]) -> None:
        self.fanout = fanout
        self.ack = ack
        self.poison = poison
        self.open = 0
        self.sealed = False
        self.counted = False
        self.failed: list[tuple[str, str, bytes]] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.error: BaseException | None = None  # handling itself raised: park the record

    def wait(self, task: asyncio.Task[Any]) -> None:
        self.tasks.append(task)

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        self.open += 1
        if not self.counted:
            self.counted = True
            self.fanout._busy(1)

        def reported(err: Any) -> None:
            self.fanout.slots.release()
            if err is not None:
                self.failed.append((topic, key, value))
            self.open -= 1
            if self.open == 0 and self.sealed:
                try:
                    self._finish()
                except Exception:  # runs inside the producer's poll: never break report serving
                    log.exception("fan-out: finishing a record")

        await self.fanout.outbox.send_reported(topic, key, value, reported)

    def seal(self) -> None:
        """Every piece of work is started: ack when it is done (now, if there was none)."""
        self.sealed = True
        if self.open == 0:
            self._finish()

    def _finish(self) -> None:
        fanout = self.fanout
        if self.counted:
            self.counted = False
            fanout._busy(-1)
        if not self.failed:
            fanout._ack_when_done(self.tasks, self.ack, self.poison, self.error)
            return
        # Refused by the broker: try again through the retrying path, each in a slot of its own.
        retries = [fanout._spawn_when_free(functools.partial(fanout.outbox.publish, *f)) for f in self.failed]
        fanout._ack_when_done(self.tasks + retries, self.ack, self.poison, self.error)
