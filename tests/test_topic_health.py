"""Topic health (issue 11, item 6): every topic accepts an event of WEBHOOKS_MAX_EVENT_BYTES after
re-encoding, and `topics apply` and the worker refuse topics that do not, with one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from app.config import Settings
from app.producer import Producer
from app.topics import admin_client, apply
from tests.helpers import register
from tests.receiver import Reply
from tests.workers import worker_env

pytestmark = pytest.mark.kafka

FAST = ",".join(["200ms"] * 8)


def run_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=worker_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_apply_and_worker_refuse_topics_too_small_for_the_event_limit(settings) -> None:
    # topics.yaml's 2 MiB cannot hold a 3 MB event re-encoded: apply refuses before creating anything.
    r = run_cli(settings, "topics", "apply", WEBHOOKS_MAX_EVENT_BYTES="3000000")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "max.message.bytes" in err and "WEBHOOKS_MAX_EVENT_BYTES=3000000" in err
    admin = admin_client(settings)
    assert not [t for t in admin.list_topics(timeout=10).topics if t.startswith(settings.topic_prefix)]

    # A topic someone shrank on the broker: a worker that does not apply topics refuses to start.
    apply(settings)
    res = ConfigResource(
        ConfigResource.Type.TOPIC,
        settings.topic("webhooks.dlq"),
        incremental_configs=[
            ConfigEntry("max.message.bytes", "1048588", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result()
    deadline = time.monotonic() + 30  # the controller accepted it; wait until the broker serves it
    while time.monotonic() < deadline:
        desc = ConfigResource(ConfigResource.Type.TOPIC, settings.topic("webhooks.dlq"))
        if next(iter(admin.describe_configs([desc]).values())).result()["max.message.bytes"].value == "1048588":
            break
        time.sleep(0.2)
    r = run_cli(settings, "worker", "--no-apply-topics", WEBHOOKS_WEB_PORT="0")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{settings.topic('webhooks.dlq')} accepts records of 1048588 bytes" in err
    # `topics apply` brings the declared size back, and the check passes.
    apply(settings)


@pytest.mark.slow
def test_an_event_at_the_size_limit_crosses_every_topic(settings, receiver, workers) -> None:
    limit = 1_900_000  # above Kafka's 1 MB default: the delivery record needs topics.yaml's sizing
    big = {"id": "1", "blob": "é" * 880_000}  # 1.76 MB as UTF-8
    receiver.on("/flaky", lambda n: Reply(status=500 if n <= 2 else 200))  # deliveries + 2 tiers
    receiver.on("/dead", lambda n: Reply(status=500))  # every tier, then the DLQ
    register(settings, receiver, "/flaky", "invoice.paid", "async")
    dead = register(settings, receiver, "/dead", "invoice.paid", "async")
    register(settings, receiver, "/smart", "invoice.paid", "smart")  # the smart table's changelog
    w = workers(WEBHOOKS_RETRY_SCHEDULE=FAST, WEBHOOKS_MAX_EVENT_BYTES=str(limit), WEBHOOKS_SMART_WINDOW="300ms")
    with Producer(dataclasses.replace(settings, max_event_bytes=limit)) as p:  # `emit`'s producer
        p.emit("invoice.paid", "1", big)
    receiver.wait_for(3, "/flaky", timeout=60)
    receiver.wait_for(1, "/smart", timeout=60)
    receiver.wait_for(9, "/dead", timeout=90)
    for path in ("/flaky", "/smart", "/dead"):
        for r in receiver.received(path):
            assert r.json["payload"]["blob"] == big["blob"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entries = w.api("GET", "/api/dlq", params={"endpoint": dead.id}).json()["entries"]
        if entries:
            break
        time.sleep(0.2)
    assert [e["attempts"] for e in entries] == [9]
    assert "MSG_SIZE_TOO_LARGE" not in w.log_path.read_text(errors="replace")
