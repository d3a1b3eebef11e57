"""Helpers shared by the test modules: registering endpoints, polling with a deadline, the CLI, and
reading Prometheus metrics. Test modules import from here, never from each other."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from app import route
from app.config import Settings
from app.endpoints import Endpoint, create_endpoint
from app.netguard import parse_allowed_targets
from app.producer import Producer
from devtools.local_broker import CLUSTER_JVM, LocalBroker, class_archive
from tests.receiver import Receiver, Reply, allowed_targets
from tests.workers import WorkerProcess

Samples = list[tuple[str, dict[str, str], float]]


def register(settings: Settings, receiver: Receiver, path: str, events: str, mode: str, **kw: Any) -> Endpoint:
    """An endpoint on the test receiver, written to the registry topic the way the CLI writes it
    (`kw`: more of create_endpoint's fields, e.g. ordering="resource")."""
    ep = create_endpoint(with_receivers(settings), url=receiver.url(path), events=events, mode=mode, **kw)
    with Producer(settings) as p:
        p.send(route.ENDPOINTS, ep.id, ep.record())
    return ep


@contextmanager
def shared_stack(bootstrap: str, name: str, **env: str) -> Iterator[SimpleNamespace]:
    """A module's shared stack: its own topic prefix (topics applied), one receiver and one worker
    started with `env`; torn down (worker stopped, topics deleted) at the end. Tests on it keep
    apart by their own endpoints, paths and resource ids (register_known)."""
    from app.topics import apply

    settings = Settings.from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}."}
    )
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(settings, name=name, **env)
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop(timeout=5)  # a graceful stop is not what the tests check
        receiver.stop()
        delete_topics(bootstrap, settings.topic_prefix)


def register_known(
    stack: SimpleNamespace, path: str, events: str, mode: str, timeout: float = 30.0, **kw: Any
) -> Endpoint:
    """register() on a running worker, returned once that worker's registry has the endpoint (its
    API reads the same registry view the fan-out matches events against), so the test's first
    event already finds it."""
    ep = register(stack.settings, stack.receiver, path, events, mode, **kw)
    eventually(
        lambda: stack.worker.api("GET", f"/api/endpoints/{ep.id}").status_code == 200,
        timeout,
        f"the worker knows endpoint {ep.id}",
    )
    return ep


def with_receivers(settings: Settings) -> Settings:
    """settings whose SSRF guard also lets through the test receivers made so far."""
    return replace(settings, allowed_targets=settings.allowed_targets | parse_allowed_targets(allowed_targets()))


def private_broker(data_dir: Path) -> LocalBroker:
    """A broker of a test's own, beside the suite's, for a test that stops or kills it for good.
    It runs with a cluster node's JVM (CLUSTER_JVM: C1 only, one GC thread, the class archive when
    one is built): its start costs a third of the CPU of the suite broker's, on a machine the other
    test processes share, and a test's few thousand records a second need no more. Not for the
    broker-restart test (tests/test_faults.py): with it, under a loaded full run, the worker's
    delivery consumer once never rejoined its group after the restart; that test keeps the
    broker's own JVM, as it was written and measured with."""
    broker = LocalBroker(data_dir)
    broker.jvm_options = list(CLUSTER_JVM)
    archive = class_archive(build=False)  # building one takes minutes: only if there is one
    if archive is not None:
        broker.jvm_options.append(f"-XX:SharedArchiveFile={archive}")
    return broker


# ---- tools the suite needs: never a silent skip in CI ---------------------------------------------
INSTALL = {  # the command that installs each tool (scripts/bootstrap runs it on a fresh machine)
    "node": "apt-get install nodejs",
    "chromium": "apt-get install chromium",
    "prometheus": "apt-get install prometheus",
    "promtool": "apt-get install prometheus",
    "php": "apt-get install php-cli",
    "podman": "apt-get install podman",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(what: str) -> None:
    """A test cannot run here: under CI=true that fails the run; locally it is a skip that says how
    to get what is missing."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: what a test needs must be there)", pytrace=False)
    pytest.skip(what)


def require_tool(name: str) -> str:
    """The path of `name` found the way scripts/bootstrap looks for it (`command -v`), or see missing()."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not on PATH; install it with `{INSTALL[name]}` (or run scripts/bootstrap)")
    assert path is not None
    return path


def eventually(fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll fn until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s (last: {last!r})")


def cli(settings: Settings, *args: str, **extra: str | None) -> Result:
    """Run `perfex-webhooks ARGS` in-process against this test's broker and topic prefix."""
    from app.cli import main

    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "WEBHOOKS_TOPIC_PREFIX": settings.topic_prefix,
        "WEBHOOKS_ALLOWED_TARGETS": allowed_targets(),  # the guard stays on; the test receivers pass
        **extra,
    }
    return CliRunner().invoke(main, ["--env-file", "/nonexistent", *args], env=env)


def cli_json(settings: Settings, *args: str) -> Any:
    res = cli(settings, *args, "--json")
    assert res.exit_code == 0, res.output
    return orjson.loads(res.output)


def parse_metrics(text: str) -> Samples:
    """(sample name, labels, value) of every sample in a Prometheus text exposition."""
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of samples named `name` whose labels include `labels` (None if there is none)."""
    hits = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(hits) if hits else None


def metric(text: str, name: str, **labels: str) -> float:
    """Like metric_value on a scrape's text, with 0 for a series that does not exist (yet)."""
    return metric_value(parse_metrics(text), name, **labels) or 0.0


def read_all(settings: Settings, topic: str, expect: int, timeout: float = 20.0) -> list:
    """Every record of `topic`: wait (up to `timeout`) until at least `expect` arrived, then read on
    to the end offsets of every partition, so a count of "exactly N" also sees an N+1st record."""
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "reader-" + settings.topic_prefix,
            "enable.auto.commit": False,
        }
    )
    name = settings.topic(topic)
    try:
        parts = c.list_topics(name, timeout=10).topics[name].partitions
        c.assign([TopicPartition(name, p, 0) for p in parts])
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < expect and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
        # The end as of now (after the expected records): read up to it on every partition.
        ends = {p: c.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in parts}
        seen = {p: -1 for p in parts}
        for m in out:
            seen[m.partition()] = max(seen[m.partition()], m.offset())
        end_deadline = time.monotonic() + 30
        while any(seen[p] + 1 < ends[p] for p in parts):
            assert time.monotonic() < end_deadline, f"{name}: could not read to the end {ends}"
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
                seen[msg.partition()] = max(seen[msg.partition()], msg.offset())
        return out
    finally:
        c.close()


def delete_topics(bootstrap: str, prefix: str, timeout: float = 15.0) -> list[str]:
    """Delete every topic whose name starts with `prefix` (a test's own topics, Faust's included);
    returns their names. Tests share one broker: without this a session leaves thousands of
    partitions behind, and every later metadata request pays for them."""
    from confluent_kafka.admin import AdminClient

    assert prefix, "an empty prefix would delete every topic"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=timeout).topics if t.startswith(prefix)]
    if names:
        for f in admin.delete_topics(names, operation_timeout=timeout).values():
            f.result(timeout)
    return names


# ---- strict negatives: "nothing else arrives" -------------------------------------------------------
def pipeline_idle(worker: WorkerProcess) -> str | None:
    """None if the worker has nothing left to do (every webhooks_consumer_lag series 0, no HTTP
    request in flight, no smart item pending); else what is still busy."""
    samples = parse_metrics(worker.metrics())
    busy = [f"lag {lab.get('topic')}={v:g}" for n, lab, v in samples if n == "webhooks_consumer_lag" and v]
    if not any(n == "webhooks_consumer_lag" for n, _, _ in samples):
        busy.append("no webhooks_consumer_lag reported yet")
    for name in ("webhooks_in_flight_requests", "webhooks_smart_pending"):
        if metric_value(samples, name):
            busy.append(f"{name}={metric_value(samples, name):g}")
    return "; ".join(busy) or None


def settle_period(worker: WorkerProcess) -> float:
    """How long "nothing else arrives" waits once the pipeline looks idle, from the worker's
    configuration: anything still to do shows within one refresh of the signs pipeline_idle reads
    (consumer lag every LAG_INTERVAL; smart items pending every smart tick, app/worker.py), so two
    refreshes of each: a record just moved into a tier or a smart item just due is seen."""
    from app.observe import LAG_INTERVAL

    cfg = Settings.from_env(worker.env)
    smart_tick = max(0.02, min(0.25, cfg.smart_window / 10))
    return 2 * LAG_INTERVAL + 2 * smart_tick


def settle(
    *workers: WorkerProcess, accounted: Callable[[], Any] = lambda: True, timeout: float = 60.0
) -> None:
    """Before counting what (did not) arrive: the positive sign that the pipeline is done.

    1. `accounted()` is truthy: the receiver, attempt log or DLQ show where each record went;
    2. every worker is idle (pipeline_idle: lag 0 on every consumed topic, nothing in flight/pending);
    3. after the settle period, 1 and 2 still hold, so a late retry or duplicate had its chance.
    """
    deadline = time.monotonic() + timeout

    def done() -> bool:
        return bool(accounted()) and all(pipeline_idle(w) is None for w in workers)

    for round_ in range(2):
        while not done():
            if time.monotonic() > deadline:
                busy = {w.log_path.name: pipeline_idle(w) for w in workers}
                raise AssertionError(f"pipeline not settled within {timeout:.0f}s: {busy}")
            time.sleep(0.2)
        if round_ == 0:
            time.sleep(max(settle_period(w) for w in workers))  # the settle period itself


@dataclass
class Load:
    endpoints: dict[str, Endpoint]  # role -> endpoint
    resource_ids: list[str]  # unique per run: none may show up in a label
    events: int  # valid events produced
    invalid: int  # bad records produced


def register_load_endpoints(
    settings: Settings, receiver: Receiver, fail: str = "async"
) -> dict[str, Endpoint]:
    """One endpoint per mode that succeeds, one that always fails (HTTP 500) and one that says 410."""
    receiver.on("/fail", lambda n: Reply(500, body=b"down"))
    receiver.on("/gone", lambda n: Reply(410, body=b"gone"))
    return {
        "immediate": register(settings, receiver, "/immediate", "invoice.*,lead.*", "immediate"),
        "async": register(settings, receiver, "/async", "invoice.*,lead.*", "async"),
        "smart": register(settings, receiver, "/smart", "invoice.*", "smart"),
        "fail": register(settings, receiver, "/fail", "lead.created", fail),
        "gone": register(settings, receiver, "/gone", "lead.deleted", "immediate"),
    }


def produce_load(settings: Settings, endpoints: dict[str, Endpoint], rounds: int = 4) -> Load:
    """Smart bursts on 3 invoices (12 events), 3 leads for the failing endpoint, 1 event for the 410
    endpoint, and two bad records."""
    tag = uuid.uuid4().hex[:6]
    invoices = [f"inv{tag}{i}" for i in range(3)]
    leads = [f"lead{tag}{i}" for i in range(3)]
    n = 0
    with Producer(settings) as p:
        for r in range(rounds):
            for rid in invoices:
                p.emit(
                    "invoice.updated", rid, {"id": rid, "total": f"{r}.50", "url": "https://crm.example/x"}
                )
                n += 1
        for rid in leads:
            p.emit("lead.created", rid, {"id": rid, "name": "Ada"})
            n += 1
        p.emit("lead.deleted", leads[0], {"id": leads[0]})  # to the endpoint that answers 410
        n += 1
        p.send(route.EVENTS, f"invoice:{invoices[0]}", b"{not json")
        p.send(route.EVENTS, f"invoice:{invoices[1]}", {"id": "evt_x", "event": "no.such_event"})
    return Load(endpoints, invoices + leads, n, 2)


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """partition -> end offset (high watermark) of one logical topic."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "probe-" + uuid.uuid4().hex})
    try:
        name = settings.topic(topic)
        parts = c.list_topics(name, timeout=10).topics[name].partitions
        deadline = time.monotonic() + 30
        while True:
            try:  # a topic just created may not have its leaders yet
                return {p: c.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in parts}
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        c.close()


def committed_offsets(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """partition -> offset `group` committed on one logical topic (-1001: nothing yet)."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})
    try:
        name = settings.topic(topic)
        parts = c.list_topics(name, timeout=10).topics[name].partitions
        return {tp.partition: tp.offset for tp in c.committed([TopicPartition(name, p) for p in parts], 10)}
    finally:
        c.close()


def read_to_end(settings: Settings, topic: str, timeout: float = 30.0) -> list:
    """Every record of one logical topic, up to its end offsets when called."""
    ends = {p: e for p, e in end_offsets(settings, topic).items() if e > 0}
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "reader-" + uuid.uuid4().hex,
            "enable.auto.commit": False,
        }
    )
    name = settings.topic(topic)
    c.assign([TopicPartition(name, p, 0) for p in ends])
    out: list = []
    seen = dict.fromkeys(ends, -1)
    deadline = time.monotonic() + timeout
    try:
        while any(seen[p] < e - 1 for p, e in ends.items()):
            assert time.monotonic() < deadline, f"{topic} not read to its end within {timeout:.0f}s"
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None and msg.offset() < ends[msg.partition()]:
                out.append(msg)
                seen[msg.partition()] = msg.offset()
    finally:
        c.close()
    return out
