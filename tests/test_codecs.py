"""Every Kafka codec reads, and a component that stops for good stops the worker (issue 11, item 0).

Java, Go and librdkafka producers often compress with snappy, lz4 or zstd. Records of each codec,
written by a standard librdkafka producer, go to every topic a worker consumes; each must be handled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer as RdProducer

from app.config import Settings
from app.delivery import Delivery, new_delivery_id
from app.endpoints import create_endpoint
from app.events import build_event
from app.health import EXIT_FAILED
from app.route import ENDPOINTS, TIERS
from tests.helpers import with_receivers

pytestmark = pytest.mark.kafka

CODECS = ("gzip", "snappy", "lz4", "zstd")
FAST = ",".join(["200ms"] * 8)


Produce = Callable[[str, str, str, Any], None]


@pytest.fixture
def produce(settings: Settings) -> Iterator[Produce]:
    """produce(codec, topic, key, value): one record, compressed with `codec` by librdkafka."""
    producers: dict[str, RdProducer] = {}

    def send(codec: str, topic: str, key: str, value: Any) -> None:
        p = producers.get(codec)
        if p is None:
            p = producers[codec] = RdProducer(
                {
                    "bootstrap.servers": settings.bootstrap_servers,
                    "compression.type": codec,
                    "partitioner": "murmur2_random",
                    "enable.idempotence": True,
                }
            )
        p.produce(settings.topic(topic), orjson.dumps(value), key.encode())
        assert p.flush(30) == 0, f"{codec} record to {topic} not acknowledged"

    yield send
    producers.clear()  # librdkafka clients close when the last reference goes


def a_delivery(ep_id: str, failures: int = 0) -> Delivery:
    return Delivery(
        id=new_delivery_id(),
        endpoint_id=ep_id,
        event="invoice.paid",
        event_id="evt_" + new_delivery_id()[4:],
        occurred_at="2026-01-01T00:00:00Z",
        occurred_ts=1767225600.0,
        resource_key="invoice:7",
        data={"id": "7"},
        failures=failures,
    )


def test_every_codec_is_read_on_every_topic(settings, receiver, workers, produce) -> None:
    # Registry: one endpoint per codec, each written compressed with that codec.
    eps = {}
    for codec in CODECS:
        ep = create_endpoint(with_receivers(settings), url=receiver.url(f"/{codec}"), events="invoice.paid", mode="immediate")
        produce(codec, ENDPOINTS, ep.id, ep.record())
        eps[codec] = ep
    w = workers(WEBHOOKS_RETRY_SCHEDULE=FAST)

    events, direct, tiered, dead = {}, {}, {}, {}
    for codec in CODECS:
        key, value = build_event("invoice.paid", "7", {"id": "7", "codec": codec})
        produce(codec, "crm.events", key, value)  # the Faust fan-out
        events[codec] = value["id"]
        d = a_delivery(eps[codec].id)
        produce(codec, "webhooks.deliveries", d.resource_key, d.record())  # delivery agent
        direct[codec] = d.id
        t = a_delivery(eps[codec].id, failures=1)
        produce(codec, TIERS[0], t.resource_key, t.record())  # a retry tier
        tiered[codec] = t.id
        x = a_delivery(eps[codec].id, failures=9)
        produce(codec, "webhooks.dlq", x.id, {**x.record(), "dlq_reason": "exhausted", "dead_at": time.time()})
        dead[codec] = x.id

    # Every endpoint (each read from a record of its own codec) gets the 4 events plus its own
    # delivery and tier record: 6 requests each, once.
    receiver.wait_for(6 * len(CODECS), timeout=60)
    time.sleep(1.0)  # a duplicate would come right behind
    for codec in CODECS:
        got = [r.json for r in receiver.received(f"/{codec}")]
        assert sorted(b["event_id"] for b in got if b["id"] not in (direct[codec], tiered[codec])) == sorted(
            events.values()
        ), codec
        assert sorted(b["id"] for b in got if b["id"] in (direct[codec], tiered[codec])) == sorted(
            [direct[codec], tiered[codec]]
        ), codec
        assert len(got) == 6, codec

    # The DLQ view read all four entries.
    deadline = time.monotonic() + 30
    listed: set[str] = set()
    while time.monotonic() < deadline and not set(dead.values()) <= listed:
        r = w.api("GET", "/api/dlq")
        if r.status_code == 200:
            listed = {e["delivery_id"] for e in r.json()["entries"]}
        time.sleep(0.2)
    assert set(dead.values()) <= listed
    assert httpx.get(w.base + "/ready", timeout=5).status_code == 200
    assert "UnsupportedCodecError" not in Path(w.log_path).read_text(errors="replace")


@pytest.fixture
def no_codec_libraries(tmp_path: Path) -> str:
    """A PYTHONPATH under which `import cramjam` fails, as on an install without aiokafka's codec
    extras: the honest way to make Faust's fetcher meet a record it cannot decode."""
    (tmp_path / "cramjam.py").write_text("raise ImportError('cramjam hidden by the test')\n")
    return str(tmp_path)


@pytest.mark.slow
def test_a_crashed_fetcher_turns_ready_503_and_ends_the_worker_non_zero(
    settings, receiver, workers, produce, no_codec_libraries
) -> None:
    ep = create_endpoint(with_receivers(settings), url=receiver.url("/a"), events="invoice.paid", mode="immediate")
    produce("gzip", ENDPOINTS, ep.id, ep.record())
    w = workers(WEBHOOKS_RETRY_SCHEDULE=FAST, PYTHONPATH=no_codec_libraries)
    key, value = build_event("invoice.paid", "7", {"id": "7"})
    produce("gzip", "crm.events", key, value)
    receiver.wait_for(1, "/a", timeout=30)  # gzip needs no library: the worker works

    key, value = build_event("invoice.paid", "8", {"id": "8"})
    produce("snappy", "crm.events", key, value)  # Faust's fetcher cannot decode this
    seen_503 = False
    deadline = time.monotonic() + 60
    assert w.proc is not None
    while time.monotonic() < deadline and w.proc.poll() is None:
        try:
            r = httpx.get(w.base + "/ready", timeout=1)
            if r.status_code == 503:
                seen_503 = True
                assert "Faust" in r.json()["failure"]
        except httpx.HTTPError:
            pass  # the web server is already gone: the worker is stopping
        time.sleep(0.1)
    assert w.proc.poll() == EXIT_FAILED, f"worker still running or exited {w.proc.returncode}; see {w.log_path}"
    log = Path(w.log_path).read_text(errors="replace")
    assert "stopped working" in log and "UnsupportedCodecError" in log
    assert seen_503, "the worker exited without ever answering /ready with 503"
