"""A stop that always ends: SIGTERM gets a time budget, and what could not be committed is logged.

A graceful stop drains in-flight deliveries, commits offsets and flushes the producer. With the
broker gone, every one of those waits on a broker that does not answer (librdkafka's and aiokafka's
commits, Faust's final commit, the producer's flush), and the worker would hang on SIGTERM until an
orchestrator kills it. So a stop gets a budget: `BROKER_GONE_BUDGET` when no bootstrap server
accepts a connection at SIGTERM, `BUDGET` otherwise (inside docker compose's 45 s grace period).
When the budget runs out, the worker logs, per partition, the offsets it finished but could not
commit (those records are delivered again by the next owner: at-least-once, same delivery ids) and
the records its producer still held, then exits with status 1.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from app.health import EXIT_FAILED, HEALTH

log = logging.getLogger("perfex_webhooks")

BUDGET = 40.0
BROKER_GONE_BUDGET = 12.0  # + the time to notice: the worker is gone within 15 s of SIGTERM
EXIT_UNFINISHED = 1


def broker_reachable(bootstrap: str, timeout: float = 1.0) -> bool:
    """Whether any bootstrap server accepts a TCP connection (a broker process is there)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


def uncommitted(comps: Any) -> list[str]:
    """One line per partition whose finished records are not committed, and the producer's backlog.

    Read from another thread while the loop may still change these dicts: copies, best effort.
    """
    lines: list[str] = []
    settings = comps.settings

    def book_line(topic: str, partition: Any, book: Any) -> None:
        upto = book.committable()
        if upto is not None and upto != book.committed:
            lines.append(
                f"{topic.removeprefix(settings.topic_prefix)}:{partition} finished up to offset {upto}, "
                f"committed {book.committed if book.committed is not None else 'nothing yet'}"
            )

    for partition, book in list(comps.agent.offsets.items()):
        book_line(comps.agent.topic, partition, book)
    for tp, book in list(comps.tiers.offsets.items()):
        book_line(tp.topic, tp.partition, book)
    consumer = getattr(comps.faust_app, "_consumer", None) if comps.faust_app is not None else None
    if consumer is not None:
        committed = dict(getattr(consumer, "_committed_offset", {}))
        for tp, acked in list(getattr(consumer, "_acked", {}).items()):
            if acked and not tp.topic.endswith("-changelog"):
                lines.append(
                    f"{tp.topic.removeprefix(settings.topic_prefix)}:{tp.partition} {len(acked)} acked "
                    f"record(s) up to offset {max(acked)}, committed {committed.get(tp, 'nothing yet')}"
                )
    producer = getattr(comps.outbox, "_producer", None)
    if producer is not None:
        try:
            held = len(producer)
        except Exception:
            held = 0
        if held:
            lines.append(f"producer: {held} record(s) not acknowledged by Kafka")
    return lines


def start_watchdog(comps: Any) -> None:
    """Called at SIGTERM: end the process when the stop outlives its budget."""

    def watch() -> None:
        started = time.monotonic()
        gone = not broker_reachable(comps.settings.bootstrap_servers)
        budget = BROKER_GONE_BUDGET if gone else BUDGET
        if gone:
            log.warning("stopping with the broker unreachable: at most %.0f s, then exit", budget)
        time.sleep(max(0.0, budget - (time.monotonic() - started)))
        try:
            lines = uncommitted(comps)
        except Exception as exc:  # the report must not keep the process alive
            lines = [f"(could not list: {exc!r})"]
        log.error(
            "stop did not finish within %.0f s%s; exiting. Could not commit:%s",
            budget,
            " (broker unreachable)" if gone else "",
            "".join(f"\n  {line}" for line in lines) or " nothing outstanding",
        )
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:
                pass
        os._exit(EXIT_UNFINISHED if HEALTH.ok else EXIT_FAILED)  # a failure's stop keeps its status

    threading.Thread(target=watch, name="stop-watchdog", daemon=True).start()
