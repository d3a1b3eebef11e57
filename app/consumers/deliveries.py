"""The delivery agent: consumes `webhooks.deliveries` (async and smart deliveries) and dispatches them.

A librdkafka consumer (confluent-kafka) in the consumer group `<group>.deliveries`, not a Faust
agent: this is the hot path of async mode, and Faust's per-message stream machinery plus aiokafka's
Python fetch cost about twice the HTTP attempt itself (docs/performance.md). librdkafka fetches and
decodes in its own C threads; one Python thread takes batches from it and hands them to the event
loop, where each record becomes one `Dispatcher.dispatch` task (bounded: at most `max_in_flight * 8`
records held, and the Dispatcher's global and per-endpoint caps on top). The thread never waits
for room: when the cap is reached it takes nothing new but keeps polling (every 50 ms, keeping what
a poll returns), so a hung endpoint cannot keep it from polling past max.poll.interval and cost the
worker its group membership; only a long stall pauses its partitions (a pause purges librdkafka's
prefetched records, which a resume fetches again: too dear for every busy spell).

Offsets are committed only up to the first record not yet finished (app/consumers/base.py). A
record that is not a valid delivery, or whose dispatch raised three times, is parked in the DLQ as
poison and finished: commits never wait on it. On revocation the agent lets the revoked partitions' in-flight records finish (an
attempt never outlives the delivery timeout) and commits them before the partitions move.

What a broker failover costs (issue 11, tests/test_failover.py): while the group coordinator is
gone, commits fail and the group session may time out; the partitions are then lost and read again
from the last commit, and the fan-out may publish a delivery again. A failed commit is offered
again at the next commit (`_on_commit`); the Dispatcher skips a delivery recorded as delivered
(app/successes.py), and a delivery whose id is being attempted right now waits for that attempt and
is then skipped if it succeeded (`Dispatcher.dispatch`), so neither copy becomes a second request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from app import route
from app.config import Settings
from app.consumers.base import RecordConsumer
from app.delivery import Delivery
from app.dispatch import Dispatcher
from app.health import HEALTH
from app.ordering import Ordering, read_marker

log = logging.getLogger(__name__)

BATCH = 500
# Commits follow finished records closely (at most this much later): after a crash the next owner
# re-reads only what finished since (and the Dispatcher skips those recorded as delivered).
COMMIT_INTERVAL = 0.1
HANDOVER_WAIT = 0.5  # longest the thread waits for the loop to take a batch (then it polls meanwhile)
STALLED_POLL = 0.05  # while there is no room: how often the thread polls (rebalances, max.poll.interval)
# Fetched records librdkafka keeps ahead of the loop: seconds of work at any rate measured (8 MB is
# ~5,000 deliveries of 1.5 kB); bounds the worker's memory now that backpressure no longer pauses.
PREFETCH_KB = 8192


class DeliveryAgent(RecordConsumer[int]):
    """Partitions are named by number (one topic)."""

    name = "delivery agent"

    def __init__(
        self, settings: Settings, dispatcher: Dispatcher, tasks: set[asyncio.Future[Any]] | None = None
    ) -> None:
        super().__init__(settings, dispatcher, max_records=settings.max_in_flight * 8, tasks=tasks)
        self.topic = settings.topic(route.DELIVERIES)
        self.group_id = f"{settings.group_id}.deliveries"
        self.lag = 0  # records behind the end of the assigned partitions, updated by the thread
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._stalled: list[Any] = []  # records polled while there was no room (consumer thread)
        self._partitions = 0  # of self.topic, for the throttle's share
        # Ordered endpoints' deliveries go through their (endpoint, resource) sequence (app/ordering.py).
        self.ordering = Ordering(settings, dispatcher)
        self.ordering.successes = dispatcher.successes

    # ---- lifecycle (event loop) -------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.ordering.start()
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                # A SIGKILLed worker's partitions move after this long; heartbeats run in librdkafka.
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 2_000,
                "max.poll.interval.ms": int(self.settings.max_poll_interval * 1000),
                "queued.max.messages.kbytes": PREFETCH_KB,
                "socket.nagle.disable": True,  # a fetch request goes out at once (app/producer.py)
                "on_commit": self._on_commit,
                "log_level": 4,
            },
            logger=logging.getLogger("perfex_webhooks.librdkafka"),
        )
        # Counted here, not in a rebalance callback: a client call that releases the GIL inside a
        # callback (list_topics) clears confluent-kafka's per-thread call state, and the next
        # callback of the same poll then aborts the process (CallState_get: assertion cs != NULL).
        self._partitions = await asyncio.to_thread(self._count_partitions, self._consumer)
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._running = True
        self._thread = threading.Thread(target=self._run, name="delivery-agent", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop taking records, let the started ones finish, commit them and leave the group."""
        if self._consumer is None:
            return
        self._running = False
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.settings.delivery_timeout + 10)
        mine = [t for t in self.tasks if not t.done()]
        if mine:
            await asyncio.wait(mine, timeout=self.settings.delivery_timeout + 2)
        consumer, self._consumer = self._consumer, None
        await asyncio.to_thread(self._close, consumer)
        await self.ordering.stop()

    def _close(self, consumer: Consumer) -> None:
        try:
            self._commit(consumer, asynchronous=False)
        finally:
            consumer.close()  # leaves the group: the partitions move at once

    # ---- the consumer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        consumer, loop = self._consumer, self._loop
        assert consumer is not None and loop is not None
        last_commit = last_lag = time.monotonic()
        handover: concurrent.futures.Future[None] | None = None  # a batch the loop has not taken yet
        paused = False
        while self._running:
            try:
                if handover is not None and handover.done():
                    handover = None
                if self.full or handover is not None:
                    # No room: take nothing new. librdkafka's queue fills to its bound and stops
                    # fetching by itself; poll only to serve rebalance callbacks and stay within
                    # max.poll.interval (keeping what it hands back). Pausing would purge the queue
                    # and fetch it all again on resume, per busy spell (docs/performance.md 8), so
                    # it is kept for a long stall (a hung endpoint holding every slot).
                    if len(self._stalled) >= BATCH:
                        consumer.pause(consumer.assignment())  # again each round: new partitions too
                        paused = True
                    time.sleep(STALLED_POLL)
                    msg = consumer.poll(0)  # rebalance callbacks run inside this call
                    if msg is not None:
                        self._stalled.append(msg)
                else:
                    if paused:
                        consumer.resume(consumer.assignment())
                        paused = False
                    if self._stalled:
                        msgs, self._stalled = self._stalled, []
                    else:
                        first = consumer.poll(0.2)  # rebalance callbacks run inside this call
                        msgs = [first] if first is not None else []
                        if first is not None:
                            msgs += consumer.consume(BATCH - 1, 0)  # whatever else is already fetched
                    if msgs:
                        handover = asyncio.run_coroutine_threadsafe(self._take(msgs), loop)
                        try:  # `take` never waits: this is only as long as the loop is busy
                            handover.result(HANDOVER_WAIT)
                        except concurrent.futures.TimeoutError:
                            pass  # still handed over; nothing more taken until the loop has it
                now = time.monotonic()
                if now - last_commit >= COMMIT_INTERVAL:
                    last_commit = now
                    self._commit(consumer, asynchronous=True)
                if now - last_lag >= 1.0:
                    last_lag = now
                    self.lag = self._lag(consumer)
            except RuntimeError:  # the event loop closed under us: the worker is exiting
                return
            except Exception:  # never let the agent die: log and keep consuming
                log.exception("delivery agent")
                time.sleep(0.5)

    def _drop_stalled(self, partitions: set[int]) -> None:
        """Records polled while there was no room, of partitions assigned, revoked or lost just now:
        their next reader (this worker from the committed offset, or another) reads them again."""
        if self._stalled:
            self._stalled = [m for m in self._stalled if m.partition() not in partitions]

    def _commit(self, consumer: Consumer, *, asynchronous: bool) -> None:
        offsets = self.book.to_commit()
        if offsets:
            try:
                consumer.commit(
                    offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                    asynchronous=asynchronous,
                )
            except Exception as exc:  # committed again next time; at worst re-delivered
                log.warning("delivery agent commit failed: %s", exc)
                self.book.failed(offsets)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """An asynchronous commit's result (consumer thread, inside poll). One that failed (no group
        coordinator in a broker failover) is offered again at the next commit, so the committed
        offset catches up as soon as a coordinator answers instead of when more records finish."""
        failed = [tp.partition for tp in partitions if err is not None or tp.error is not None]
        if failed:
            self.book.failed(failed)
            log.info("delivery agent commit of %s failed (%s): offered again", sorted(failed), err)

    def _lag(self, consumer: Consumer) -> int:
        total = 0
        for tp in consumer.assignment():
            try:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                pos = None if self.book.committed(tp.partition) is not None else consumer.position([tp])[0].offset
            except Exception:
                continue
            total += self.lag_of(tp.partition, high, pos) or 0
        return total

    # ---- rebalance callbacks (consumer thread, inside poll) ---------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop_stalled({tp.partition for tp in partitions})
        if partitions:
            self.learn_successes()
            self._load_ordering([tp.partition for tp in partitions])
        self.book.assign(tp.partition for tp in partitions)
        self._share(consumer)
        log.info("delivery agent assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions}
        self._drop_stalled(revoked)
        self.ordering.revoking |= revoked  # a release in progress hands its rest to the next owner
        if self._loop is not None and self._running:
            drain = asyncio.run_coroutine_threadsafe(
                self.book.until_finished(revoked, self.settings.delivery_timeout + 2), self._loop
            )
            try:
                drain.result(self.settings.delivery_timeout + 5)
            except Exception as exc:
                log.warning("draining revoked partitions: %r", exc)
        self._commit(consumer, asynchronous=False)
        self.book.forget(revoked)
        self._share(consumer)
        self.ordering.forget(list(revoked))
        log.info("delivery agent revoked %s", sorted(revoked))

    def _count_partitions(self, consumer: Consumer) -> int:
        try:
            return len(consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions)
        except Exception as exc:  # the declared count then (topics.yaml): a share, not a guarantee
            from app.topics import load_specs

            declared = next(s.partitions for s in load_specs() if self.settings.topic(s.name) == self.topic)
            log.warning("delivery agent: partitions of %s unknown (%s); assuming %d", self.topic, exc, declared)
            return declared

    def _share(self, consumer: Consumer) -> None:
        """This worker's share of every endpoint's max_rate: the fraction of this topic's partitions
        it owns (app/throttle.py explains the approximation). Called from rebalance callbacks: no
        client call here (see start)."""
        self.dispatcher.throttle.set_share(len(self.book.partitions), max(1, self._partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Already someone else's: committing now would be refused; their owner re-delivers.
        self._drop_stalled({tp.partition for tp in partitions})
        self.book.forget(tp.partition for tp in partitions)
        self._share(consumer)
        self.ordering.forget([tp.partition for tp in partitions])
        log.warning("delivery agent lost %s", sorted(tp.partition for tp in partitions))

    def _load_ordering(self, partitions: list[int]) -> None:
        """The blocked sequences of new partitions, before any of their records is taken (on the
        loop; this thread waits, tried again until it works: a record of a blocked sequence must
        never be attempted as if it were not)."""
        if self._loop is None:
            return
        while True:
            try:
                asyncio.run_coroutine_threadsafe(self.ordering.load(partitions), self._loop).result(60)
                return
            except Exception as exc:
                if not self._running or self._loop.is_closed():
                    return
                log.warning("ordering: loading blocked sequences of %s failed (%r); again", partitions, exc)
                time.sleep(0.5)

    # ---- the event loop side ----------------------------------------------------------------------
    async def _take(self, msgs: list[Any]) -> None:
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():  # librdkafka gave this consumer up: only a new process helps
                    HEALTH.fail("delivery agent consumer", err.str())
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("delivery agent: %s", err.str())
                continue
            # A record fetched just before its partition was revoked is skipped: its next owner reads it.
            self.take(msg.partition(), msg.offset(), msg.key(), msg.value())

    def where(self, partition: int) -> tuple[str, int]:
        return self.topic, partition

    async def _handle(self, partition: int, offset: int, value: bytes | None) -> BaseException | None:
        release = read_marker(value)
        if release is None:
            return await super()._handle(partition, offset, value)
        try:
            await self.ordering.release(partition, *release)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # parked as poison: the partition's commits never wait on it
            log.exception("delivery agent: ordering release at %s offset %s failed", partition, offset)
            return exc
        return None

    async def deliver(self, partition: int, delivery: Delivery) -> None:
        if self.ordering.applies(partition, delivery):
            await self.ordering.deliver(partition, delivery)
        else:
            await self.dispatcher.dispatch(delivery)
