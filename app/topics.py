"""Topic declarations (`topics.yaml`) and `perfex-webhooks topics apply`.

apply = create what is missing, raise partition counts that are below the declaration, and bring
declared configs to their values (incremental alter, so settings we do not declare are left alone).
It is idempotent: a second run reports no change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from app.config import Settings

REPO_TOPICS = Path(__file__).resolve().parent.parent / "topics.yaml"


class TopicsError(RuntimeError):
    pass


@dataclass(frozen=True)
class TopicSpec:
    name: str  # logical name, without prefix
    partitions: int
    replication_factor: int
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
                replication_factor=int(t.get("replication_factor", d.get("replication_factor", 1))),
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


def apply(settings: Settings, *, replication_factor: int | None = None, timeout: float = 5.0) -> list[str]:
    """Create or reconcile every declared topic; returns the changes made (empty when none)."""
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        NewPartitions,
        NewTopic,
    )

    admin = admin_client(settings, timeout)
    specs = load_specs()
    existing = admin.list_topics(timeout=timeout).topics
    changes: list[str] = []

    to_create = [s for s in specs if settings.topic(s.name) not in existing]
    if to_create:
        futures = admin.create_topics(
            [
                NewTopic(
                    settings.topic(s.name),
                    num_partitions=s.partitions,
                    replication_factor=replication_factor or s.replication_factor,
                    config=s.config,
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
            diff = {k: v for k, v in s.config.items() if k not in current or str(current[k].value) != v}
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
