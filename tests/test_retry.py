"""Retry tiers, dead-letter topic and replay, against the real broker (compressed schedules)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app import route
from app.config import Settings
from app.dlq import read_view
from app.endpoints import read_endpoints
from app.producer import Producer
from tests.helpers import cli, metric, register, register_known, settle, shared_stack
from tests.receiver import Reply

pytestmark = pytest.mark.kafka

# One schedule for the tests on the module's eight-tier worker (`tiers`): 300 ms is long enough
# that "never earlier than the tier's delay" is a real check on the gaps between attempts, short
# enough that nine attempts to an always-failing endpoint take ~3 s, and well under the 2 s
# Retry-After that must win over it.
FAST = ",".join(["300ms"] * 8)
FAST_DELAY = 0.3


@pytest.fixture(scope="module")
def tiers(kafka: Any) -> Iterator[SimpleNamespace]:
    """One worker with eight 300 ms tiers (and one receiver) for the tests that need no restart or
    schedule of their own; each has its own endpoint, path and event family."""
    with shared_stack(kafka.bootstrap, "tiers", WEBHOOKS_RETRY_SCHEDULE=FAST) as stack:
        yield stack


@pytest.fixture(scope="module")
def one_tier(kafka: Any) -> Iterator[SimpleNamespace]:
    """One worker with a single 2 s tier (one retry, then the DLQ): the disabled-endpoint test needs
    a retry to wait long enough for its endpoint to be disabled meanwhile; the replay tests only
    need one retry before the DLQ, so they take this tier too rather than a worker of their own."""
    with shared_stack(kafka.bootstrap, "one-tier", WEBHOOKS_RETRY_SCHEDULE="2s") as stack:
        yield stack


def dlq_of(settings: Settings, endpoint_id: str) -> dict[str, Any]:
    """The DLQ view's entries for one endpoint (tests sharing a worker share its DLQ)."""
    return {k: e for k, e in read_view(settings).items() if e.get("endpoint_id") == endpoint_id}


def wait_dlq(settings: Settings, count: int, endpoint_id: str, timeout: float = 30.0) -> dict:
    """Poll until one endpoint's part of the DLQ has `count` entries; returns what it has."""
    deadline = time.monotonic() + timeout
    while True:
        view = dlq_of(settings, endpoint_id)
        if len(view) >= count or time.monotonic() > deadline:
            return view
        time.sleep(0.2)


def test_records_waiting_in_a_tier_survive_a_worker_restart(settings, receiver, workers) -> None:
    register(settings, receiver, "/w", "contract.*", "async")
    receiver.on("/w", lambda n: Reply(500) if n == 1 else Reply(200))
    env = {"WEBHOOKS_RETRY_SCHEDULE": "4s"}
    w = workers(**env)
    with Producer(settings) as p:
        for i in range(3):
            p.emit("contract.signed", str(i), {"id": str(i)}, flush=False)
    receiver.on("/w", lambda n: Reply(500) if n <= 3 else Reply(200))
    receiver.wait_for(3, "/w")
    w.stop()  # the three retries wait in the 4 s tier
    assert len(receiver.received("/w")) == 3
    w2 = workers(name="worker2", **env)
    receiver.wait_for(6, "/w", timeout=30)
    settle(w2, accounted=lambda: len(receiver.received("/w")) >= 6)
    got = receiver.received("/w")
    assert len(got) == 6
    retried = got[3:]
    assert sorted(r.json["payload"]["id"] for r in retried) == ["0", "1", "2"]
    assert all(r.header("X-PerfexAPI-Attempt") == "2" for r in retried)


def test_fails_three_times_then_succeeds_with_same_id_and_attempt_numbers(tiers: SimpleNamespace) -> None:
    settings, receiver, w = tiers.settings, tiers.receiver, tiers.worker
    ep = register_known(tiers, "/r", "invoice.*", "async")
    receiver.on("/r", lambda n: Reply(500) if n <= 3 else Reply(200))
    with Producer(settings) as p:
        p.emit("invoice.paid", "1", {"id": "1"})
    receiver.wait_for(4, "/r", timeout=30)
    settle(w, accounted=lambda: len(receiver.received("/r")) >= 4)  # no fifth attempt follows
    got = receiver.received("/r")
    assert [r.header("X-PerfexAPI-Attempt") for r in got] == ["1", "2", "3", "4"]
    assert len({r.header("X-PerfexAPI-Delivery") for r in got}) == 1
    for before, after in itertools.pairwise(got):
        # never earlier than the tier's delay less its jitter (route.retry_due: ±10 %)
        assert after.at - before.at >= FAST_DELAY * (1 - route.JITTER) - 0.02
    assert dlq_of(settings, ep.id) == {}


def test_always_failing_endpoint_gets_nine_attempts_then_dlq(tiers: SimpleNamespace) -> None:
    settings, receiver, w = tiers.settings, tiers.receiver, tiers.worker
    ep = register_known(tiers, "/f", "lead.*", "immediate")
    receiver.on("/f", lambda n: Reply(503, body=b"down"))
    with Producer(settings) as p:
        p.emit("lead.created", "9", {"id": "9", "name": "Ada"})
    wait_dlq(settings, 1, ep.id)
    settle(w, accounted=lambda: dlq_of(settings, ep.id))  # parked, and no tenth attempt follows
    view = dlq_of(settings, ep.id)
    assert len(view) == 1
    entry = next(iter(view.values()))
    assert len(receiver.received("/f")) == 9
    assert [r.header("X-PerfexAPI-Attempt") for r in receiver.received("/f")] == [
        str(i) for i in range(1, 10)
    ]
    assert entry["dlq_reason"] == "retries_exhausted"
    assert entry["endpoint_id"] == ep.id and entry["event"] == "lead.created"
    assert entry["id"] == receiver.received("/f")[0].header("X-PerfexAPI-Delivery")
    assert len(entry["attempts"]) == 9
    assert all(a["status"] == 503 and a["outcome"] == "http_error" for a in entry["attempts"])
    assert all(a["at"] > 0 and a["latency_ms"] >= 0 for a in entry["attempts"])
    assert ep.secret not in orjson.dumps(entry).decode()


def test_retry_after_is_honoured(tiers: SimpleNamespace) -> None:
    settings, receiver = tiers.settings, tiers.receiver
    register_known(tiers, "/t", "task.*", "async")
    receiver.on("/t", lambda n: Reply(429, headers={"Retry-After": "2"}) if n == 1 else Reply(200))
    with Producer(settings) as p:
        p.emit("task.created", "3", {"id": "3"})
    got = receiver.wait_for(2, "/t", timeout=30)
    assert got[1].at - got[0].at >= 2.0 - 0.05
    assert got[1].header("X-PerfexAPI-Attempt") == "2"


def test_410_disables_endpoint_and_parks_at_once(tiers: SimpleNamespace) -> None:
    settings, receiver, w = tiers.settings, tiers.receiver, tiers.worker
    ep = register_known(tiers, "/gone", "ticket.*", "immediate")
    receiver.on("/gone", lambda n: Reply(410))
    with Producer(settings) as p:
        p.emit("ticket.created", "1", {"id": "1"})
    view = wait_dlq(settings, 1, ep.id)
    assert [e["dlq_reason"] for e in view.values()] == ["gone"]
    assert len(receiver.received("/gone")) == 1
    deadline = time.monotonic() + 10
    while read_endpoints(settings)[ep.id].enabled:
        assert time.monotonic() < deadline, "endpoint still enabled after a 410"
        time.sleep(0.2)
    assert "410" in (read_endpoints(settings)[ep.id].disabled_reason or "")
    # Later events for the disabled endpoint are not sent to it, nor dropped: parked for a replay.
    with Producer(settings) as p:
        p.emit("ticket.updated", "1", {"id": "1"})
    settle(w, accounted=lambda: len(dlq_of(settings, ep.id)) == 2)
    assert len(receiver.received("/gone")) == 1
    assert sorted(e["dlq_reason"] for e in dlq_of(settings, ep.id).values()) == ["endpoint_disabled", "gone"]


def test_disabled_endpoint_deliveries_go_to_dlq_not_nowhere(one_tier: SimpleNamespace) -> None:
    settings, receiver, w = one_tier.settings, one_tier.receiver, one_tier.worker
    ep = register_known(one_tier, "/d", "invoice.*", "async")
    receiver.on("/d", lambda n: Reply(500))
    # The worker's counter before this test (the module's other tests run on the same worker).
    parked_before = metric(w.metrics(), "webhooks_dlq_entries_total", reason="endpoint_disabled")
    with Producer(settings) as p:
        sent = p.emit("invoice.sent", "4", {"id": "4"})
    (first,) = receiver.wait_for(1, "/d")
    assert cli(settings, "endpoints", "disable", ep.id).exit_code == 0  # while the retry waits 2 s
    wait_dlq(settings, 1, ep.id)
    settle(w, accounted=lambda: dlq_of(settings, ep.id))
    view = dlq_of(settings, ep.id)
    # Parked from the tier with what happened so far: the one failed attempt, same delivery id.
    (entry,) = view.values()
    assert entry["dlq_reason"] == "endpoint_disabled" and entry["id"] == first.header("X-PerfexAPI-Delivery")
    assert entry["endpoint_id"] == ep.id and entry["event_id"] == sent["id"]
    assert [(a["outcome"], a["status"]) for a in entry["attempts"]] == [("http_error", 500)]
    assert len(receiver.received("/d")) == 1
    text = w.metrics()
    assert metric(text, "webhooks_dlq_entries_total", reason="endpoint_disabled") == parked_before + 1
    assert metric(text, "webhooks_dlq_size") == len(read_view(settings))  # this entry among them


def test_replay_after_recovery_delivers_each_once_and_empties_dlq(one_tier: SimpleNamespace) -> None:
    settings, receiver, w = one_tier.settings, one_tier.receiver, one_tier.worker
    healthy = {"on": False}
    ep = register_known(one_tier, "/p", "payment.*", "async")
    receiver.on("/p", lambda n: Reply(200) if healthy["on"] else Reply(500))
    with Producer(settings) as p:  # one retry (the worker's single tier), then the DLQ
        for i in range(5):
            p.emit("payment.received", str(i), {"id": str(i)}, flush=False)
    wait_dlq(settings, 5, ep.id)
    settle(w, accounted=lambda: len(dlq_of(settings, ep.id)) >= 5)
    view = dlq_of(settings, ep.id)
    assert len(view) == 5
    failed = len(receiver.received("/p"))
    assert failed == 10

    # --all with --endpoint: every entry of this endpoint (the module's worker has others' too).
    res = cli(settings, "dlq", "list", "--endpoint", ep.id, "--json")
    assert res.exit_code == 0 and len(orjson.loads(res.output)) == 5

    res = cli(settings, "dlq", "replay", "--all", "--endpoint", ep.id, "--dry-run")
    assert res.exit_code == 0 and "5 would be replayed" in res.output
    settle(w)
    assert len(dlq_of(settings, ep.id)) == 5 and len(receiver.received("/p")) == failed

    healthy["on"] = True
    res = cli(settings, "dlq", "replay", "--all", "--endpoint", ep.id)
    assert res.exit_code == 0, res.output
    assert "replayed 5" in res.output
    receiver.wait_for(failed + 5, "/p", timeout=30)
    res = cli(settings, "dlq", "replay", "--all", "--endpoint", ep.id)  # a second replay finds nothing
    assert "replayed 0" in res.output
    settle(w, accounted=lambda: not dlq_of(settings, ep.id))
    replayed = receiver.received("/p")[failed:]
    assert len(replayed) == 5
    assert {r.header("X-PerfexAPI-Delivery") for r in replayed} == set(view)
    assert all(r.header("X-PerfexAPI-Attempt") == "3" for r in replayed)
    assert dlq_of(settings, ep.id) == {}
    assert "DLQ is empty" in cli(settings, "dlq", "list", "--endpoint", ep.id).output


def test_replay_one_and_bad_arguments(one_tier: SimpleNamespace) -> None:
    settings, receiver, w = one_tier.settings, one_tier.receiver, one_tier.worker
    ep = register_known(one_tier, "/o", "expense.*", "async")
    receiver.on("/o", lambda n: Reply(500) if n <= 2 else Reply(200))
    with Producer(settings) as p:
        p.emit("expense.created", "1", {"id": "1"})
    view = wait_dlq(settings, 1, ep.id)
    (dlv,) = view
    assert cli(settings, "dlq", "replay").exit_code != 0  # neither --delivery-id nor --all
    assert cli(settings, "dlq", "replay", "--delivery-id", "dlv_nope").exit_code != 0
    res = cli(settings, "dlq", "replay", "--delivery-id", dlv)
    assert res.exit_code == 0 and "replayed 1" in res.output
    receiver.wait_for(3, "/o")
    settle(w, accounted=lambda: not dlq_of(settings, ep.id))
    got = receiver.received("/o")
    assert len(got) == 3 and got[-1].header("X-PerfexAPI-Delivery") == dlv
    assert dlq_of(settings, ep.id) == {}
