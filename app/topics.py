"""Topic declarations (`topics.yaml`) and `perfex-webhooks topics apply`.

apply = create what is missing, raise partition counts that are below the declaration, and bring
declared configs to their values (incremental alter, so settings we do not declare are left alone).
It is idempotent: a second run reports no change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from app import route
from app.config import Settings

REPO_TOPICS = Path(__file__).resolve().parent.parent / "topics.yaml"


class TopicsError(RuntimeError):
    pass


@dataclass(frozen=True)
class TopicSpec:
    name: str  # logical name, without prefix
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    role: str = ""


@cache
def _topics_doc() -> dict[str, Any]:
    # The repo's top-level topics.yaml in a checkout; the copy packed into the wheel otherwise.
    if REPO_TOPICS.exists():
        text = REPO_TOPICS.read_text(encoding="utf-8")
    else:
        text = resources.files("app").joinpath("topics.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_specs(doc: dict[str, Any] | None = None) -> list[TopicSpec]:
    doc = doc or _topics_doc()
    d = doc.get("defaults", {})
    out = []
    for name, t in doc["topics"].items():
        t = t or {}
        cfg = {**d.get("config", {}), **(t.get("config") or {})}
        out.append(
            TopicSpec(
                name=name,
                partitions=int(t.get("partitions", d.get("partitions", 1))),
                config={k: str(v) for k, v in cfg.items()},
                role=t.get("role", ""),
            )
        )
    return out


def spec(name: str) -> TopicSpec:
    for s in load_specs():
        if s.name == name:
            return s
    raise KeyError(name)


# ---- record sizes ------------------------------------------------------------------------------
# An input event of WEBHOOKS_MAX_EVENT_BYTES is re-encoded on its way through the pipeline: as a
# delivery record (its data and previous state plus ids, times and the attempt history, which grows
# by ~0.5 KB per failed attempt and keeps its history across DLQ replays), as a DLQ entry (the
# delivery plus reason and time) and in the smart table's changelog (the last state). 64 KiB leaves
# room for the history of ~100 attempts.
RECORD_OVERHEAD = 64 * 1024
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588  # the broker's message.max.bytes default
CARRIES_EVENT = (route.EVENTS,)
CARRIES_DELIVERY = (route.DELIVERIES, *route.TIERS, route.DLQ, route.SMART_CHANGELOG, route.HELD)


def required_message_bytes(settings: Settings) -> dict[str, int]:
    """The least `max.message.bytes` each topic needs for an event of WEBHOOKS_MAX_EVENT_BYTES."""
    need = {t: settings.max_event_bytes + 1024 for t in CARRIES_EVENT}  # + Kafka's record framing
    need.update({t: settings.max_event_bytes + RECORD_OVERHEAD for t in CARRIES_DELIVERY})
    return need


def largest_record_bytes(settings: Settings) -> int:
    """What the worker's producers must be allowed to send (librdkafka message.max.bytes, Faust's
    max request size)."""
    return max(4 * 1024 * 1024, *required_message_bytes(settings).values()) + 64 * 1024


def check_sizes(settings: Settings, limits: dict[str, int], topics: set[str] | None = None) -> None:
    """Refuse (TopicsError, one line) when a topic's limit is below what an event of
    WEBHOOKS_MAX_EVENT_BYTES needs. `limits`: logical topic name -> max.message.bytes (the broker's
    default when absent); `topics`: only these (default: all)."""
    short = [
        (t, limits.get(t, KAFKA_DEFAULT_MAX_MESSAGE_BYTES), n)
        for t, n in required_message_bytes(settings).items()
        if (topics is None or t in topics) and limits.get(t, KAFKA_DEFAULT_MAX_MESSAGE_BYTES) < n
    ]
    if short:
        t, have, need = short[0]
        more = f" (and {len(short) - 1} more topics)" if len(short) > 1 else ""
        raise TopicsError(
            f"{settings.topic(t)} accepts records of {have} bytes (max.message.bytes) but "
            f"WEBHOOKS_MAX_EVENT_BYTES={settings.max_event_bytes} needs {need}{more}: raise max.message.bytes "
            "in topics.yaml and run `perfex-webhooks topics apply`, or lower WEBHOOKS_MAX_EVENT_BYTES"
        )


def declared_limits(specs: list[TopicSpec]) -> dict[str, int]:
    return {s.name: int(s.config["max.message.bytes"]) for s in specs if "max.message.bytes" in s.config}


def check_live_sizes(settings: Settings, timeout: float = 5.0) -> None:
    """The same check against the topics as the broker has them (a worker that did not apply)."""
    from confluent_kafka.admin import ConfigResource

    admin = admin_client(settings, timeout)
    names = list(required_message_bytes(settings))
    existing = admin.list_topics(timeout=timeout).topics
    res = [
        ConfigResource(ConfigResource.Type.TOPIC, settings.topic(n))
        for n in names
        if settings.topic(n) in existing
    ]
    if not res:  # none of them exists yet (or the metadata lags a fresh create): nothing to check
        return
    limits = {}
    for r, fut in admin.describe_configs(res, request_timeout=timeout * 2).items():
        entry = fut.result().get("max.message.bytes")
        if entry is not None and entry.value is not None:
            limits[r.name.removeprefix(settings.topic_prefix)] = int(entry.value)
    check_sizes(settings, limits, {n for n in names if settings.topic(n) in existing})


def admin_client(settings: Settings, timeout: float = 5.0):
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("perfex_webhooks.rdkafka")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    admin = AdminClient(
        {"bootstrap.servers": settings.bootstrap_servers, "logger": quiet, "socket.timeout.ms": 5000}
    )
    try:
        admin.list_topics(timeout=timeout)
    except Exception as exc:
        raise TopicsError(
            f"cannot reach Kafka at {settings.bootstrap_servers} within {timeout:.0f}s "
            "(check KAFKA_BOOTSTRAP_SERVERS)"
        ) from exc
    return admin


# ---- replication -------------------------------------------------------------------------------
def replication(settings: Settings, brokers: int, override: int | None = None) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for every topic: the factor is
    `--replication-factor`, else WEBHOOKS_REPLICATION_FACTOR, else min(3, brokers); min.insync.replicas
    is factor - 1 (at least 1), so one replica may be down while writes with acks=all go on."""
    factor = override or settings.replication_factor or min(3, max(1, brokers))
    return factor, max(1, factor - 1)


def resolve_replication(settings: Settings, timeout: float = 5.0) -> int:
    """The replication factor `apply` uses on this cluster (for Faust's own topic settings)."""
    admin = admin_client(settings, timeout)
    return replication(settings, len(admin.list_topics(timeout=timeout).brokers))[0]


def _log_warning(line: str) -> None:
    logging.getLogger("perfex_webhooks").warning("%s", line)


def _await_visible(
    admin: Any, wanted: dict[str, int], timeout: float, warn: Callable[[str], None]
) -> None:
    """Wait until metadata shows each created topic with all its partitions led.

    CreateTopics returns once the controller has the topics; brokers' metadata follows a moment
    later. A worker started right after `topics apply` (or a second apply) must not find them
    missing and try to create or subscribe to nothing.
    """
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        missing = [
            n
            for n, parts in wanted.items()
            if n not in topics
            or len(topics[n].partitions) < parts
            or any(p.leader < 0 for p in topics[n].partitions.values())
        ]
        if not missing:
            return
        if time.monotonic() > deadline:  # created all the same: whoever uses them next retries
            warn(f"WARNING: created topics not yet in the brokers' metadata after {timeout:.0f} s: {missing}")
            return
        time.sleep(0.1)


def apply(
    settings: Settings,
    *,
    replication_factor: int | None = None,
    timeout: float = 5.0,
    warn: Callable[[str], None] = _log_warning,
) -> list[str]:
    """Create or reconcile every declared topic; returns the changes made (empty when none).

    Every topic gets the replication factor and min.insync.replicas of `replication`. Kafka cannot
    add replicas to an existing topic by a config change: a topic with fewer replicas than
    configured gets a warning (`warn`) naming the fix (partition reassignment, docs/operations.md),
    and its min.insync.replicas follows the replicas it has, so that writes with acks=all go on.
    """
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        NewPartitions,
        NewTopic,
    )

    specs = load_specs()
    check_sizes(settings, declared_limits(specs))  # before changing anything
    admin = admin_client(settings, timeout)
    md = admin.list_topics(timeout=timeout)
    existing = md.topics
    changes: list[str] = []
    factor, min_isr = replication(settings, len(md.brokers), replication_factor)

    to_create = [s for s in specs if settings.topic(s.name) not in existing]
    if to_create and factor > len(md.brokers):
        raise TopicsError(
            f"replication factor {factor} (WEBHOOKS_REPLICATION_FACTOR or --replication-factor) needs "
            f"{factor} brokers; the cluster at {settings.bootstrap_servers} has {len(md.brokers)}"
        )
    if to_create:
        futures = admin.create_topics(
            [
                NewTopic(
                    settings.topic(s.name),
                    num_partitions=s.partitions,
                    replication_factor=factor,
                    config={**s.config, "min.insync.replicas": str(min_isr)},
                )
                for s in to_create
            ],
            operation_timeout=timeout * 2,
            request_timeout=timeout * 2,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                changes.append(f"created {name}")
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):  # a concurrent apply won the race
                    raise TopicsError(f"creating {name}: {exc}") from exc
        _await_visible(admin, {settings.topic(s.name): s.partitions for s in to_create}, timeout * 2, warn)

    present = [s for s in specs if s not in to_create]
    grow = {
        settings.topic(s.name): NewPartitions(s.partitions)
        for s in present
        if len(existing[settings.topic(s.name)].partitions) < s.partitions
    }
    if grow:
        for name, fut in admin.create_partitions(list(grow.values()), request_timeout=timeout * 2).items():
            fut.result()
            changes.append(f"{name}: partitions raised to {grow[name].new_total_count}")

    if present:
        resources_ = [ConfigResource(ConfigResource.Type.TOPIC, settings.topic(s.name)) for s in present]
        described = {r.name: f.result() for r, f in admin.describe_configs(resources_).items()}
        alters = []
        for s in present:
            name = settings.topic(s.name)
            current = described[name]
            replicas = min((len(p.replicas) for p in existing[name].partitions.values()), default=factor)
            if replicas < factor:
                warn(
                    f"WARNING: {name} has {replicas} replica(s) per partition, fewer than the configured "
                    f"{factor}: a broker failure can lose or stop it. Raise it by partition reassignment "
                    "(docs/operations.md, 'Replication')"
                )
            wanted = {**s.config, "min.insync.replicas": str(max(1, min(factor, replicas) - 1))}
            diff = {k: v for k, v in wanted.items() if k not in current or str(current[k].value) != v}
            if diff:
                res = ConfigResource(
                    ConfigResource.Type.TOPIC,
                    name,
                    incremental_configs=[
                        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                        for k, v in diff.items()
                    ],
                )
                alters.append(res)
                changes.extend(f"{name}: {k} -> {v}" for k, v in diff.items())
        if alters:
            for fut in admin.incremental_alter_configs(alters).values():
                fut.result()
    return changes
