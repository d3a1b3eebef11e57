"""Bounded memory (issue 11, item 4): the worker's DLQ view is an index, payloads are read from Kafka
when asked (show, replay), and a deleted endpoint leaves no per-endpoint state behind.
The memory claim itself is measured by `bench.dlq_memory` (docs/performance.md)."""

from __future__ import annotations

import pytest

from app.producer import Producer
from tests.helpers import eventually, register
from tests.receiver import Reply

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FAST = ",".join(["200ms"] * 8)


def test_dlq_payloads_come_from_kafka_and_a_deleted_endpoint_leaves_no_series(settings, receiver, workers) -> None:
    healthy = {"on": False}
    receiver.on("/dead", lambda n: Reply(status=200 if healthy["on"] else 500))
    ep = register(settings, receiver, "/dead", "invoice.paid", "async")
    w = workers(WEBHOOKS_RETRY_SCHEDULE=FAST)
    sent = {}
    with Producer(settings) as p:
        for i in range(3):
            value = p.emit("invoice.paid", str(i), {"id": str(i), "note": "x" * 2000})
            sent[value["id"]] = value["data"]

    def dlq() -> list[dict]:
        r = w.api("GET", "/api/dlq")
        return r.json()["entries"] if r.status_code == 200 else []

    entries = eventually(lambda: len(dlq()) == 3 and dlq(), timeout=90, what="3 DLQ entries")
    assert sorted(e["event_id"] for e in entries) == sorted(sent)  # listed from payloads read back
    assert {e["attempts"] for e in entries} == {9} and all("history" not in e for e in entries)
    one = entries[0]
    shown = w.api("GET", f"/api/dlq/{one['delivery_id']}").json()
    assert shown["data"] == sent[one["event_id"]] and len(shown["history"]) == 9
    assert w.api("GET", "/api/dlq/dlv_nothing").status_code == 404

    healthy["on"] = True
    before = len(receiver.received("/dead"))
    r = w.api("POST", f"/api/dlq/{one['delivery_id']}/replay")
    assert r.status_code == 200 and r.json()["replayed"] == 1
    r = w.api("POST", "/api/dlq/replay", json={})
    assert r.status_code == 200 and r.json()["replayed"] == 2
    got = receiver.wait_for(before + 3, "/dead", timeout=60)[before:]
    assert sorted(g.json["event_id"] for g in got if g.status == 200) == sorted(sent)
    eventually(lambda: dlq() == [], timeout=30, what="an empty DLQ")

    series = f'endpoint="{ep.id}"'
    assert series in w.metrics()
    assert w.api("DELETE", f"/api/endpoints/{ep.id}").status_code in (200, 204)
    eventually(lambda: series not in w.metrics(), timeout=15, what="the endpoint's series gone")
