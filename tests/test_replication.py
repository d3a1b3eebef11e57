"""Replication is a setting (issue 11, item 9): factor min(3, brokers) by default, min.insync.replicas
factor - 1 (at least 1) on every topic at every `topics apply`; too few replicas get a loud warning."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from app.config import ConfigError, Settings
from app.topics import admin_client, apply, load_specs, replication
from tests.workers import worker_env


def test_factor_and_min_insync_replicas_follow_the_cluster_or_the_setting() -> None:
    s = Settings()
    assert [replication(s, n) for n in (1, 2, 3, 5)] == [(1, 1), (2, 1), (3, 2), (3, 2)]
    assert replication(dataclasses.replace(s, replication_factor=5), 6) == (5, 4)
    assert replication(s, 6, override=2) == (2, 1)
    assert Settings.from_env({"WEBHOOKS_REPLICATION_FACTOR": "2"}).replication_factor == 2
    with pytest.raises(ConfigError, match="WEBHOOKS_REPLICATION_FACTOR"):
        Settings.from_env({"WEBHOOKS_REPLICATION_FACTOR": "0"})


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=worker_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def min_isr(settings: Settings) -> dict[str, str]:
    admin = admin_client(settings)
    res = [ConfigResource(ConfigResource.Type.TOPIC, settings.topic(s.name)) for s in load_specs()]
    return {r.name: f.result()["min.insync.replicas"].value for r, f in admin.describe_configs(res).items()}


@pytest.mark.kafka
def test_apply_sets_min_insync_replicas_everywhere_and_warns_about_missing_replicas(settings) -> None:
    names = {settings.topic(s.name) for s in load_specs()}
    apply(settings)  # one broker: factor 1, min.insync.replicas 1
    admin = admin_client(settings)
    md = admin.list_topics(timeout=10)
    assert {len(p.replicas) for n in names for p in md.topics[n].partitions.values()} == {1}
    assert min_isr(settings) == dict.fromkeys(names, "1")

    # Someone raised min.insync.replicas above the replicas (every acks=all write would fail):
    # the next apply brings it back.
    dlq = settings.topic("webhooks.dlq")
    res = ConfigResource(
        ConfigResource.Type.TOPIC,
        dlq,
        incremental_configs=[ConfigEntry("min.insync.replicas", "2", incremental_operation=AlterConfigOpType.SET)],
    )
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result()
    deadline = time.monotonic() + 60  # the controller accepted it; wait until the broker serves it
    while min_isr(settings)[dlq] != "2":
        assert time.monotonic() < deadline, "the broker never showed min.insync.replicas=2"
        time.sleep(0.2)
    r = cli(settings, "topics", "apply")
    assert r.returncode == 0, r.stderr
    assert f"{dlq}: min.insync.replicas -> 1" in r.stdout

    # Configured 3 on topics that have 1 replica: a warning per topic naming the fix, no failure,
    # and min.insync.replicas stays what the replicas allow.
    r = cli(settings, "topics", "apply", WEBHOOKS_REPLICATION_FACTOR="3")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == len(names), r.stderr
    assert all("fewer than the configured 3" in w and "docs/operations.md" in w for w in warnings)
    assert min_isr(settings) == dict.fromkeys(names, "1")

    # New topics with more replicas than brokers: refused in one line, nothing created.
    other = dataclasses.replace(settings, topic_prefix=settings.topic_prefix + "more.")
    r = cli(other, "topics", "apply", WEBHOOKS_REPLICATION_FACTOR="3")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "needs 3 brokers" in r.stderr and "has 1" in r.stderr
    assert not [t for t in admin.list_topics(timeout=10).topics if t.startswith(other.topic_prefix)]
