"""The worker's Kafka producer: deliveries, tier moves, DLQ, attempts, registry writes.

librdkafka (confluent-kafka) rather than aiokafka: every delivery produces at least one record
(its attempt) and an async one two, and librdkafka batches, encodes and sends them in its own C
threads, where aiokafka does that work in Python on the event loop (docs/performance.md).
Delivery reports are served on the event loop itself (`poll(0)` every couple of milliseconds
while records are unacknowledged), so each callback resolves its future directly: no thread, no
hand-over between threads, nothing polled when nothing is pending.

`send` returns once the record is queued and hands back a future for the broker's acknowledgement;
callers that must not lose the record (a tier move before its source offset is committed) await it.
A worker has two: the hot path's batches records for 20 ms (throughput), and a `prompt` one for
writes an HTTP caller waits on (`POST /api/events`, admin writes), which sends at once.
The partitioner is murmur2_random, the same as the Java client, aiokafka and `emit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from app.config import Settings
from app.health import HEALTH
from app.topics import largest_record_bytes

log = logging.getLogger(__name__)

# Errors a retry cannot fix: the record itself is refused.
_FATAL_RECORD = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError._INVALID_ARG,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}


# More fatal errors than this within the window: recreating does not help; the worker exits.
MAX_RECREATES = 3
RECREATE_WINDOW = 300.0


class PublishError(Exception):
    """A record the broker refused; `retriable` says whether sending it again may succeed."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.error = error
        # A fatal error is the producer's, not the record's: the Outbox recreates the producer,
        # and the record can be sent again through the new one.
        self.retriable = error.fatal() or error.code() not in _FATAL_RECORD


class Outbox:
    def __init__(self, settings: Settings, *, prompt: bool = False) -> None:
        """`prompt`: no linger and reports served every 1 ms, for writes a caller is waiting on.
        The 20 ms linger was most of a POST /api/events' latency (p50 25.4-26.4 ms against 2.9-6.2
        without, one request at a time, docs/performance.md 10.1) and capped a client's rate."""
        self.settings = settings
        self._linger_ms = 0 if prompt else 20
        # uvloop's timers count whole milliseconds: a shorter delay is 0, a busy loop (2,065 polls
        # per publish at 0.5 ms).
        self._poll_s = 0.001 if prompt else 0.002
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0  # records produced with a future and not yet reported
        self.dropped = 0  # untracked records refused because the local queue was full
        self._poller: asyncio.Handle | None = None
        self._retired: list[Producer] = []  # replaced after a fatal error, still serving reports
        self._recreated: list[float] = []  # monotonic times of recent recreations
        self.recreations = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        made: list[Producer] = []  # lets its error callback say which producer failed
        made.append(
            Producer(
                {
                    "bootstrap.servers": self.settings.bootstrap_servers,
                    "acks": "all",
                    "enable.idempotence": True,
                    "partitioner": "murmur2_random",
                    # Batches of ~20 ms: async throughput 0.41-0.44 -> 0.48-0.71 of the bare client
                    # against 2 ms (docs/performance.md). No caller's latency waits on it but async and
                    # smart deliveries and retry moves; what an HTTP caller waits on is `prompt`.
                    "linger.ms": self._linger_ms,
                    "socket.nagle.disable": True,  # as app/producer.py: no wait for a TCP ACK
                    "message.max.bytes": largest_record_bytes(self.settings),
                    # A record not acked in this long fails its future; `publish` then sends it again.
                    "message.timeout.ms": 30_000,
                    "socket.keepalive.enable": True,
                    "log_level": 4,
                    "error_cb": lambda err: self._on_error(err, made[0] if made else None),
                },
                logger=logging.getLogger("perfex_webhooks.librdkafka"),
            )
        )
        return made[0]

    # ---- fatal errors: a new producer ------------------------------------------------------------
    def _on_error(self, err: KafkaError, producer: Producer | None) -> None:
        # Called from poll(), on the event loop (also for a record's report or a refused produce).
        # A fatal error (e.g. the idempotent producer lost its sequence) leaves that producer
        # refusing everything for good: replace it, once.
        if not err.fatal() or self._loop is None or producer is None:
            return
        self._loop.call_soon(self._recreate, producer, err.str())

    def _recreate(self, old: Producer, reason: str) -> None:
        if old is not self._producer:
            return  # stopped, or already replaced
        log.error("producer fatal error: %s; recreating the producer", reason)
        now = time.monotonic()
        self._recreated = [t for t in self._recreated if now - t < RECREATE_WINDOW] + [now]
        if len(self._recreated) > MAX_RECREATES:
            HEALTH.fail("producer", f"fatal errors {len(self._recreated)} times within {RECREATE_WINDOW:.0f}s: {reason}")
            return
        try:
            self._producer = self._new_producer()
        except Exception as exc:
            HEALTH.fail("producer", exc)
            return
        self.recreations += 1
        # The old producer fails what it still holds (reports with the fatal error): serve them so
        # each caller's `publish` sends its record again through the new producer.
        self._retired.append(old)
        with contextlib.suppress(Exception):
            old.purge()
        self._serve_retired()
        log.warning("producer recreated after a fatal error (%d so far)", self.recreations)

    def _serve_retired(self) -> None:
        for old in list(self._retired):
            with contextlib.suppress(Exception):
                old.poll(0)
            if len(old) == 0:
                self._retired.remove(old)
        if self._retired and self._loop is not None:
            self._loop.call_later(0.05, self._serve_retired)

    async def stop(self) -> None:
        if self._producer is None:
            return
        await self.flush()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._producer = None

    # ---- delivery reports, served on the loop -----------------------------------------------------
    def _schedule_poll(self, delay: float) -> None:
        if self._poller is None and self._loop is not None:
            self._poller = self._loop.call_later(delay, self._poll)

    def _poll(self) -> None:
        self._poller = None
        if self._producer is None:
            return
        served = self._producer.poll(0)  # runs the report callbacks for every record acked since
        if self._pending > 0 or len(self._producer) > 0:
            # Busy: look again soon. Acks come in batches (linger.ms), so 2 ms costs no latency
            # that matters and keeps the polling cheap; after a poll that served some, at the
            # loop's next turn (uvloop makes 0.5 ms 0), as more of the batch may be in.
            self._schedule_poll(0.0005 if served else self._poll_s)

    def _report(self, fut: asyncio.Future[Any], err: Any, msg: Any, producer: Producer) -> None:
        self._pending -= 1
        if err is not None:
            self._on_error(err, producer)
        if fut.done():
            return
        if err is None:
            fut.set_result(msg.offset())
        else:
            fut.set_exception(PublishError(err))

    # ---- API ---------------------------------------------------------------------------------------
    async def send(
        self,
        topic: str,
        key: str | bytes | None,
        value: bytes | dict[str, Any] | None,
        *,
        full_name: bool = False,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one record on a logical topic (prefix added unless full_name); returns the ack future."""
        producer = self._producer
        assert producer is not None and self._loop is not None, "Outbox.start() first"
        raw = value if value is None or isinstance(value, bytes) else orjson.dumps(value)
        name = topic if full_name else self.settings.topic(topic)
        fut: asyncio.Future[Any] = self._loop.create_future()
        kw: dict[str, Any] = {"on_delivery": lambda err, msg: self._report(fut, err, msg, producer)}
        if partition is not None:
            kw["partition"] = partition
        if headers:
            kw["headers"] = headers
        while True:
            try:
                producer.produce(name, raw, key, **kw)
                self._pending += 1
                self._schedule_poll(self._poll_s)
                return fut
            except BufferError:  # librdkafka's queue is full: let it drain (backpressure)
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                err = exc.args[0]
                self._on_error(err, producer)
                fut.set_exception(PublishError(err))
                return fut

    async def send_reported(
        self, topic: str, key: str | bytes | None, value: bytes, on_report: Callable[[Any], None]
    ) -> None:
        """Queue a record and call `on_report(error or None)` from its delivery report (on the loop).

        The fan-out's hot path: no asyncio future per record, the reports of a whole linger batch
        are served by one poll. A fatal producer error is handled as for `send`; the caller sends a
        refused record again (through `publish`)."""
        producer = self._producer
        assert producer is not None, "Outbox.start() first"

        def report(err: Any, _msg: Any) -> None:
            self._pending -= 1
            if err is not None:
                self._on_error(err, producer)
            on_report(err)

        name = self.settings.topic(topic)
        while True:
            try:
                producer.produce(name, value, key, on_delivery=report)
                self._pending += 1
                self._schedule_poll(self._poll_s)
                return
            except BufferError:  # librdkafka's queue is full: let it drain (backpressure)
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                err = exc.args[0]
                self._on_error(err, producer)
                on_report(err)
                return

    def send_untracked(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        """Queue a record whose acknowledgement nobody waits for (the attempt log): no future, no
        report callback. librdkafka still retries it until `message.timeout.ms`; one it finally cannot
        deliver is missing from the log, the attempt itself is unaffected (`send` for anything that
        matters)."""
        producer = self._producer
        assert producer is not None, "Outbox.start() first"
        try:
            producer.produce(self.settings.topic(topic), value, key)
        except BufferError:  # the queue is full: the broker is away; observability gives way
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("producer queue full: %d attempt-log records dropped so far", self.dropped)
            return
        except KafkaException as exc:
            log.warning("attempt log record refused: %s", exc)
            return
        self._schedule_poll(self._poll_s)

    async def send_and_wait(self, topic: str, key: str | bytes | None, value: Any, **kw: Any) -> Any:
        return await (await self.send(topic, key, value, **kw))

    async def publish(self, topic: str, key: str | bytes | None, value: Any, **kw: Any) -> Any:
        """Send and wait for the broker's ack, retrying through a broker outage until it lands.

        For records whose loss would lose a delivery (tier moves, DLQ, async deliveries, invalid
        input): the caller commits its source offset only after this returns, so giving up here
        would turn an outage into a silent drop. Duplicates are possible; losses are not.
        """
        backoff = 0.2
        while True:
            try:
                return await self.send_and_wait(topic, key, value, **kw)
            except PublishError as exc:
                if not exc.retriable:
                    raise  # e.g. a record over the topic's size limit: retrying cannot help
                log.warning("publishing to %s failed (%s); retrying in %.1fs", topic, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued record is acknowledged or failed (reports served here, on the loop)."""
        producer = self._producer
        if producer is None:
            return
        deadline = time.monotonic() + timeout
        while len(producer) > 0 and time.monotonic() < deadline:
            producer.poll(0)
            await asyncio.sleep(0.005)
        producer.poll(0)
