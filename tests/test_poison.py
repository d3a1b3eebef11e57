"""Poison records (issue 11 item 1), with real worker processes and the real broker.

Records the pipeline did not write, of every kind, on every partition of webhooks.deliveries, a
retry tier and crm.events, with good records behind them: no poison is ever POSTed, each is parked
exactly once (DLQ, or crm.events.invalid for input), every good record is delivered exactly once,
every consumer commits to the end, and a graceful restart delivers nothing again.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections import Counter
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from app import route
from app.config import Settings
from app.delivery import Delivery
from app.events import build_event
from tests.helpers import committed_offsets, end_offsets, eventually, metric, read_to_end, register

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _good(ep_id: str, tag: str, failures: int = 0) -> Delivery:
    return Delivery(
        id=f"dlv_{tag}",
        endpoint_id=ep_id,
        event="invoice.updated",
        event_id=f"evt_{tag}",
        occurred_at="2026-11-27T10:00:00.000Z",
        occurred_ts=time.time(),
        resource_key=f"invoice:{tag}",
        data={"id": tag},
        failures=failures,
    )


def poison_kinds(ep_id: str) -> list[bytes]:
    """Every kind of the issue: each would reach the endpoint if it were taken for a delivery."""
    real = _good(ep_id, "p" + uuid.uuid4().hex[:8]).record()
    stringly: dict[str, Any] = {
        k: (str(v) if isinstance(v, int | float | list) else v) for k, v in real.items()
    }
    return [
        orjson.dumps(stringly),  # numbers and lists turned into strings
        orjson.dumps({**real, "data": "not an object", "attempts": {"n": 1}}),
        orjson.dumps({"id": real["id"]}),  # only an id
        b"\xff\xfe not json {",
        b"[]",
        b"null",
        b"{}",
    ]


def _partitions(settings: Settings, topic: str) -> list[int]:
    return sorted(end_offsets(settings, topic))


def test_poison_of_every_kind_is_parked_once_and_good_records_behind_it_delivered_once(
    settings: Settings, receiver, workers
) -> None:
    ep = register(settings, receiver, "/a", "invoice.*", "async")
    tier = route.TIERS[0]
    env = {"WEBHOOKS_RETRY_SCHEDULE": "200ms"}
    p = Producer({"bootstrap.servers": settings.bootstrap_servers})
    expected: set[str] = set()  # delivery ids of good records
    poison_sent: Counter[str] = Counter()
    n_events = 0
    for topic in (route.DELIVERIES, tier, route.EVENTS):
        for part in _partitions(settings, topic):
            for raw in poison_kinds(ep.id):
                p.produce(settings.topic(topic), raw, b"invoice:poison", partition=part)
                poison_sent[topic] += 1
            for i in range(2):
                tag = f"{topic[-6:]}-{part}-{i}-{uuid.uuid4().hex[:6]}"
                if topic == route.EVENTS:
                    key, value = build_event("invoice.updated", tag)
                    p.produce(settings.topic(topic), orjson.dumps(value), key.encode(), partition=part)
                    n_events += 1
                else:
                    d = _good(ep.id, tag, failures=1 if topic == tier else 0)
                    p.produce(settings.topic(topic), d.encode(), d.resource_key.encode(), partition=part)
                    expected.add(d.id)
    assert p.flush(20) == 0
    w = workers(**env)

    def ok() -> list:
        return [r for r in receiver.received("/a") if r.status == 200]

    eventually(lambda: len(ok()) >= len(expected) + n_events, 60, "good records delivered")
    groups = {
        route.EVENTS: settings.group_id,
        route.DELIVERIES: f"{settings.group_id}.deliveries",
        tier: f"{settings.group_id}.retry",
    }

    def all_committed() -> bool:
        return all(
            committed_offsets(settings, g, t) == end_offsets(settings, t) for t, g in groups.items()
        )

    # Commits never wait on poison: every consumer commits to the end of its topics.
    eventually(all_committed, 30, "offsets committed to the end of every topic")
    text = w.metrics()
    parked = poison_sent[route.DELIVERIES] + poison_sent[tier]
    assert metric(text, "webhooks_poison_records_total") == parked
    assert metric(text, "webhooks_poison_records_total", topic=route.DELIVERIES) == poison_sent[route.DELIVERIES]
    w.stop()  # graceful
    assert all_committed()

    # A graceful restart delivers nothing again; a sentinel behind everything shows it read on.
    w2 = workers(name="worker2", **env)
    sentinel = _good(ep.id, "sentinel-" + uuid.uuid4().hex[:6])
    p.produce(settings.topic(route.DELIVERIES), sentinel.encode(), sentinel.resource_key.encode())
    key, value = build_event("invoice.updated", "sentinel" + uuid.uuid4().hex[:6])
    p.produce(settings.topic(route.EVENTS), orjson.dumps(value), key.encode())
    assert p.flush(20) == 0
    eventually(lambda: len(ok()) >= len(expected) + n_events + 2, 60, "sentinels delivered")
    eventually(all_committed, 30, "restarted worker committed to the end")

    got = ok()
    ids = Counter(r.header("X-PerfexAPI-Delivery") for r in got)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:5]  # exactly once, restart included
    assert expected | {sentinel.id} <= set(ids)
    assert len(got) == len(expected) + n_events + 2  # nothing but the good records was POSTed
    assert all(r.status == 200 for r in receiver.received("/a"))
    assert metric(w2.metrics(), "webhooks_poison_records_total") == 0

    # Each poison record parked exactly once, with its raw bytes and where it was read.
    dlq = [orjson.loads(m.value()) for m in read_to_end(settings, route.DLQ) if m.value()]
    poison = [e for e in dlq if e.get("dlq_reason") == route.POISON]
    assert len(poison) == parked == len({e["id"] for e in poison})
    by_source = Counter(e["source"]["topic"].removeprefix(settings.topic_prefix) for e in poison)
    assert by_source == {route.DELIVERIES: poison_sent[route.DELIVERIES], tier: poison_sent[tier]}
    sent = set(poison_kinds(ep.id)[3:])  # the kinds whose bytes are the same every time
    assert sent <= {base64.b64decode(e["raw_b64"]) for e in poison}
    assert {e["error_class"] for e in poison} == {"InvalidDelivery"}
    invalid = read_to_end(settings, route.INVALID)
    assert len(invalid) == poison_sent[route.EVENTS]
