"""Helpers shared by the test modules: registering endpoints, polling with a deadline, the CLI, and
reading Prometheus metrics. Test modules import from here, never from each other."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from click.testing import CliRunner, Result
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.endpoints import TOPIC, Endpoint, create_endpoint
from app.producer import Producer
from tests.receiver import Receiver, Reply

Samples = list[tuple[str, dict[str, str], float]]


def register(settings: Settings, receiver: Receiver, path: str, events: str, mode: str) -> Endpoint:
    """An endpoint on the test receiver, written to the registry topic the way the CLI writes it."""
    ep = create_endpoint(settings, url=receiver.url(path), events=events, mode=mode)
    with Producer(settings) as p:
        p.send(TOPIC, ep.id, ep.record())
    return ep


def eventually(fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll fn until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s (last: {last!r})")


def cli(settings: Settings, *args: str, **extra: str | None) -> Result:
    """Run `perfex-webhooks ARGS` in-process against this test's broker and topic prefix."""
    from app.cli import main

    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "WEBHOOKS_TOPIC_PREFIX": settings.topic_prefix,
        "WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true",
        **extra,
    }
    return CliRunner().invoke(main, ["--env-file", "/nonexistent", *args], env=env)


def cli_json(settings: Settings, *args: str) -> Any:
    res = cli(settings, *args, "--json")
    assert res.exit_code == 0, res.output
    return orjson.loads(res.output)


def parse_metrics(text: str) -> Samples:
    """(sample name, labels, value) of every sample in a Prometheus text exposition."""
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of samples named `name` whose labels include `labels` (None if there is none)."""
    hits = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(hits) if hits else None


def metric(text: str, name: str, **labels: str) -> float:
    """Like metric_value on a scrape's text, with 0 for a series that does not exist (yet)."""
    return metric_value(parse_metrics(text), name, **labels) or 0.0


def read_all(settings: Settings, topic: str, expect: int, timeout: float = 20.0) -> list:
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "reader-" + settings.topic_prefix,
            "enable.auto.commit": False,
        }
    )
    name = settings.topic(topic)
    parts = c.list_topics(name, timeout=10).topics[name].partitions
    c.assign([TopicPartition(name, p, 0) for p in parts])
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < expect and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is not None and msg.error() is None:
            out.append(msg)
    c.close()
    return out


@dataclass
class Load:
    endpoints: dict[str, Endpoint]  # role -> endpoint
    resource_ids: list[str]  # unique per run: none may show up in a label
    events: int  # valid events produced
    invalid: int  # bad records produced


def register_load_endpoints(
    settings: Settings, receiver: Receiver, fail: str = "async"
) -> dict[str, Endpoint]:
    """One endpoint per mode that succeeds, one that always fails (HTTP 500) and one that says 410."""
    receiver.on("/fail", lambda n: Reply(500, body=b"down"))
    receiver.on("/gone", lambda n: Reply(410, body=b"gone"))
    return {
        "immediate": register(settings, receiver, "/immediate", "invoice.*,lead.*", "immediate"),
        "async": register(settings, receiver, "/async", "invoice.*,lead.*", "async"),
        "smart": register(settings, receiver, "/smart", "invoice.*", "smart"),
        "fail": register(settings, receiver, "/fail", "lead.created", fail),
        "gone": register(settings, receiver, "/gone", "lead.deleted", "immediate"),
    }


def produce_load(settings: Settings, endpoints: dict[str, Endpoint], rounds: int = 4) -> Load:
    """Smart bursts on 3 invoices (12 events), 3 leads for the failing endpoint, 1 event for the 410
    endpoint, and two bad records."""
    tag = uuid.uuid4().hex[:6]
    invoices = [f"inv{tag}{i}" for i in range(3)]
    leads = [f"lead{tag}{i}" for i in range(3)]
    n = 0
    with Producer(settings) as p:
        for r in range(rounds):
            for rid in invoices:
                p.emit(
                    "invoice.updated", rid, {"id": rid, "total": f"{r}.50", "url": "https://crm.example/x"}
                )
                n += 1
        for rid in leads:
            p.emit("lead.created", rid, {"id": rid, "name": "Ada"})
            n += 1
        p.emit("lead.deleted", leads[0], {"id": leads[0]})  # to the endpoint that answers 410
        n += 1
        p.send("crm.events", f"invoice:{invoices[0]}", b"{not json")
        p.send("crm.events", f"invoice:{invoices[1]}", {"id": "evt_x", "event": "no.such_event"})
    return Load(endpoints, invoices + leads, n, 2)
