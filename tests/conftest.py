"""Shared fixtures: one real Kafka broker per test session, a fresh topic prefix per test.

Set PERFEX_TEST_BOOTSTRAP=host:port to run against a broker you already have.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
SLOW_TIMEOUT = 600  # seconds; pyproject's `timeout` (240) applies to every other test


class BrokerHandle:
    def __init__(self, bootstrap: str, log_file: Path | None, local=None) -> None:
        self.bootstrap = bootstrap
        self.log_file = log_file
        self.local = local  # the LocalBroker when the session started one (fault tests restart it)


_broker: BrokerHandle | None = None


@pytest.fixture(scope="session")
def kafka() -> Iterator[BrokerHandle]:
    global _broker
    external = os.environ.get("PERFEX_TEST_BOOTSTRAP")
    if external:
        _broker = BrokerHandle(external, None)
        yield _broker
        return
    from devtools.local_broker import LocalBroker

    data = OUTPUT / "kafka" / uuid.uuid4().hex[:8]
    broker = LocalBroker(data)
    broker.start()
    _broker = BrokerHandle(broker.bootstrap, broker.log_file, broker)
    try:
        yield _broker
    finally:
        broker.stop()


@pytest.fixture
def prefix() -> str:
    """A topic/group prefix no other test uses, so tests share the broker without interfering."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def settings(kafka: BrokerHandle, prefix: str) -> Iterator[Settings]:
    """This test's settings; its topics (every name starting with its prefix) are deleted after it,
    once the workers that used them have stopped (they are torn down first)."""
    yield Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": prefix,
        }
    )
    from tests.helpers import delete_topics

    delete_topics(kafka.bootstrap, prefix)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A slow fault test gets SLOW_TIMEOUT instead of the suite's per-test timeout, so its own
    deadlines (a broker restart, a SIGKILL and catch-up) fail with their message, not a timeout.

    Modules run heaviest first (slow and container tests, then Kafka tests): `--dist loadfile` hands modules to
    the test processes in this order, so the long ones start early and the quick ones fill the
    gaps at the end instead of one long module finishing alone."""
    _unique_node_ids(items)
    weight: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        slow = item.get_closest_marker("slow") is not None
        if slow and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
        heavy = slow or item.get_closest_marker("containers") is not None
        kafka = item.get_closest_marker("kafka") is not None
        weight[module] = weight.get(module, 0) + 10 * heavy + kafka
    # Stable: equal weights keep their collection order (every process computes the same order).
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])


def _unique_node_ids(items: list[pytest.Item]) -> None:
    """schemathesis 4.32 on pytest 9 gives every API operation's item the same node id (pytest 9
    builds it from `originalname` and a callspec; schemathesis names the operation only in `name`).
    pytest-xdist schedules by node id, so it ran one operation of the fuzz test and dropped the
    rest without a word. An item whose id is taken gets the id of its own name."""
    counts = Counter(item.nodeid for item in items)
    for item in items:
        if counts[item.nodeid] > 1 and item.name != item.nodeid.rsplit("::", 1)[-1]:
            item._id = item.parent.id.child(item.name)  # type: ignore[union-attr]  # Node's default
    seen: set[str] = set()
    for item in items:
        if item.nodeid in seen:
            raise pytest.UsageError(f"two tests share the node id {item.nodeid}")
        seen.add(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _broker is not None and _broker.log_file is not None and "kafka" in item.fixturenames:
        rep.sections.append(("Kafka broker log", f"see {_broker.log_file}"))


@pytest.fixture
def receiver():
    from tests.receiver import Receiver

    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def workers(settings: Settings):
    """Factory for worker processes on this test's prefix; all are stopped at the end."""
    from app.topics import apply
    from tests.workers import WorkerProcess

    apply(settings)
    started: list[WorkerProcess] = []

    def make(name: str = "worker", start: bool = True, **env: str) -> WorkerProcess:
        w = WorkerProcess(settings, name=name, **env)
        started.append(w)
        if start:
            w.start()
        return w

    yield make
    for w in started:
        # The test is over: a graceful stop is not what it checks, so do not wait long for one.
        w.stop(timeout=5)
