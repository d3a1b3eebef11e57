"""Shared fixtures: one real Kafka broker per test run, a fresh topic prefix per test.

Under xdist (scripts/test) the controller starts the one broker and every test process uses it;
a run without xdist starts its own. Set PERFEX_TEST_BOOTSTRAP=host:port to run against a broker
you already have.
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
        self.local = local  # the suite's LocalBroker (None: PERFEX_TEST_BOOTSTRAP); its dir is used by
        # tests that start a broker of their own beside it


_broker: BrokerHandle | None = None
_shared = None  # the controller's LocalBroker, shared by its test processes
SHARED_DIR = "perfex_broker_dir"  # workerinput key: the shared broker's data directory
BROKER_READY_TIMEOUT = 180.0  # seconds; a deadline: a JVM start on a loaded machine


def _xdist_controller(config: pytest.Config) -> bool:
    return (
        getattr(config.option, "dist", "no") != "no"
        and bool(getattr(config.option, "tx", None))
        and not hasattr(config, "workerinput")
    )


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist the controller launches one broker for all its test processes: a broker per
    process cost each of them a JVM start (half a minute on a busy machine, before its first Kafka
    test) and kept two more JVMs busy beside the tests. The tests keep apart by their prefixes.
    launch() returns once the storage is formatted; each process waits for it to answer (kafka)."""
    global _shared
    if os.environ.get("PERFEX_TEST_BOOTSTRAP") or not _xdist_controller(config):
        return
    from devtools.local_broker import LocalBroker

    _shared = LocalBroker(OUTPUT / "kafka" / uuid.uuid4().hex[:8])
    _shared.launch()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # type: ignore[no-untyped-def]  # xdist's WorkerController
    if _shared is not None:
        node.workerinput[SHARED_DIR] = str(_shared.dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _shared is not None:
        _shared.stop()


@pytest.fixture(scope="session")
def kafka(request: pytest.FixtureRequest) -> Iterator[BrokerHandle]:
    global _broker
    external = os.environ.get("PERFEX_TEST_BOOTSTRAP")
    if external:
        _broker = BrokerHandle(external, None)
        yield _broker
        return
    from devtools.local_broker import LocalBroker

    shared = getattr(request.config, "workerinput", {}).get(SHARED_DIR)
    if shared:
        # The controller's broker (its ports are kept beside its data): wait for it, never stop it.
        broker = LocalBroker(shared)
        broker.wait_ready(BROKER_READY_TIMEOUT)
        _broker = BrokerHandle(broker.bootstrap, broker.log_file, broker)
        yield _broker
        return
    broker = LocalBroker(OUTPUT / "kafka" / uuid.uuid4().hex[:8])
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


# Seconds each module keeps its test process busy (a full `scripts/test` run on the 2-core machine,
# 2026-11-28, less what the shared broker and test_stop's light JVM saved). Only the order
# they give matters: see pytest_collection_modifyitems. A module not listed is estimated from its
# markers (SECONDS_PER_TEST).
MODULE_SECONDS = {
    "test_faults": 420,
    "test_containers": 220,
    "test_retry": 145,
    "test_privilege": 135,
    "test_dashboards": 105,
    "test_browser": 105,
    "test_failover": 80,
    "test_bench_smoke": 80,
    "test_delivery": 80,
    "test_filters_throttle": 75,
    "test_security": 65,
    "test_admin": 60,
    "test_registry_versions": 55,
    "test_ordering": 50,
    "test_poison": 50,
    "test_scale": 45,
    "test_stop": 40,
    "test_local_broker": 45,
    "test_crash": 40,
    "test_health": 40,
    "test_codecs": 35,
    "test_rotation": 35,
    "test_kafka_io": 30,
    "test_safe_default": 30,
    "test_dropin": 30,
    "test_hung": 30,
    "test_perfex": 30,
    "test_hostile": 30,
    "test_signing": 30,
    "test_topic_health": 30,
    "test_foundation": 25,
    "test_dlq_index": 20,
    "test_replication": 20,
    "test_metrics": 20,
}
SECONDS_PER_TEST = {"heavy": 40.0, "kafka": 5.0, "other": 0.1}  # the estimate of an unlisted module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A slow fault test gets SLOW_TIMEOUT instead of the suite's per-test timeout, so its own
    deadlines (a broker restart, a SIGKILL and catch-up) fail with their message, not a timeout.

    Modules run longest first (MODULE_SECONDS): `--dist loadfile --no-loadscope-reorder`
    (scripts/test) hands modules to the test processes in this order, each to the first process
    free, so the long ones start early and the quick ones fill the gaps at the end instead of one
    long module finishing alone. (xdist's own order, most tests first, put the one-test fault
    modules last.)"""
    _unique_node_ids(items)
    estimate: dict[str, float] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        slow = item.get_closest_marker("slow") is not None
        if slow and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
        if slow or item.get_closest_marker("containers") is not None:
            kind = "heavy"
        else:
            kind = "kafka" if item.get_closest_marker("kafka") is not None else "other"
        estimate[module] = estimate.get(module, 0.0) + SECONDS_PER_TEST[kind]

    def seconds(item: pytest.Item) -> float:
        module = item.nodeid.split("::")[0]
        return MODULE_SECONDS.get(Path(module).stem, estimate[module])

    # Stable: equal estimates keep their collection order (every process computes the same order).
    items.sort(key=lambda item: -seconds(item))


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
