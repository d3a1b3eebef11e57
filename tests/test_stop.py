"""SIGTERM with the broker gone (issue 11, item 7): the worker ends within 15 s and logs what it
could not commit. The session broker is shared, so this test stops a private one."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from app.config import Settings
from app.producer import Producer
from app.topics import apply
from tests.helpers import private_broker, register
from tests.workers import OUTPUT, WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_sigterm_with_the_broker_gone_ends_the_worker_within_15_s(receiver) -> None:
    broker = private_broker(OUTPUT / "kafka" / f"gone-{uuid.uuid4().hex[:8]}")
    broker.start()
    worker: WorkerProcess | None = None
    try:
        settings = Settings.from_env(
            {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
            }
        )
        apply(settings)
        register(settings, receiver, "/async", "invoice.paid", "async")
        register(settings, receiver, "/now", "invoice.paid", "immediate")
        worker = WorkerProcess(settings, name="broker-gone").start()
        with Producer(settings) as p:
            for i in range(200):
                p.emit("invoice.paid", str(i), {"id": str(i)})
        receiver.wait_for(20, "/async", timeout=60)  # work is under way on both consumers

        assert broker.proc is not None
        os.killpg(broker.proc.pid, signal.SIGKILL)  # the broker is gone, not shutting down
        broker.proc.wait(10)
        assert worker.proc is not None
        started = time.monotonic()
        os.killpg(worker.proc.pid, signal.SIGTERM)
        try:
            code = worker.proc.wait(30)
        finally:
            took = time.monotonic() - started
        log = worker.log_path.read_text(errors="replace")
        print(f"worker ended {took:.1f} s after SIGTERM with status {code}")
        assert took <= 15, f"the worker took {took:.1f} s to stop; see {worker.log_path}"
        assert "stopping with the broker unreachable" in log
        if code != 0:  # cut short: it says what it could not commit (or that nothing was left)
            assert "Could not commit:" in log, worker.log_path
    finally:
        if worker is not None:
            worker.stop(timeout=5)
        broker.stop()
