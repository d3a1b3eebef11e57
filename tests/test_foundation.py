"""Foundation: topics apply, emit, catalog, against the real broker where Kafka is involved."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml
from click.testing import CliRunner
from confluent_kafka.admin import AdminClient, ConfigResource

from app.catalog import load_catalog, matches
from app.cli import main
from app.config import Settings
from app.topics import apply, load_specs
from tests.helpers import eventually, missing, read_all

ROOT = Path(__file__).resolve().parent.parent
# The product contract beside the checkout (../shared), or beside the worktrees' parent (../../shared).
SHARED_CATALOG = next(
    (p for p in (ROOT.parent / "shared" / "catalog.yaml", ROOT.parent.parent / "shared" / "catalog.yaml") if p.exists()),
    ROOT.parent / "shared" / "catalog.yaml",
)


def env_for(settings: Settings) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "WEBHOOKS_TOPIC_PREFIX": settings.topic_prefix,
    }


# ---- catalog --------------------------------------------------------------------------------------
def test_catalog_has_19_resources_and_all_documented_names() -> None:
    cat = load_catalog()
    assert len(cat.resources) == 19
    assert len(cat.events) >= 100
    assert sum(e.documented for e in cat.events.values()) == 73
    for name in ("invoice.paid", "lead.created", "customer.created", "ticket.created"):
        assert cat.events[name].documented


def test_shipped_catalog_equals_shared_contract() -> None:
    if not SHARED_CATALOG.exists():
        missing(f"{SHARED_CATALOG} (the product contract) is not beside the checkout")
    shipped = yaml.safe_load((ROOT / "app" / "catalog.yaml").read_text())
    assert shipped == yaml.safe_load(SHARED_CATALOG.read_text())


def test_wildcards() -> None:
    cat = load_catalog()
    assert matches(["invoice.*"], "invoice.paid")
    assert not matches(["invoice.*"], "lead.created")
    assert matches(["*"], "lead.created")
    assert matches(["lead.created"], "lead.created") and not matches(["lead.created"], "lead.updated")
    assert set(cat.expand("invoice.*")) == {e for e in cat.events if e.startswith("invoice.")}
    assert cat.validate_patterns("invoice.*, lead.created") == ["invoice.*", "lead.created"]
    with pytest.raises(ValueError, match=r"nosuch\.\*"):
        cat.validate_patterns("nosuch.*")


def test_catalog_cli_json() -> None:
    res = CliRunner().invoke(main, ["catalog", "--json"])
    assert res.exit_code == 0
    doc = orjson.loads(res.output)
    assert len(doc["resources"]) == 19
    assert sum(len(r["events"]) for r in doc["resources"].values()) == 138


# ---- topics ---------------------------------------------------------------------------------------
def test_topics_apply_creates_every_topic_then_changes_nothing(settings: Settings) -> None:
    changes = apply(settings)
    specs = load_specs()
    assert {c.removeprefix("created ") for c in changes if c.startswith("created ")} == {
        settings.topic(s.name) for s in specs
    }
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    names = {settings.topic(s.name) for s in specs}
    # The brokers' metadata may trail the controller by a moment (apply waits, then only warns).
    md = eventually(lambda: (t := admin.list_topics(timeout=10).topics).keys() >= names and t, 60, "metadata")
    resources = [ConfigResource(ConfigResource.Type.TOPIC, settings.topic(s.name)) for s in specs]
    described = {r.name: f.result() for r, f in admin.describe_configs(resources).items()}
    for s in specs:
        name = settings.topic(s.name)
        assert len(md[name].partitions) == s.partitions, name
        for k, v in s.config.items():
            assert described[name][k].value == v, (name, k)
    assert described[settings.topic("webhooks.endpoints")]["cleanup.policy"].value == "compact"
    # Faust's smart-table changelog is co-partitioned with its source topic.
    changelog = settings.topic(
        f"{settings.group_id.removeprefix(settings.topic_prefix)}-smart-pending-changelog"
    )
    assert len(md[changelog].partitions) == len(md[settings.topic("crm.events")].partitions)
    assert apply(settings) == []

    # The CLI says so too, and reconciles drift.
    res = CliRunner().invoke(main, ["topics", "apply"], env=env_for(settings))
    assert res.exit_code == 0, res.output
    assert "topics up to date" in res.output


def test_topics_apply_unreachable_broker_fails_fast_with_one_line() -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "topics", "apply", "--timeout", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot reach Kafka at 127.0.0.1:1" in lines[0], res.stderr
    assert elapsed < 30


# ---- emit -----------------------------------------------------------------------------------------
def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's default partitioner), written out for the check."""
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(data)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    tail = data[length - rest :]
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def java_partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_emit_cli_writes_documented_envelope_on_murmur2_partition(settings: Settings) -> None:
    apply(settings)
    ids = {}
    for rid in ("19", "20", "7", "12345"):
        res = CliRunner().invoke(
            main,
            [
                "emit",
                "invoice.paid",
                "--resource-id",
                rid,
                "--data",
                f'{{"id": "{rid}", "status": "2"}}',
                "--previous",
                '{"status": "3"}',
                "--json",
            ],
            env=env_for(settings),
        )
        assert res.exit_code == 0, res.output
        ids[rid] = orjson.loads(res.output)["id"]
    msgs = read_all(settings, "crm.events", 4)
    assert len(msgs) == 4
    partitions = next(s.partitions for s in load_specs() if s.name == "crm.events")
    for msg in msgs:
        value = orjson.loads(msg.value())
        rid = value["resource_id"]
        assert msg.key() == f"invoice:{rid}".encode()
        assert msg.partition() == java_partition(msg.key(), partitions)
        assert value["id"] == ids[rid] and value["id"].startswith("evt_")
        assert value["event"] == "invoice.paid"
        assert value["data"] == {"id": rid, "status": "2"}
        assert value["previous"] == {"status": "3"}
        assert value["occurred_at"].endswith("Z")
        assert b" " not in msg.value()  # compact JSON


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["emit", "invoice.nosuch", "--resource-id", "1"], "not in the catalog"),
        (["emit", "invoice.paid", "--resource-id", "1", "--data", "{bad json"], "--data: not valid JSON"),
        (["emit", "invoice.paid", "--resource-id", "", "--data", "{}"], "resource_id is required"),
        (["emit", "invoice.paid", "--resource-id", "1", "--data", "[1]"], "must be a JSON object"),
        (["emit", "invoice.paid", "--resource-id", "1", "--data", "@/nonexistent.json"], "cannot read"),
    ],
)
def test_emit_bad_input_is_one_clear_line(args: list[str], message: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        timeout=60,
    )
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
