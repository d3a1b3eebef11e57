"""Keyed views of Kafka topics: the endpoint registry, the DLQ view, recent attempts.

State lives in Kafka, not in one process, so every worker and the CLI build the same view by
reading the topic: `read_table` (sync, confluent-kafka) for the CLI, `TopicTable` (async, aiokafka,
no consumer group) inside workers, which keeps following the topic so changes show within a second.
A record with a null value is a tombstone: the key leaves the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from app.config import Settings
from app.health import HEALTH, is_fatal

log = logging.getLogger(__name__)


def _decode(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def read_table(
    settings: Settings,
    topic: str,
    timeout: float = 15.0,
    on_record: Callable[[str, Any], Any] | None = None,
) -> dict[str, Any]:
    """Read a keyed topic from the beginning to its current end; the last value per key wins.

    `on_record(key, value)` sees every record in topic order (a reader with its own fold rule)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    quiet = logging.getLogger("perfex_webhooks.rdkafka")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    name = settings.topic(topic)
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "perfex-webhooks-reader",  # never used for commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "logger": quiet,
        }
    )
    try:
        try:
            md = c.list_topics(name, timeout=min(timeout, 5.0))
        except KafkaException as exc:
            raise RuntimeError(f"cannot reach Kafka at {settings.bootstrap_servers}") from exc
        tmeta = md.topics.get(name)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise RuntimeError(f"topic {name} does not exist; run `perfex-webhooks topics apply`")
        ends = {}
        for p in tmeta.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(name, p), timeout=timeout)
            if high > low:
                ends[p] = high
        view: dict[str, Any] = {}
        if not ends:
            return view
        c.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        pending = set(ends)
        while pending and time.monotonic() < deadline:
            for msg in c.consume(500, 0.5):
                p = msg.partition()
                if msg.error() is not None:
                    if msg.error().code() == -191:  # _PARTITION_EOF
                        pending.discard(p)
                    continue
                key = (msg.key() or b"").decode("utf-8", "replace")
                val = _decode(msg.value())
                if on_record is not None:
                    on_record(key, val)
                if val is None:
                    view.pop(key, None)
                else:
                    view[key] = val
                if msg.offset() + 1 >= ends[p]:
                    pending.discard(p)
        if pending:
            raise RuntimeError(f"timed out reading {name}")
        return view
    finally:
        c.close()


async def topic_partitions(consumer: Any, topic: str, timeout: float = 10.0) -> list[Any]:
    """All partitions of `topic` as aiokafka TopicPartitions, for a consumer that assigns them itself.

    A topic created moments ago may be missing from the client's first metadata, and the next
    routine refresh is minutes away, so ask again until it shows up (or the deadline passes).
    """
    from aiokafka import TopicPartition

    deadline = time.monotonic() + timeout
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} does not exist; run `perfex-webhooks topics apply`")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)


async def open_reader(settings: Settings, topic: str) -> tuple[Any, list[Any]]:
    """A started group-less aiokafka consumer assigned every partition of `topic` (full name).

    No consumer group: every worker reads every partition itself; the caller chooses where to start.
    """
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=200,
    )
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
    except RuntimeError:
        await consumer.stop()
        raise
    consumer.assign(tps)
    return consumer, tps


class TopicFollower:
    """Follows every partition of one topic in the background (no consumer group).

    Subclasses choose where reading starts (`_seek_start`) and what a record does (`_apply`);
    `ready` is set once the reader reached the end offsets it saw at start.
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = settings.topic(topic)
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None
        self._tps: list[Any] = []
        self._ends: dict[int, int] = {}

    async def _seek_start(self, tps: list[Any]) -> None:
        await self._consumer.seek_to_beginning(*tps)

    def _apply(self, rec: Any) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._consumer, self._tps = await open_reader(self.settings, self.topic)
        await self._seek_start(self._tps)
        self._ends = {tp.partition: off for tp, off in (await self._consumer.end_offsets(self._tps)).items()}
        if await self._reached(self._ends):
            self.ready.set()
        self._task = asyncio.create_task(self._run(), name=f"follow:{self.topic}")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        # The follower never ends by itself: an exception here (e.g. from `_apply`) is a crash.
        if not task.cancelled() and task.exception() is not None:
            HEALTH.fail(f"follower of {self.topic}", task.exception())  # type: ignore[arg-type]

    async def _run(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=2000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_fatal(exc):  # e.g. a codec it cannot decode: reading again cannot help
                    HEALTH.fail(f"follower of {self.topic}", exc)
                    return
                log.warning("reading %s: %s", self.topic, exc)  # broker restart and the like
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for rec in records:
                    self._apply(rec)
            if not self.ready.is_set() and await self._reached(self._ends):
                self.ready.set()

    async def _reached(self, ends: dict[int, int]) -> bool:
        # The fetch position, not the last record's offset: compaction leaves gaps at the end.
        for tp in self._tps:
            if await self._consumer.position(tp) < ends.get(tp.partition, 0):
                return False
        return True

    async def caught_up(self, timeout: float = 10.0) -> None:
        """Wait until every record written before this call has been read (read-your-writes)."""
        ends = {tp.partition: off for tp, off in (await self._consumer.end_offsets(self._tps)).items()}
        deadline = time.monotonic() + timeout
        while not await self._reached(ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic} view did not catch up within {timeout:.0f}s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()


class TopicTable(TopicFollower):
    """A keyed topic read from the beginning: `.data` holds the last value per key."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        on_change: Callable[[str, Any | None], None] | None = None,
        decode: Callable[[bytes | None], Any] = _decode,
    ) -> None:
        super().__init__(settings, topic)
        self.data: dict[str, Any] = {}
        self._on_change = on_change
        self._decode = decode

    def _apply(self, rec: Any) -> None:
        key = (rec.key or b"").decode("utf-8", "replace")
        val = self._decode(rec.value)
        if val is None:
            self.data.pop(key, None)
        else:
            self.data[key] = val
        if self._on_change is not None:
            try:
                self._on_change(key, val)
            except Exception:
                log.exception("on_change for %s", self.topic)
