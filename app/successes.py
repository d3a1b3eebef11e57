"""Recent successes: the delivery ids whose 2xx is already recorded in `webhooks.attempts`.

After a crash (or a rebalance) every consumer reads again what its predecessor had finished but not
yet committed: the fan-out dispatches the same immediate deliveries and publishes the same async ones
again, the delivery agent and the retry tiers dispatch the records they re-read (same delivery ids).
The Dispatcher skips a delivery whose success is recorded here, whichever path it comes by, so a
crash costs a few duplicates (the requests in flight at the kill) instead of everything since the
last commit.

The index is bounded (the most recent `CAP` ids) and rebuilt at start from the tail of the attempt
log; it catches up with the log whenever any consumer (fan-out, delivery agent, retry tiers) is
assigned partitions (another worker's successes), and the worker adds its own as they happen. An
attempt-log record lost in a crash only costs a duplicate: receivers dedupe on the delivery id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict

import orjson
from confluent_kafka import Consumer, TopicPartition

from app import route
from app.config import Settings

log = logging.getLogger(__name__)

CAP = 100_000  # ids kept (about 10 MB): far more than a crash leaves uncommitted
# A catch-up that started less than this long ago already saw what a dead worker had written: its
# partitions move only after the consumers' session timeout (10 s, app/consumers/, app/worker.py), so
# it died well before. Spares the three consumers' assignments at a worker's start three more reads.
FRESH = 5.0
_SUCCESS = b'"outcome":"success"'  # orjson writes it so: a cheap filter before parsing


class RecentSuccesses:
    def __init__(self, settings: Settings, cap: int = CAP) -> None:
        self.settings = settings
        self.cap = cap
        # Insertion-ordered, the oldest evicted first (OrderedDict: popping the front is O(1)).
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._reading = threading.Lock()  # one catch-up at a time (consumers are assigned at once)
        self._next: dict[int, int] = {}  # partition -> next offset of the attempt log to read
        # Catch-ups asked for and not finished: until then the index may lack a dead worker's last
        # successes, so the Dispatcher waits (`settled`) rather than send those again.
        self._pending = 0
        self._started: float | None = None  # monotonic time the last catch-up started reading

    @property
    def catching_up(self) -> bool:
        return self._pending > 0

    async def settled(self) -> None:
        """Wait until no catch-up is running (only around an assignment: one read of the log tail).
        Polled: the count also changes on the delivery agent's thread, where no asyncio.Event can be set."""
        while self._pending > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def catch_up_async(self) -> int:
        """`catch_up` off the event loop; `catching_up` is true from this call on (not only once the
        thread runs), so no delivery is checked against the index before the read starts."""
        with self._lock:
            self._pending += 1
        try:
            return await asyncio.to_thread(self._catch_up_counted)
        finally:
            with self._lock:
                self._pending -= 1

    def __contains__(self, delivery_id: str) -> bool:
        return delivery_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, delivery_id: str) -> None:
        with self._lock:
            self._ids[delivery_id] = None
            while len(self._ids) > self.cap:
                self._ids.popitem(last=False)

    def catch_up(self, timeout: float = 10.0) -> int:
        """Read the attempt log from where the last call stopped (the last `cap` records at first) to
        its end now; returns the successes added. Blocking: call it off the event loop."""
        with self._lock:
            self._pending += 1
        try:
            return self._catch_up_counted(timeout)
        finally:
            with self._lock:
                self._pending -= 1

    def _catch_up_counted(self, timeout: float = 10.0) -> int:
        with self._reading:
            now = time.monotonic()
            if self._started is not None and now - self._started < FRESH:
                return 0
            self._started = now
            return self._catch_up(timeout)

    def _catch_up(self, timeout: float) -> int:
        """At most about `timeout` in all (dispatch waits for it): a broker that does not answer
        costs duplicates, never a stalled pipeline."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        name = self.settings.topic(route.ATTEMPTS)
        c = Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": f"perfex-webhooks-successes-{uuid.uuid4().hex[:8]}",  # never commits
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        added = 0
        try:
            parts = c.list_topics(name, timeout=left()).topics[name].partitions
            todo: dict[int, int] = {}
            start_at: list[TopicPartition] = []
            for p in parts:
                low, high = c.get_watermark_offsets(TopicPartition(name, p), timeout=left())
                start = self._next.get(p, max(low, high - self.cap // max(1, len(parts))))
                if start < high:
                    todo[p] = high
                    start_at.append(TopicPartition(name, p, start))
                else:
                    self._next[p] = high
            if start_at:
                c.assign(start_at)
            while todo and time.monotonic() < deadline:
                msgs = c.consume(1000, min(1.0, left()))
                if not msgs:
                    break  # the rest is not readable now; the next catch-up goes on from here
                for m in msgs:
                    if m.error() is not None:
                        continue
                    p, off, value = m.partition(), m.offset(), m.value()
                    self._next[p] = off + 1
                    if value and _SUCCESS in value:
                        delivery_id = _delivery_id(value)
                        if delivery_id:
                            self.add(delivery_id)
                            added += 1
                    if p in todo and off + 1 >= todo[p]:
                        del todo[p]
        except Exception as exc:  # the index is an optimisation: without it, only more duplicates
            log.warning("recent successes: reading %s failed: %s", name, exc)
        finally:
            c.close()
        return added


def _delivery_id(value: bytes) -> str | None:
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if isinstance(rec, dict) and rec.get("outcome") == "success" and isinstance(rec.get("delivery_id"), str):
        return rec["delivery_id"]
    return None
