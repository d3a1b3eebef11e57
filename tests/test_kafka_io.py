"""The worker's own Kafka clients against the real broker: the producer (app/outbox.py), the
delivery agent's offsets (app/consumers/deliveries.py) and the retry tiers' reads across an
assignment (app/consumers/tiers.py). End to end they are exercised by every delivery test; these
pin down what those cannot see: what is committed while a record is still in flight, how a record
the broker refuses is reported, and what is read while an assignment is still being set up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from app import route
from app.config import Settings
from app.consumers.deliveries import DeliveryAgent
from app.consumers.tiers import RetryTiers
from app.delivery import Delivery
from app.outbox import Outbox, PublishError
from app.successes import RecentSuccesses
from app.throttle import Throttle
from app.topics import apply

pytestmark = pytest.mark.kafka


def test_outbox_acks_with_the_offset_and_refuses_an_oversized_record_at_once(settings: Settings) -> None:
    apply(settings)

    async def go() -> None:
        outbox = Outbox(settings)
        await outbox.start()
        try:
            first = await outbox.publish("webhooks.attempts", "ep_1", b"{}")
            second = await outbox.publish("webhooks.attempts", "ep_1", {"n": 2})  # same key, same partition
            assert second == first + 1
            started = time.monotonic()
            with pytest.raises(PublishError) as refused:
                await outbox.publish("webhooks.attempts", "ep_1", b"x" * 3_000_000)  # topic limit: 2 MiB
            assert not refused.value.retriable
            assert time.monotonic() - started < 10  # reported, not retried until a timeout
            # The fan-out's path: no future, each record's report calls back once, on the loop.
            reports: list[Any] = []
            done = asyncio.Event()

            def on_report(err: Any) -> None:
                reports.append(err)
                if len(reports) == 2:
                    done.set()

            await outbox.send_reported("webhooks.attempts", "ep_1", b"{}", on_report)
            await outbox.send_reported("webhooks.attempts", "ep_1", b"x" * 3_000_000, on_report)
            await asyncio.wait_for(done.wait(), 10)
            # The good one landed, the oversized one did not (refused locally: it may report first).
            assert sorted(r is None for r in reports) == [False, True]
            refusal = next(r for r in reports if r is not None)
            assert not PublishError(refusal).retriable
        finally:
            await outbox.stop()

    asyncio.run(go())


def test_a_prompt_outbox_is_acked_without_spinning_the_event_loop(settings: Settings) -> None:
    """What an HTTP caller waits on (`POST /api/events`) goes through a producer with no linger whose
    reports are polled every millisecond: uvloop's timers count whole milliseconds, and a shorter
    delay made the loop poll ~2,000 times per record while the ack was out."""
    import uvloop

    apply(settings)

    async def go() -> None:
        outbox = Outbox(settings, prompt=True)
        await outbox.start()
        polls = 0
        poll = outbox._poll

        def counted() -> None:
            nonlocal polls
            polls += 1
            poll()

        outbox._poll = counted  # type: ignore[method-assign]
        try:
            await outbox.publish("webhooks.attempts", "ep_p", b"{}")  # connections, producer id
            polls, started = 0, time.monotonic()
            offsets = [await outbox.publish("webhooks.attempts", "ep_p", {"n": i}) for i in range(20)]
            elapsed_ms = (time.monotonic() - started) * 1000
            assert offsets == list(range(offsets[0], offsets[0] + 20))  # each acked, in order
            # At most one poll per millisecond waited (and one per record); a busy loop is hundreds.
            assert polls <= elapsed_ms + 2 * 20, (polls, elapsed_ms)
        finally:
            await outbox.stop()

    uvloop.run(go())


class HoldingDispatcher:
    """Records what it is given; the deliveries named in `held` wait until released."""

    def __init__(self, settings: Settings, held: set[str]) -> None:
        # What a consumer catches up on assignment (app/successes.py), on the test's broker.
        self.successes = RecentSuccesses(settings)
        self.seen: list[str] = []
        self.parked: list[str] = []
        self.release = asyncio.Event()
        self.held = held
        self.throttle = Throttle()  # the agent sets this worker's share of endpoints' max_rate
        # The agent's ordering sequencer reads these; no endpoint here asks for ordered delivery.
        self.outbox: Any = None
        self.registry: dict[str, Any] = {}

    async def dispatch(self, d: Delivery, tier: int | None = None) -> None:
        self.seen.append(d.id)
        if d.id in self.held:
            await self.release.wait()

    async def park_poison(self, key: Any, value: Any, topic: str, partition: int, offset: int, error: Any) -> None:
        self.parked.append(f"{type(error).__name__} at {offset}")


def _delivery(i: int) -> bytes:
    return Delivery(
        id=f"dlv_{i}",
        endpoint_id="ep_1",
        event="invoice.updated",
        event_id=f"evt_{i}",
        occurred_at="2026-11-27T10:00:00.000Z",
        occurred_ts=0.0,
        resource_key="invoice:1",
        data={"id": "1"},
    ).encode()


def test_delivery_agent_commits_only_up_to_the_first_unfinished_record(settings: Settings) -> None:
    apply(settings)
    topic = settings.topic("webhooks.deliveries")
    p = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(20):
        p.produce(topic, _delivery(i), b"invoice:1", partition=0)
    p.produce(topic, b"not json", b"invoice:1", partition=0)  # offset 20: parked, not a stall
    assert p.flush(10) == 0
    group = f"{settings.group_id}.deliveries"
    probe = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})

    def committed() -> int:
        (tp,) = probe.committed([TopicPartition(topic, 0)], timeout=5)
        return tp.offset

    async def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(check):
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    async def go() -> None:
        dispatcher = HoldingDispatcher(settings, held={"dlv_5"})
        agent = DeliveryAgent(settings, dispatcher)  # type: ignore[arg-type]
        await agent.start()
        try:
            await wait_for(lambda: len(dispatcher.seen) == 20 and dispatcher.parked, "all records taken")
            # Records 0-4 are done and so are 6-20, but 5 is in flight: the commit stops at 5, so a
            # crash now would deliver 5 again (and 6-20 as duplicates), never skip it.
            await wait_for(lambda: committed() == 5, "commit up to the unfinished record")
            await asyncio.sleep(2 * 1.0)  # two commit intervals: it must not move past 5
            assert committed() == 5
            dispatcher.release.set()
            await wait_for(lambda: committed() == 21, "commit of everything once it finished")
            assert dispatcher.parked == ["InvalidDelivery at 20"]
        finally:
            await agent.stop()

    try:
        asyncio.run(go())
    finally:
        probe.close()


class SlowCatchUp(RecentSuccesses):
    """The catch-up a consumer runs on assignment, slow (the attempt log's tail on a loaded host);
    `started` is set when it has begun."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.started = asyncio.Event()

    async def catch_up_async(self) -> int:
        n = await super().catch_up_async()
        self.started.set()
        await asyncio.sleep(3)
        return n


def test_retry_tiers_read_what_is_fetched_while_their_assignment_is_still_being_set_up(
    settings: Settings,
) -> None:
    """aiokafka makes a new assignment fetchable before it calls the rebalance listener, so records
    come back while `on_partitions_assigned` still awaits the successes catch-up. A record due then
    must be taken (not skipped as not ours), and a partition paused then for a record not yet due
    must be resumed when it is due (issue 18: an ordered head's retry was lost this way)."""
    apply(settings)
    topic = route.tier_topics(settings)[0]
    group = f"{settings.group_id}.retry"
    probe = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})

    def committed() -> list[int]:
        return [tp.offset for tp in probe.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=5)]

    def produce() -> None:  # while the listener waits for its catch-up
        p = Producer({"bootstrap.servers": settings.bootstrap_servers})
        now = time.time()
        for i, (partition, due) in enumerate([(0, now - 1), (0, now - 1), (1, now + 1.5), (1, now - 1)]):
            p.produce(topic, _delivery(i), b"invoice:1", partition=partition, headers=route.due_header(due))
        assert p.flush(10) == 0

    async def go() -> None:
        dispatcher = HoldingDispatcher(settings, held=set())
        dispatcher.successes = catch_up = SlowCatchUp(settings)
        tiers = RetryTiers(settings, dispatcher)  # type: ignore[arg-type]
        await tiers.start()
        try:
            # A fresh broker on a loaded host: the group's first join may take a while.
            await asyncio.wait_for(catch_up.started.wait(), 90)
            await asyncio.to_thread(produce)
            deadline = time.monotonic() + 30
            while (done := await asyncio.to_thread(committed)) != [2, 2] or len(dispatcher.seen) < 4:
                assert time.monotonic() < deadline, (dispatcher.seen, done)
                await asyncio.sleep(0.2)
            assert sorted(dispatcher.seen) == [f"dlv_{i}" for i in range(4)]  # each once
            assert dispatcher.seen.index("dlv_2") < dispatcher.seen.index("dlv_3")  # due order kept
        finally:
            await tiers.stop()

    try:
        asyncio.run(go())
    finally:
        probe.close()


class RaisingDispatcher(HoldingDispatcher):
    """Raises for one delivery id, every time: a valid record whose handling fails."""

    def __init__(self, settings: Settings, bad: str) -> None:
        super().__init__(settings, held=set())
        self.bad = bad
        self.tries = 0

    async def dispatch(self, d: Delivery) -> None:
        self.seen.append(d.id)
        if d.id == self.bad:
            self.tries += 1
            raise RuntimeError("handling failed")


def test_a_valid_record_whose_handling_raises_is_tried_three_times_then_parked(settings: Settings) -> None:
    apply(settings)
    topic = settings.topic("webhooks.deliveries")
    p = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(3):
        p.produce(topic, _delivery(i), b"invoice:1", partition=0)
    assert p.flush(10) == 0
    group = f"{settings.group_id}.deliveries"
    probe = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})

    async def go() -> None:
        dispatcher = RaisingDispatcher(settings, bad="dlv_1")
        agent = DeliveryAgent(settings, dispatcher)  # type: ignore[arg-type]
        await agent.start()
        try:
            deadline = time.monotonic() + 30
            while True:
                (tp,) = await asyncio.to_thread(probe.committed, [TopicPartition(topic, 0)], 5)
                if tp.offset == 3:
                    break  # committed past the record that always fails: it never stalls commits
                assert time.monotonic() < deadline, f"committed {tp.offset}"
                await asyncio.sleep(0.1)
            assert dispatcher.tries == 3
            assert dispatcher.parked == ["RuntimeError at 1"]
            assert dispatcher.seen.count("dlv_0") == dispatcher.seen.count("dlv_2") == 1
        finally:
            await agent.stop()

    try:
        asyncio.run(go())
    finally:
        probe.close()


def test_outbox_recreates_its_producer_after_a_fatal_error_then_gives_up(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#11 item 6. librdkafka raises a fatal error (an idempotent producer's lost sequence, a fenced
    id) only in states a healthy broker does not reach on demand, and Python has no hook to inject
    one; so the error callback is handed the error librdkafka would pass it. Everything else is
    real: the producers and the broker they write to."""
    from confluent_kafka import KafkaError

    from app import health

    apply(settings)
    fatal = KafkaError(KafkaError._FATAL, "OUT_OF_ORDER_SEQUENCE_NUMBER (as librdkafka reports it)", fatal=True)
    probe = health.Health()  # the process's record, fresh for this test
    monkeypatch.setattr("app.outbox.HEALTH", probe)

    async def go() -> None:
        outbox = Outbox(settings)
        await outbox.start()
        try:
            before = await outbox.publish("webhooks.attempts", "ep_f", b"{}")
            first = outbox._producer
            # A record in flight when the producer fails is sent again through the new one.
            in_flight = asyncio.ensure_future(outbox.publish("webhooks.attempts", "ep_f", {"n": 1}))
            outbox._on_error(fatal, first)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert outbox.recreations == 1 and outbox._producer is not first
            assert await asyncio.wait_for(in_flight, 30) > before
            assert await outbox.publish("webhooks.attempts", "ep_f", b"{}") > before  # the new one writes
            assert probe.ok
            # A stale report from the replaced producer does not replace the new one again.
            outbox._on_error(fatal, first)
            await asyncio.sleep(0.05)
            assert outbox.recreations == 1
            # Fatal again and again within the window: recreating does not help; the worker's health
            # fails (its /ready turns 503 and it exits 70: tests/test_codecs.py covers that path).
            for _ in range(3):
                outbox._on_error(fatal, outbox._producer)
                await asyncio.sleep(0.05)
            assert outbox.recreations == 3
            assert not probe.ok and (probe.failure or "").startswith("producer: fatal errors 4 times")
        finally:
            await outbox.stop()

    asyncio.run(go())
