"""Synchronous producer for the CLI and the Python API (confluent-kafka).

librdkafka's default partitioner differs from the Java client and aiokafka; `murmur2_random`
makes `emit` put a key on the same partition the workers (and any Java producer) would.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from app import route
from app.config import Settings
from app.events import build_event


class ProduceError(RuntimeError):
    pass


class Producer:
    def __init__(self, settings: Settings | None = None) -> None:
        from confluent_kafka import Producer as _Producer

        from app.topics import largest_record_bytes

        self.settings = settings or Settings.from_env()
        quiet = logging.getLogger("perfex_webhooks.rdkafka")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        self._p = _Producer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "partitioner": "murmur2_random",
                "enable.idempotence": True,
                "linger.ms": 5,
                # Nagle held a flushed record for the previous segment's TCP ACK: produce -> ack
                # p50 1.87 -> 0.65 ms (bench.produce_ack, docs/performance.md 10.3).
                "socket.nagle.disable": True,
                "message.timeout.ms": 15000,
                "message.max.bytes": largest_record_bytes(self.settings),  # events up to the limit
                "logger": quiet,
            }
        )
        self._errors: list[str] = []

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def send(
        self, topic: str, key: str | bytes | None, value: Any, headers: dict[str, str] | None = None
    ) -> None:
        """Queue one record on a logical topic name (the prefix is added). Dicts become JSON."""
        raw = value if value is None or isinstance(value, bytes) else orjson.dumps(value)
        k = key.encode() if isinstance(key, str) else key
        while True:
            try:
                self._p.produce(
                    self.settings.topic(topic),
                    value=raw,
                    key=k,
                    headers=list((headers or {}).items()) or None,
                    on_delivery=self._report,
                )
                break
            except BufferError:  # local queue full: let librdkafka drain, then retry
                self._p.poll(0.1)
        self._p.poll(0)

    def flush(self, timeout: float = 15.0) -> None:
        left = self._p.flush(timeout)
        if left:
            raise ProduceError(
                f"{left} record(s) not acknowledged by Kafka at {self.settings.bootstrap_servers} "
                f"within {timeout:.0f}s"
            )
        if self._errors:
            errors, self._errors = self._errors, []
            raise ProduceError("; ".join(errors[:3]))

    def emit(
        self,
        event: str,
        resource_id: str | int,
        data: dict[str, Any] | None = None,
        previous: dict[str, Any] | None = None,
        *,
        flush: bool = True,
        **kw: Any,
    ) -> dict[str, Any]:
        """Produce one change event to `crm.events` (SPEC §3.1); returns the envelope."""
        key, value = build_event(event, resource_id, data, previous, **kw)
        self.send(route.EVENTS, key, value)
        if flush:
            self.flush()
        return value

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def emit(
    event: str,
    resource_id: str | int,
    data: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """One-shot Python API: validate, produce and wait for the broker's acknowledgement."""
    with Producer(settings) as p:
        return p.emit(event, resource_id, data, previous, flush=False)
