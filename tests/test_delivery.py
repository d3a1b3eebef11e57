"""Delivery core against the real broker and a real HTTP receiver: immediate, smart, async, bad input."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app.producer import Producer
from app.signing import verify, verify_hex, verify_standard
from tests.helpers import read_all, register, register_known, settle, shared_stack

pytestmark = pytest.mark.kafka

SMART_WINDOW = 0.5


@pytest.fixture(scope="module")
def stack(kafka: Any) -> Iterator[SimpleNamespace]:
    """One worker (and receiver) for the tests that need no restart or smart timing of their own:
    a 500 ms smart window with a 30 s max wait (the burst test's; the others send no smart
    endpoint anything). Each test has its own endpoints, paths and event families."""
    env = {"WEBHOOKS_SMART_WINDOW": f"{int(SMART_WINDOW * 1000)}ms", "WEBHOOKS_SMART_MAX_WAIT": "30s"}
    with shared_stack(kafka.bootstrap, "delivery", **env) as shared:
        yield shared


def test_smart_max_wait_delivers_a_resource_that_keeps_changing(settings, receiver, workers) -> None:
    register(settings, receiver, "/s", "lead.*", "smart")
    w = workers(WEBHOOKS_SMART_WINDOW="400ms", WEBHOOKS_SMART_MAX_WAIT="1s")
    started = time.time()
    n = 0
    with Producer(settings) as p:
        while time.time() - started < 5.0:  # saves every 100 ms for 5 s: never quiet for a window
            p.emit("lead.updated", "7", {"id": "7", "n": str(n)})
            n += 1
            time.sleep(0.1)
    # Deliveries arrived while the burst went on, and together they carry every event, once.
    settle(w, accounted=lambda: sum(r.json.get("collapsed", 1) for r in receiver.received("/s")) >= n)
    got = receiver.received("/s")
    during = [r for r in got if r.at < started + 5.0]
    assert len(during) >= 2, [r.at - started for r in got]
    assert sum(r.json.get("collapsed", 1) for r in got) == n
    assert got[-1].json["payload"]["n"] == str(n - 1)


def test_smart_pending_item_survives_a_worker_restart(settings, receiver, workers) -> None:
    register(settings, receiver, "/s", "ticket.*", "smart")
    env = {"WEBHOOKS_SMART_WINDOW": "3s"}
    w = workers(**env)
    with Producer(settings) as p:
        for i in range(3):
            p.emit("ticket.updated", "5", {"id": "5", "n": str(i)})
    # Wait until the worker consumed the three events (the metric counts them), then stop it
    # well inside the window.
    deadline = time.monotonic() + 15
    while 'webhooks_events_consumed_total{event="ticket.updated"} 3.0' not in w.metrics():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    w.stop()
    assert receiver.received("/s") == []
    w2 = workers(name="worker2", **env)
    receiver.wait_for(1, "/s", timeout=30)
    settle(w2, accounted=lambda: receiver.received("/s"))
    got = receiver.received("/s")
    assert len(got) == 1
    assert got[0].json["collapsed"] == 3 and got[0].json["payload"]["n"] == "2"


def test_immediate_signed_delivery_to_matching_endpoints_only(stack: SimpleNamespace) -> None:
    settings, receiver, w = stack.settings, stack.receiver, stack.worker
    a = register_known(stack, "/a", "invoice.*", "immediate")
    b = register_known(stack, "/b", "invoice.paid,lead.created", "immediate")
    c = register_known(stack, "/c", "lead.*", "immediate")
    mine = ("/a", "/b", "/c")
    with Producer(settings) as p:
        sent = p.emit(
            "invoice.paid",
            "19",
            {"id": "19", "status": "2", "total": "21.80", "note": "Zürich/€"},
            {"status": "3"},
        )

    def got_mine() -> list:
        return [r for r in receiver.received() if r.path in mine]

    settle(w, accounted=lambda: len(got_mine()) >= 2)  # a third (wrong) one had its chance
    got = got_mine()
    assert sorted(r.path for r in got) == ["/a", "/b"]
    ids = set()
    for r in got:
        ep = a if r.path == "/a" else b
        body = r.body
        verify(body, r.headers, [ep.secret])  # Standard Webhooks path
        assert verify_hex(body, r.header("X-PerfexAPI-Signature") or "", [ep.secret])
        assert r.header("X-Webhook-Signature") == r.header("X-PerfexAPI-Signature")
        assert verify_standard(
            body,
            r.header("webhook-id") or "",
            r.header("webhook-timestamp") or "",
            r.header("webhook-signature") or "",
            [ep.secret],
        )
        assert not verify_hex(body, r.header("X-PerfexAPI-Signature") or "", [c.secret])
        doc = orjson.loads(body)
        assert doc["event"] == "invoice.paid" and doc["event_id"] == sent["id"]
        assert doc["payload"]["note"] == "Zürich/€" and doc["previous"] == {"status": "3"}
        assert "collapsed" not in doc
        assert r.header("X-PerfexAPI-Delivery") == doc["id"] == r.header("webhook-id")
        assert r.header("X-PerfexAPI-Event") == "invoice.paid"
        assert r.header("X-PerfexAPI-Attempt") == "1"
        assert r.header("X-PerfexAPI-Timestamp") == str(doc["timestamp"])
        assert r.header("Content-Type") == "application/json"
        assert (r.header("User-Agent") or "").startswith("perfex-webhooks/")
        ids.add(doc["id"])
    assert len(ids) == 2  # one delivery id per (event, endpoint)


def test_smart_collapses_a_burst_per_resource(stack: SimpleNamespace) -> None:
    settings, receiver, w = stack.settings, stack.receiver, stack.worker
    window = SMART_WINDOW
    register_known(stack, "/s", "invoice.*", "smart")
    with Producer(settings) as p:
        # Ten saves of invoice 1, 100 ms apart, interleaved with five of invoice 2.
        for i in range(10):
            p.emit("invoice.updated", "1", {"id": "1", "n": str(i)})
            if i % 2 == 0:
                p.emit("invoice.updated", "2", {"id": "2", "n": str(i)})
            last_sent = time.time()
            time.sleep(0.1)
    receiver.wait_for(2, "/s", timeout=30)
    settle(w, accounted=lambda: len(receiver.received("/s")) >= 2)  # nothing more may follow
    got = receiver.received("/s")
    assert len(got) == 2
    by_resource = {r.json["payload"]["id"]: r for r in got}
    one, two = by_resource["1"].json, by_resource["2"].json
    assert one["collapsed"] == 10 and one["payload"]["n"] == "9"
    assert two["collapsed"] == 5 and two["payload"]["n"] == "8"
    # Delivered one window after the last event of the burst, not before.
    assert by_resource["1"].at >= last_sent - 0.1 + window - 0.05


def test_async_thousand_events_all_delivered_once_signed(stack: SimpleNamespace) -> None:
    settings, receiver, w = stack.settings, stack.receiver, stack.worker
    ep = register_known(stack, "/q", "customer.*", "async")
    n = 1000
    with Producer(settings) as p:
        expected = {p.emit("customer.updated", str(i), {"id": str(i)}, flush=False)["id"] for i in range(n)}
    receiver.wait_for(n, "/q", timeout=120)
    settle(w, accounted=lambda: len(receiver.received("/q")) >= n)
    got = receiver.received("/q")
    assert len(got) == n  # no redelivery without a crash
    delivery_ids = {r.header("X-PerfexAPI-Delivery") for r in got}
    event_ids = {r.json["event_id"] for r in got}
    assert event_ids == expected
    assert len(delivery_ids) == n
    for r in got:
        assert verify_hex(r.body, r.header("X-PerfexAPI-Signature") or "", [ep.secret])


def test_bad_input_is_parked_and_good_events_around_it_delivered(stack: SimpleNamespace) -> None:
    settings, receiver, w = stack.settings, stack.receiver, stack.worker
    register_known(stack, "/g", "expense.*", "immediate")
    # Resource ids of this test only: its bad records are told apart by key in the shared topic.
    ids = [f"bad{uuid.uuid4().hex[:8]}{i}" for i in range(6)]
    with Producer(settings) as p:
        p.emit("expense.created", ids[1], {"id": ids[1]}, flush=False)
        p.send("crm.events", f"expense:{ids[2]}", b"{not json")
        p.send(
            "crm.events",
            f"expense:{ids[3]}",
            {
                "id": "e3",
                "event": "expense.nosuch",
                "occurred_at": "2026-11-27T10:00:00Z",
                "resource_id": ids[3],
                "data": {},
            },
        )
        p.send("crm.events", f"expense:{ids[4]}", {"event": "expense.updated", "resource_id": ids[4], "data": {}})
        p.emit("expense.updated", ids[5], {"id": ids[5]})
    receiver.wait_for(2, "/g", timeout=30)
    settle(w, accounted=lambda: len(receiver.received("/g")) >= 2)
    got = receiver.received("/g")
    assert sorted(r.json["payload"]["id"] for r in got) == sorted([ids[1], ids[5]])
    keys = {f"expense:{rid}".encode() for rid in ids}
    # To the end (the worker has consumed everything: settle), then exactly these three of ours.
    invalid = [m for m in read_all(settings, "crm.events.invalid", 3) if m.key() in keys]
    reasons = sorted(orjson.loads(m.value())["reason"] for m in invalid)
    assert reasons == ["missing_field", "not_json", "unknown_event"]
