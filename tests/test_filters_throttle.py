"""Issue 18: content filters, per-endpoint throttling and retry jitter.

Units first (the filter language, the throttle's schedule, the jitter's bounds and Retry-After's
exactness), then one worker per module against the real broker and receivers: filters through the
API and the CLI (an erroring filter affects its endpoint only), and a throttled endpoint beside an
unthrottled one on the same events. Last, a second worker joins the module's worker: together they
keep a throttled endpoint to its max_rate (each by its share of the partitions).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app import filters, route
from app.config import Settings
from app.producer import Producer
from app.throttle import Throttle, parse_rate
from tests.helpers import cli, cli_json, delete_topics, eventually, metric, settle
from tests.receiver import Receiver
from tests.workers import WorkerProcess


# ---- filters: the language -------------------------------------------------------------------------
def body(status: Any = "2", total: Any = "10.50", **extra: Any) -> dict[str, Any]:
    return {"event": "invoice.paid", "payload": {"id": "7", "status": status, "total": total, **extra}}


def test_filter_operators_compare_perfex_numeric_strings_as_numbers() -> None:
    def m(spec: Any, doc: dict[str, Any]) -> bool:
        return filters.compile_filter(spec).matches(doc)

    assert m({"payload.status": "2"}, body()) and m({"payload.status": 2}, body())
    assert not m({"payload.status": "3"}, body())
    assert m({"payload.total": {"$gt": 9, "$lte": "10.5"}}, body())  # "10.50" as a number
    assert not m({"payload.total": {"$gt": 10.5}}, body())
    assert m({"payload.total": {"$lt": 100}}, body(total="99.99")) and not m(
        {"payload.total": {"$lt": 100}}, body(total="100")
    )
    assert m({"payload.status": {"$in": ["1", "2"]}}, body()) and not m(
        {"payload.status": {"$in": [3, 4]}}, body()
    )
    assert m({"payload.status": {"$nin": [3]}}, body())
    assert m({"payload.status": {"$ne": "5"}}, body()) and not m({"payload.status": {"$ne": 2}}, body())
    assert m({"payload.note": {"$exists": False}}, body()) and m({"payload.id": {"$exists": True}}, body())
    assert m({"payload.note": {"$ne": "x"}}, body())  # a missing field is "not equal"
    assert not m({"payload.note": {"$gt": 1}}, body())  # ... and never compares
    assert not m({"payload.total": {"$gt": 5}}, body(total="n/a"))  # text against a number: no match
    assert m({"payload.name": {"$gte": "b"}}, body(name="bob"))  # two texts compare as text
    assert m({"event": "invoice.paid", "payload.status": "2"}, body())  # implicit AND
    assert not m({"event": "invoice.paid", "payload.status": "3"}, body())
    assert m({"$or": [{"payload.status": "3"}, {"payload.total": {"$gte": 10}}]}, body())
    assert not m({"$and": [{"payload.status": "2"}, {"payload.total": {"$gte": 11}}]}, body())
    assert m({"payload.items.0.qty": {"$gte": 2}}, body(items=[{"qty": "2"}]))


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"payload.status": {"$regex": "x"}}, "$regex"),
        ({"$where": "1"}, "$where"),
        ({"payload..status": 1}, "payload..status"),
        ({"payload.status": {"$in": "2"}}, "payload.status.$in"),
        ({"payload.total": {"$gt": [1]}}, "payload.total.$gt"),
        ({"payload.status": {"$exists": 1}}, "payload.status.$exists"),
        ({"payload.status": {"$eq": 1, "x": 2}}, "payload.status"),
        ({"$or": []}, "$or"),
        ([1], "expected an object"),
    ],
)
def test_a_bad_filter_is_refused_naming_the_operator_or_path(spec: Any, named: str) -> None:
    with pytest.raises(ValueError, match="filter") as exc:
        filters.validate(spec)
    assert named in str(exc.value)


def test_a_filter_that_cannot_compare_raises_filter_error() -> None:
    flt = filters.compile_filter({"payload.total": {"$gt": 5}})
    with pytest.raises(filters.FilterError):
        flt.matches(body(total={"amount": "6"}))


# ---- throttle: the schedule --------------------------------------------------------------------------
def test_rates_parse_and_bad_ones_are_refused() -> None:
    assert parse_rate("5/s") == 5 and parse_rate(" 120/m ") == 2 and parse_rate(7.5) == 7.5
    assert parse_rate(None) is None and parse_rate(0) is None and parse_rate("0/s") is None
    for bad in ("fast", "-1/s", "5/week", True, 1e9):
        with pytest.raises(ValueError, match="max_rate"):
            parse_rate(bad)


def test_throttle_spaces_deliveries_and_reserved_slots_come_back_on_time() -> None:
    t = Throttle()
    now = 1000.0
    results = [t.admit("ep", 5, f"d{i}", now) for i in range(4)]
    assert results[0] == (None, False)  # the first goes at once
    slots = [r[0] for r in results[1:]]
    assert slots == pytest.approx([1000.2, 1000.4, 1000.6]) and all(new for _, new in results[1:])
    assert t.admit("ep", 5, "d2", 1000.3) == (pytest.approx(1000.4), False)  # early: waits on, no new slot
    assert t.admit("ep", 5, "d1", 1000.2) == (None, False)  # on time: goes, without taking a slot
    assert t.admit("other", 5, "x", now) == (None, False)  # another endpoint has its own schedule
    assert t.reserved == 2
    t.forget("ep")
    assert t.reserved == 0


def test_each_worker_takes_its_share_of_the_rate() -> None:
    t = Throttle()
    t.set_share(4, 12)  # one worker of three
    assert t.interval(6) == pytest.approx(0.5)  # 2/s here, 6/s together
    t.set_share(0, 12)  # owns nothing (yet): counts as one partition
    assert t.interval(12) == pytest.approx(1.0)


# ---- jitter ---------------------------------------------------------------------------------------------
def test_retry_delays_are_jittered_within_ten_percent_and_spread() -> None:
    rng = random.Random(18)
    dues = [route.retry_due(30.0, 1000.0, None, rng.random) for _ in range(5000)]
    assert min(dues) >= 1000.0 + 27.0 and max(dues) <= 1000.0 + 33.0
    # Spread over the whole window, not bunched: every tenth of it is hit.
    deciles = {int((d - 1027.0) / 0.6) for d in dues}
    assert deciles == set(range(10))
    assert route.retry_due(30.0, 1000.0, None, lambda: 0.0) == pytest.approx(1027.0)
    assert route.retry_due(30.0, 1000.0, None, lambda: 1.0) == pytest.approx(1033.0)


def test_retry_after_is_honoured_exactly_without_jitter() -> None:
    # A Retry-After within the tier's delay: the tier's delay, not jittered (never earlier than asked).
    assert route.retry_due(30.0, 1000.0, 1010.0, lambda: 0.0) == 1030.0
    # A longer one is waited out in rounds of the tier's delay, the last ending exactly at it.
    assert route.retry_due(30.0, 1000.0, 1075.0, lambda: 0.0) == 1030.0
    assert route.defer_due(30.0, 1030.0, 1075.0, lambda: 0.0) == 1060.0
    assert route.defer_due(30.0, 1060.0, 1075.0, lambda: 0.0) == 1075.0
    # A tier record is due at its header's time, never later than the latest jittered retry.
    hdr = route.due_header(1075.0)
    assert route.due_of(hdr, 1060.0, 30.0) == 1075.0
    assert route.due_of(route.due_header(9e12), 1060.0, 30.0) == pytest.approx(1093.0)
    assert (
        route.due_of(None, 1060.0, 30.0) == 1090.0
        and route.due_of([(route.DUE_HEADER, b"x")], 1060.0, 30.0) == 1090.0
    )


# ---- against a worker ------------------------------------------------------------------------------
WORKER_ENV = {"WEBHOOKS_RETRY_SCHEDULE": "300ms,300ms"}


@pytest.fixture(scope="module")
def env(kafka: Any) -> Iterator[SimpleNamespace]:
    """One worker (short 300 ms tiers: throttled deliveries wait out their slot in rounds of it) and
    one receiver for the module."""
    from app.topics import apply

    settings = Settings.from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}."}
    )
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(settings, name="controls", **WORKER_ENV)
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop(timeout=5)
        receiver.stop()
        delete_topics(settings.bootstrap_servers, settings.topic_prefix)


def create(env: SimpleNamespace, path: str, events: str, **kw: Any) -> dict[str, Any]:
    r = env.worker.api("POST", "/api/endpoints", json={"url": env.receiver.url(path), "events": events, **kw})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.kafka
def test_filters_through_the_api_and_an_erroring_filter_affects_its_endpoint_only(
    env: SimpleNamespace,
) -> None:
    w, rcv = env.worker, env.receiver
    r = w.api(
        "POST",
        "/api/endpoints",
        json={"url": rcv.url("/x"), "events": "invoice.*", "filter": {"payload.status": {"$like": "2"}}},
    )
    assert r.status_code == 400 and "$like" in r.json()["error"]
    paid = create(env, "/paid", "invoice.*", filter={"payload.status": "2", "payload.total": {"$gte": 100}})
    assert paid["filter"] == {"payload.status": "2", "payload.total": {"$gte": 100}}
    numeric = create(
        env, "/numeric", "invoice.*", filter={"payload.total": {"$gt": 0}}
    )  # errors on an object total
    everything = create(env, "/all", "invoice.*", mode="immediate")
    events = [
        ("1", "2", "150.00"),
        ("2", "2", "99.99"),
        ("3", "1", "500"),
        ("4", "1", {"amount": "300"}),
        ("5", "2", "100"),
    ]
    with Producer(env.settings) as p:
        for rid, status, total in events:
            p.emit("invoice.updated", rid, {"id": rid, "status": status, "total": total}, flush=False)
    rcv.wait_for(5, "/all")
    settle(w, accounted=lambda: len(rcv.received("/paid")) >= 2 and len(rcv.received("/numeric")) >= 4)
    # The erroring filter: no delivery to its endpoint for that event, counted; the others still got it.
    assert sorted(x.json["payload"]["id"] for x in rcv.received("/numeric")) == ["1", "2", "3", "5"]
    assert sorted(x.json["payload"]["id"] for x in rcv.received("/all")) == ["1", "2", "3", "4", "5"]
    assert sorted(x.json["payload"]["id"] for x in rcv.received("/paid")) == ["1", "5"]
    text = w.metrics()
    assert metric(text, "webhooks_filter_errors_total", endpoint=numeric["id"]) == 1
    assert metric(text, "webhooks_filter_errors_total", endpoint=paid["id"]) == 0
    assert metric(text, "webhooks_deliveries_filtered_out_total", endpoint=paid["id"]) == 3
    assert metric(text, "webhooks_deliveries_filtered_out_total", endpoint=everything["id"]) == 0
    # PATCH null removes the filter; the n8n API shows and takes it too.
    r = w.api("PATCH", f"/api/endpoints/{paid['id']}", json={"filter": None})
    assert r.status_code == 200 and r.json()["filter"] is None
    r = w.api(
        "PUT",
        f"/api/v1/webhooks/{paid['id']}",
        json={"filter": {"payload.status": {"$in": ["2"]}}, "max_rate": "10/s"},
    )
    assert r.status_code == 200 and r.json()["data"]["filter"] == {"payload.status": {"$in": ["2"]}}
    assert r.json()["data"]["max_rate"] == 10
    r = w.api("PUT", f"/api/v1/webhooks/{paid['id']}", json={"filter": {"payload.status": {"$in": 2}}})
    assert r.status_code == 400 and "$in" in r.json()["error"]


@pytest.mark.kafka
def test_cli_add_and_update_set_filter_and_rate_with_clear_errors(env: SimpleNamespace) -> None:
    s = env.settings
    url = env.receiver.url("/cli")
    bad = cli(
        s, "endpoints", "add", "--url", url, "--events", "lead.*", "--filter", '{"payload.x": {"$gtx": 1}}'
    )
    assert bad.exit_code == 1 and "$gtx" in bad.output and "Traceback" not in bad.output
    bad = cli(s, "endpoints", "add", "--url", url, "--events", "lead.*", "--filter", "{nope")
    assert bad.exit_code == 1 and "--filter: not JSON" in bad.output
    bad = cli(s, "endpoints", "add", "--url", url, "--events", "lead.*", "--max-rate", "fast")
    assert bad.exit_code == 1 and "--max-rate" in bad.output
    made = cli_json(
        s,
        "endpoints",
        "add",
        "--url",
        url,
        "--events",
        "lead.*",
        "--filter",
        '{"payload.status": "1"}',
        "--max-rate",
        "5/s",
    )
    assert made["filter"] == {"payload.status": "1"} and made["max_rate"] == 5
    changed = cli_json(s, "endpoints", "update", made["id"], "--filter", "{}", "--max-rate", "120/m")
    assert changed["filter"] is None and changed["max_rate"] == 2
    assert cli(s, "endpoints", "update", made["id"]).exit_code == 1  # nothing to change
    shown = cli(s, "endpoints", "show", made["id"])
    assert "at most 2 deliveries/s" in shown.output
    # The worker's API sees what the CLI wrote.
    eventually(lambda: env.worker.api("GET", f"/api/endpoints/{made['id']}").json().get("max_rate") == 2)


@pytest.mark.kafka
def test_a_throttled_endpoint_gets_every_delivery_at_its_rate_and_does_not_slow_another(
    env: SimpleNamespace,
) -> None:
    w, rcv = env.worker, env.receiver
    slow = create(env, "/slow", "proposal.*", max_rate="5/s")
    create(env, "/fast", "proposal.*")
    n, rate = 30, 5.0
    with Producer(env.settings) as p:
        for i in range(n):
            p.emit("proposal.updated", str(i), {"id": str(i)}, flush=False)
    fast = rcv.wait_for(n, "/fast", timeout=60)
    got = rcv.wait_for(n, "/slow", timeout=90)
    settle(w, accounted=lambda: len(rcv.received("/slow")) >= n)
    got = rcv.received("/slow")
    ids = [x.header("X-PerfexAPI-Delivery") for x in got]
    assert len(got) == n and len(set(ids)) == n  # none lost, none twice
    assert sorted(int(x.json["payload"]["id"]) for x in got) == list(range(n))
    observed = (n - 1) / (got[-1].at - got[0].at)
    assert observed <= rate * 1.1, f"{observed:.2f} deliveries/s to a 5/s endpoint"
    # The unthrottled endpoint on the same events and partitions was not held up behind it: all of
    # its deliveries were in before the throttled one had had half of its own.
    assert fast[-1].at < got[n // 2].at
    assert all(x.header("X-PerfexAPI-Attempt") == "1" for x in got)  # waited without an attempt
    assert metric(w.metrics(), "webhooks_deliveries_throttled_total", endpoint=slow["id"]) >= n // 2
    assert "webhooks_deliveries_throttled_total" in w.metrics()
    assert orjson.loads(w.api("GET", f"/api/endpoints/{slow['id']}").content)["max_rate"] == 5


@pytest.fixture(scope="module")
def second(env: SimpleNamespace) -> Iterator[WorkerProcess]:
    """A second worker in the module worker's groups, for the last test only (it rebalances the
    partitions, which the single-worker tests above must not see)."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    w2 = WorkerProcess(env.settings, name="controls-2", **WORKER_ENV)
    try:
        w2.start()
        # Both own partitions of webhooks.deliveries (so each takes its share of a max_rate).
        admin = AdminClient({"bootstrap.servers": env.settings.bootstrap_servers})
        group = f"{env.settings.group_id}.deliveries"

        def split() -> bool:
            desc = admin.describe_consumer_groups([group])[group].result(10)
            owned = [len(m.assignment.topic_partitions) for m in desc.members]
            return desc.state == ConsumerGroupState.STABLE and len(owned) == 2 and min(owned) > 0

        eventually(split, 90, "the deliveries' partitions split over two workers")
        yield w2
    finally:
        w2.stop(timeout=5)


@pytest.mark.kafka
def test_two_workers_together_keep_a_throttled_endpoint_to_its_max_rate(
    env: SimpleNamespace, second: WorkerProcess
) -> None:
    """The documented approximation (app/throttle.py): each worker spaces the endpoint's deliveries
    by 1 / (max_rate x its share of the partitions), and the first of each goes at once. So N
    deliveries at max_rate r take at least (N - workers) / r overall, whatever the split of the
    resources; were each worker to take the whole rate, they would take half that."""
    workers, rcv = (env.worker, second), env.receiver
    n, rate = 16, 8.0
    ep = create(env, "/pair", "estimate.*", max_rate=f"{rate:g}/s")
    eventually(lambda: all(w.api("GET", f"/api/endpoints/{ep['id']}").json().get("max_rate") == rate for w in workers))
    with Producer(env.settings) as p:
        for i in range(n):
            p.emit("estimate.updated", f"pair{i}", {"id": str(i)}, flush=False)
    got = rcv.wait_for(n, "/pair", timeout=90)
    settle(env.worker, accounted=lambda: len(rcv.received("/pair")) >= n)
    got = rcv.received("/pair")
    ids = [x.header("X-PerfexAPI-Delivery") for x in got]
    assert len(got) == n and len(set(ids)) == n  # none lost, none twice
    assert sorted(int(x.json["payload"]["id"]) for x in got) == list(range(n))
    span = got[-1].at - got[0].at
    floor = (n - len(workers)) / rate
    assert span >= floor * 0.9, f"{n} deliveries in {span:.2f}s: faster than {rate:g}/s over two workers"
    # Both workers delivered to it and both held some back: the shares, not one worker, did this.
    for w in workers:
        text = w.metrics()
        assert metric(text, "webhooks_deliveries_total", endpoint=ep["id"], outcome="success") > 0
        assert metric(text, "webhooks_deliveries_throttled_total", endpoint=ep["id"]) > 0
