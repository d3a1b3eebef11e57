"""Unit tests of the pure pieces: tier choice, offset bookkeeping, smart due times, Retry-After, config."""

from __future__ import annotations

import email.utils

import pytest

from app import route
from app.config import ConfigError, Settings, parse_duration
from app.delivery import Delivery, InvalidDelivery, parse_retry_after
from app.events import ChangeEvent
from app.offsets import OffsetBook, PartitionOffsets, lag
from app.smart import add_event, due_at, event_of


def delivery(failures: int) -> Delivery:
    return Delivery(
        id="dlv_x",
        endpoint_id="ep_x",
        event="invoice.paid",
        event_id="evt_x",
        occurred_at="2026-11-27T10:00:00.000Z",
        occurred_ts=0.0,
        resource_key="invoice:1",
        data={"id": "1"},
        failures=failures,
    )


def test_failures_walk_the_eight_tiers_then_the_dlq() -> None:
    s = Settings()
    hops = [route.after_failure(s, n, "http_error") for n in range(1, 10)]
    assert [h.topic for h in hops[:8]] == [f"webhooks.retry.{x}" for x in "30s 1m 5m 15m 1h 6h 12h 24h".split()]
    assert [h.label for h in hops[:2]] == ["30s", "1m"]  # type: ignore[union-attr]
    assert hops[8] == route.Dead("retries_exhausted")
    assert route.after_failure(s, 1, "gone") == route.Dead("gone")
    assert route.after_failure(s, 1, "forbidden") == route.Dead("forbidden_target")
    # Deferred without an attempt (endpoint saturated): the first tier, or back into its own tier.
    assert route.deferred(s, 0, None) == route.Tier(0)
    assert route.deferred(s, 3, 2) == route.Defer(2)


def test_shorter_schedule_uses_the_first_tiers() -> None:
    s = Settings.from_env({"WEBHOOKS_RETRY_SCHEDULE": "100ms,200ms"})
    assert s.retry_schedule == (0.1, 0.2)
    assert route.after_failure(s, 2, "timeout") == route.Tier(1)
    assert route.Tier(1).topic == "webhooks.retry.1m"
    assert route.after_failure(s, 3, "timeout") == route.Dead("retries_exhausted")
    assert route.tier_topics(s) == ["webhooks.retry.30s", "webhooks.retry.1m"]


def test_before_attempt_parks_for_a_missing_or_disabled_endpoint_and_waits_out_retry_after() -> None:
    assert route.before_attempt(None, None, None, 100.0) == route.Dead("endpoint_deleted")
    assert route.before_attempt(False, None, 3, 100.0) == route.Dead("endpoint_disabled")
    assert route.before_attempt(True, 200.0, 3, 100.0) == route.Defer(3)  # Retry-After not over yet
    assert route.before_attempt(True, 200.0, None, 100.0) is None  # fresh: attempted
    assert route.before_attempt(True, 50.0, 3, 100.0) is None


def test_offsets_commit_only_the_finished_prefix() -> None:
    o = PartitionOffsets()
    for off in (10, 11, 12):
        o.start(off)
    o.finish(11)
    assert o.unfinished == 2
    assert o.committable() is None  # 10 still in flight
    o.finish(10)
    assert o.committable() == 12
    o.finish(12)
    assert o.unfinished == 0  # finished before committable() pops them: a drain can end here
    assert o.committable() == 13 and o.unfinished == 0


def test_offset_book_commits_each_finished_prefix_once_and_again_after_a_failed_commit() -> None:
    book: OffsetBook[int] = OffsetBook()
    book.assign([0, 1])
    for off in (5, 6):
        book.get(0).start(off)  # type: ignore[union-attr]
    book.get(0).finish(6)  # type: ignore[union-attr]
    assert book.to_commit() == {}  # 5 still in flight
    book.get(0).finish(5)  # type: ignore[union-attr]
    assert book.to_commit() == {0: 7} and book.committed(0) == 7
    assert book.to_commit() == {}  # nothing new
    book.failed([0])
    assert book.to_commit([0]) == {0: 7}  # offered again after a failed commit
    book.forget([0])
    assert book.get(0) is None and book.committed(1) is None


def test_lag_is_end_minus_committed_or_position() -> None:
    assert lag(100, 90, None) == 10
    assert lag(100, None, 40) == 60  # nothing committed yet: the fetch position
    assert lag(100, 120, None) == 0
    assert lag(None, 90, None) is None and lag(100, None, None) is None and lag(-1, 5, None) is None


def test_smart_due_time_is_window_after_last_or_max_wait_after_first() -> None:
    ev = ChangeEvent(
        "evt_1", "invoice.updated", "2026-11-27T10:00:00Z", 0.0, "invoice", "1", {"id": "1"}, None
    )
    e = add_event(None, ev, now=100.0, partition=3)
    e = add_event(e, ev, now=101.0, partition=3)
    assert e["count"] == 2 and e["first"] == 100.0 and e["last"] == 101.0 and e["p"] == 3
    assert due_at(e, window=2.0, max_wait=30.0) == 103.0
    assert due_at(e, window=2.0, max_wait=1.5) == 101.5
    assert event_of(e) == ev


def test_retry_after_forms() -> None:
    assert parse_retry_after("2", now=0) == 2.0
    assert parse_retry_after("999999", now=0) == 86400.0
    when = email.utils.formatdate(1_000_060, usegmt=True)
    assert parse_retry_after(when, now=1_000_000) == pytest.approx(60, abs=1)
    assert parse_retry_after("soon", now=0) is None and parse_retry_after(None, now=0) is None


def test_durations_and_config_errors() -> None:
    assert parse_duration("200ms") == 0.2 and parse_duration("1h") == 3600 and parse_duration("3") == 3
    with pytest.raises(ConfigError, match="WEBHOOKS_SMART_WINDOW"):
        Settings.from_env({"WEBHOOKS_SMART_WINDOW": "soon"})
    with pytest.raises(ConfigError, match="1 to 8"):
        Settings.from_env({"WEBHOOKS_RETRY_SCHEDULE": ",".join(["1s"] * 9)})


def test_delivery_body_is_the_documented_shape() -> None:
    d = delivery(0)
    d.previous = {"status": "3"}
    d.collapsed = 3
    assert d.body(1764237600) == (
        b'{"id":"dlv_x","event":"invoice.paid","event_id":"evt_x","timestamp":1764237600,'
        b'"occurred_at":"2026-11-27T10:00:00.000Z","payload":{"id":"1"},"previous":{"status":"3"},"collapsed":3}'
    )
    d.collapsed = 1  # a smart delivery of a single event carries no `collapsed`
    assert b"collapsed" not in d.body(0)
    assert Delivery.decode(d.encode()) == d


@pytest.mark.parametrize(
    "change",
    [
        {"occurred_ts": "1.5"},  # a number written as a string
        {"failures": "0"},
        {"attempts": "[]"},  # a list written as a string
        {"attempts": {"n": 1}},
        {"data": "not an object"},
        {"failures": True},  # a bool is no count
        {"mode": "sometimes"},
        {"id": ""},
        {"endpoint_id": None},
        {"attempts": [1]},
    ],
)
def test_a_mistyped_delivery_is_refused_before_anything_is_attempted(change: dict) -> None:
    import orjson

    rec = {**delivery(0).record(), **change}
    with pytest.raises(InvalidDelivery):
        Delivery.decode(orjson.dumps(rec))


@pytest.mark.parametrize("raw", [b"[]", b"null", b"{}", b'{"id": "dlv_1"}', b"\xff not json", b'"s"', b"1"])
def test_what_is_no_delivery_record_at_all_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidDelivery):
        Delivery.decode(raw)


def test_repeat_filter_lets_one_of_a_kind_through_per_interval() -> None:
    import logging

    from app.logfilter import RepeatFilter

    f = RepeatFilter(interval=60)

    def rec(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", level, __file__, 1, msg, ("x",), None)

    assert f.filter(rec("Unable connect to node with id %s"))
    assert not any(f.filter(rec("Unable connect to node with id %s")) for _ in range(500))
    assert f.filter(rec("Unable to update metadata from %s"))  # another kind still passes
    assert f.filter(rec("Unable connect to node with id %s", logging.INFO))  # below WARNING: untouched
    f._seen[("aiokafka", "Unable connect to node with id %s")] = (-1e9, 500)  # the interval is over
    again = rec("Unable connect to node with id %s")
    assert f.filter(again) and "500 more like this" in again.getMessage()


def test_recent_successes_are_bounded_and_keep_the_newest() -> None:
    from app.successes import RecentSuccesses

    r = RecentSuccesses(Settings(), cap=100)
    for i in range(1000):
        r.add(f"dlv_{i}")
    assert len(r) == 100
    assert "dlv_999" in r and "dlv_900" in r and "dlv_899" not in r


def test_dispatch_skips_a_recorded_success_and_waits_for_a_running_catch_up() -> None:
    """Every path (immediate fan-out, delivery agent, tiers) dispatches through here: a delivery whose
    2xx the attempt log records is never attempted again, and while a catch-up with the log runs (a
    consumer was just assigned partitions) nothing is checked against the half-read index."""
    import asyncio

    from app import metrics
    from app.dispatch import Dispatcher

    class NoSender:
        async def attempt(self, *_: object) -> None:
            raise AssertionError("a recorded success was attempted again")

    d = Delivery.decode(
        Delivery(
            id="dlv_seen", endpoint_id="ep_1", event="lead.created", event_id="evt_1",
            occurred_at="2026-11-27T10:00:00.000Z", occurred_ts=0.0, resource_key="lead:1", data={},
        ).encode()
    )

    async def run() -> None:
        disp = Dispatcher(Settings(), None, NoSender(), None)  # type: ignore[arg-type]
        skipped = metrics.DUPLICATES_SKIPPED._value.get()
        disp.successes._pending = 1  # a catch-up is reading the log: the id is not known yet
        task = asyncio.ensure_future(disp.dispatch(d))
        await asyncio.sleep(0.1)
        assert not task.done()
        disp.successes.add("dlv_seen")  # ... the read finds it
        disp.successes._pending = 0
        await asyncio.wait_for(task, 2)
        assert metrics.DUPLICATES_SKIPPED._value.get() == skipped + 1

    asyncio.run(run())


def test_two_copies_of_one_delivery_at_once_make_one_request() -> None:
    """After a kill the fan-out re-publishes a delivery the agent also re-reads: two copies of one id
    can be dispatched at the same moment. The second waits for the first and is skipped."""
    import asyncio
    import time as _time
    from types import SimpleNamespace

    from app.delivery import Attempt
    from app.dispatch import Dispatcher

    class SlowOk:
        calls = 0

        async def attempt(self, *_: object) -> Attempt:
            SlowOk.calls += 1
            await asyncio.sleep(0.1)
            return Attempt(number=1, at=_time.time(), outcome="success", status=200, latency_ms=100.0)

    from app.endpoints import Endpoint

    ep = Endpoint(id="ep_1", url="http://127.0.0.1:9/x", events=("lead.*",), mode="async", secret="s" * 32)
    registry = SimpleNamespace(get=lambda _id: ep)
    outbox = SimpleNamespace(send_untracked=lambda *_: None)
    fields = dict(
        id="dlv_twice", endpoint_id="ep_1", event="lead.created", event_id="evt_1",
        occurred_at="2026-11-27T10:00:00.000Z", occurred_ts=0.0, resource_key="lead:1", data={},
    )

    async def run() -> None:
        disp = Dispatcher(Settings(), registry, SlowOk(), outbox)  # type: ignore[arg-type]
        await asyncio.gather(disp.dispatch(Delivery(**fields)), disp.dispatch(Delivery(**fields)))  # type: ignore[arg-type]

    asyncio.run(run())
    assert SlowOk.calls == 1


def test_a_batch_whose_queueing_stalls_answers_the_rest_503_and_keeps_their_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /api/events with an array: when the producer's queue stays full (Kafka away) past the
    deadline, what was queued is acknowledged, the rest is answered 503 (send again) and not queued
    behind it, so no later event of a resource overtakes one that was not written; refused items
    keep their own 400 in their place."""
    import asyncio

    from app.admin import ingest

    monkeypatch.setattr(ingest, "KAFKA_TIMEOUT", 0.2)
    queued: list[str] = []

    class StallingOutbox:  # librdkafka's queue takes two records, then stays full
        async def send(self, topic: str, key: str, raw: bytes) -> asyncio.Future[None]:
            if len(queued) == 2:
                await asyncio.sleep(3600)
            queued.append(key)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

    items = [{"event": "invoice.updated", "resource_id": n} for n in range(5)]
    items.insert(1, {"event": "no.such.event", "resource_id": 1})
    doc = asyncio.run(ingest.ingest_batch(StallingOutbox(), items, 1 << 20))
    assert [r["status"] for r in doc["results"]] == [202, 400, 202, 503, 503, 503]
    assert [r["index"] for r in doc["results"]] == list(range(6))
    assert queued == ["invoice:0", "invoice:1"]
    assert (doc["accepted"], doc["refused"], doc["retry"]) == (2, 1, 3)
    assert "send it again" in doc["results"][3]["error"]


def test_event_timestamps_are_rfc3339_utc_milliseconds_as_datetime_writes_them() -> None:
    """`occurred_at` of ingested events: the per-second cache gives what datetime would."""
    import time
    from datetime import UTC, datetime

    from app.events import now_rfc3339, parse_rfc3339

    for ts in (0.0, 1.5, 1764295587.9995, 1764295587.0004999, 1764295588.999999, 3817693174.0289993, 1e9 + 0.123):
        dt = datetime.fromtimestamp(ts, tz=UTC)
        assert now_rfc3339(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z", ts
    assert now_rfc3339(1764295587.25) == "2025-11-28T02:06:27.250Z"
    assert abs(parse_rfc3339(now_rfc3339()) - time.time()) < 5
