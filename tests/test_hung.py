"""A hung endpoint never evicts a worker (issue 11 item 3), with a real worker and the real broker.

5,000 deliveries queue for an endpoint that never answers; a healthy async and a healthy immediate
endpoint still get theirs within the delivery timeout + 5 s, and the worker keeps its group
membership all along: no consumer thread waits for room, it stops taking records and keeps polling
(the delivery agent pauses only after a long stall; max.poll.interval is 10 s here, so a thread
blocked behind the hung endpoint would be evicted).
"""

from __future__ import annotations

import re
import time
import uuid

import pytest
from confluent_kafka import Producer

from app import route
from app.delivery import Delivery
from tests.helpers import committed_offsets, end_offsets, eventually, metric, register
from tests.receiver import Reply

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TIMEOUT = 2.0
REBALANCE = re.compile(r"revoked|lost \[|rebalanc|MAXPOLL|max\.poll|leav(e|ing) (the )?group", re.I)


def test_hung_endpoint_with_5000_queued_never_holds_up_others_or_evicts_the_worker(
    settings, receiver, workers
) -> None:
    receiver.on("/hung", lambda n: Reply(hang=True))
    hung = register(settings, receiver, "/hung", "lead.created", "async")
    register(settings, receiver, "/async", "invoice.*", "async")
    register(settings, receiver, "/immediate", "invoice.*", "immediate")
    w = workers(
        WEBHOOKS_DELIVERY_TIMEOUT=f"{TIMEOUT:g}s",
        WEBHOOKS_MAX_POLL_INTERVAL="10s",
        WEBHOOKS_RETRY_SCHEDULE="60s",  # the hung endpoint's retries stay out of this run
    )
    log_start = w.log_path.stat().st_size
    n_hung, n = 5000, 20
    p = Producer({"bootstrap.servers": settings.bootstrap_servers, "linger.ms": 20})
    for i in range(n_hung):
        d = Delivery(
            id=f"dlv_hung_{i}",
            endpoint_id=hung.id,
            event="lead.created",
            event_id=f"evt_hung_{i}",
            occurred_at="2026-11-27T10:00:00.000Z",
            occurred_ts=time.time(),
            resource_key=f"lead:{i}",
            data={"id": str(i)},
        )
        p.produce(settings.topic(route.DELIVERIES), d.encode(), d.resource_key.encode())
    assert p.flush(30) == 0
    from app.producer import Producer as Emitter

    tag = uuid.uuid4().hex[:6]
    with Emitter(settings) as e:
        ids = {e.emit("invoice.updated", f"{tag}{i}", {"id": f"{tag}{i}"}, flush=False)["id"] for i in range(n)}
    t0 = time.monotonic()

    def got(path: str) -> set[str]:
        return {r.json["event_id"] for r in receiver.received(path) if r.status == 200}

    eventually(lambda: got("/async") >= ids and got("/immediate") >= ids, TIMEOUT + 5, "healthy deliveries")
    print(f"\nhealthy endpoints served {time.monotonic() - t0:.1f}s after their events (bound {TIMEOUT + 5:g}s)")

    # Every one of the 5,000 is handled once (an attempt that timed out, or deferred to a tier) and
    # the agent commits to the end; all the while (well past max.poll.interval) no rebalance.
    def handled() -> float:
        return metric(w.metrics(), "webhooks_deliveries_total", endpoint=hung.id)

    eventually(lambda: handled() >= n_hung, 60, "every hung delivery handled")
    group = f"{settings.group_id}.deliveries"
    eventually(
        lambda: committed_offsets(settings, group, route.DELIVERIES) == end_offsets(settings, route.DELIVERIES),
        30,
        "delivery agent committed to the end",
    )
    assert handled() == n_hung
    assert len(receiver.received("/async")) == len(receiver.received("/immediate")) == n

    def rebalances() -> list[str]:
        with open(w.log_path, "rb") as f:
            f.seek(log_start)
            tail = f.read().decode("utf-8", "replace")
        return [line for line in tail.splitlines() if REBALANCE.search(line)]

    # Watched for longer than max.poll.interval (10 s) since the burst: an eviction would show.
    while time.monotonic() < t0 + 12:
        assert not rebalances(), rebalances()
        time.sleep(0.5)
    assert not rebalances(), rebalances()
