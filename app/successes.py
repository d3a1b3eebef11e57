"""Recent successes: the delivery ids whose 2xx is already recorded in `webhooks.attempts`.

After a crash the delivery agent reads again what its dead predecessor had delivered but not yet
committed, and the fan-out publishes again the deliveries of events it had not committed (same
delivery ids). The agent skips a delivery whose success is recorded here, so a crash costs a few
duplicates (the requests in flight at the kill) instead of everything since the last commit.

The index is bounded (the most recent `CAP` ids) and rebuilt at start from the tail of the attempt
log; it catches up with the log whenever the agent is assigned partitions (another worker's
successes), and the worker adds its own as they happen. An attempt-log record lost in a crash only
costs a duplicate: receivers dedupe on the delivery id.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict

import orjson
from confluent_kafka import Consumer, TopicPartition

from app import route
from app.config import Settings

log = logging.getLogger(__name__)

CAP = 100_000  # ids kept (about 10 MB): far more than a crash leaves uncommitted
_SUCCESS = b'"outcome":"success"'  # orjson writes it so: a cheap filter before parsing


class RecentSuccesses:
    def __init__(self, settings: Settings, cap: int = CAP) -> None:
        self.settings = settings
        self.cap = cap
        # Insertion-ordered, the oldest evicted first (OrderedDict: popping the front is O(1)).
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._next: dict[int, int] = {}  # partition -> next offset of the attempt log to read

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
            parts = c.list_topics(name, timeout=timeout).topics[name].partitions
            todo: dict[int, int] = {}
            start_at: list[TopicPartition] = []
            for p in parts:
                low, high = c.get_watermark_offsets(TopicPartition(name, p), timeout=timeout)
                start = self._next.get(p, max(low, high - self.cap // max(1, len(parts))))
                if start < high:
                    todo[p] = high
                    start_at.append(TopicPartition(name, p, start))
                else:
                    self._next[p] = high
            if start_at:
                c.assign(start_at)
            while todo:
                msgs = c.consume(1000, 1.0)
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
