"""A real Apache Kafka (KRaft) on localhost for development and tests: one node, or a 3-node cluster.

Kafka is not on PyPI or Debian, so the jars come from Maven Central (devtools/pom.xml) into a
git-ignored cache; the second start finds them there and touches no network. Used by
`scripts/run-local` when KAFKA_BOOTSTRAP_SERVERS is unset, by the test fixtures and by `.ci/run`.

- `LocalBroker`: one combined broker+controller process (the default; what the suite runs on).
- `LocalCluster`: N combined broker+controller nodes (3 by default) on free ports, a static
  controller quorum of all of them, internal topics with 3 replicas and `min.insync.replicas` 2.
  Combined nodes, not separate controllers: half the JVMs on a small machine, and killing the
  active controller then also kills a broker that leads partitions and groups, the harder case.
  `active_controller()` asks the metadata quorum (Kafka's DescribeQuorum API) for its leader;
  `kill(node_id)` is a SIGKILL; `stop()` ends every node. tests/test_failover.py uses it.

    python -m devtools.local_broker fetch                  # resolve the jars (idempotent)
    python -m devtools.local_broker start --port 9092 --dir .cache/kafka/dev   # foreground until Ctrl-C
    python -m devtools.local_broker start --nodes 3 --dir .cache/kafka/cluster # 3 nodes on free ports
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

KAFKA_VERSION = "4.0.2"
REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("PERFEX_KAFKA_CACHE", REPO_ROOT / ".cache" / "kafka"))
POM = Path(__file__).resolve().parent / "pom.xml"


# A cluster node's JVM: three of them start at once on a small shared machine, so they trade peak
# speed for CPU at start-up (C1 only: C2 compiles cost most of a node's start; one GC thread), while a
# test's few thousand records per second stay far below what they still handle. With the class
# archive (`class_archive`) a node's start took 4.2 s of CPU instead of 13.7 s with the single
# broker's options (7.3 s without the archive).
CLUSTER_JVM = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData")


class BrokerError(RuntimeError):
    pass


def libs_dir() -> Path:
    return CACHE_DIR / f"libs-{KAFKA_VERSION}"


def fetch_jars(quiet: bool = True) -> Path:
    """Resolve kafka_2.13 and its runtime dependencies into the cache; a no-op once complete."""
    target = libs_dir()
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None:
        raise BrokerError("Maven (mvn) is needed once to fetch Apache Kafka from Maven Central")
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        "mvn",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
        f"-Dkafka.version={KAFKA_VERSION}",
    ]
    if quiet:
        cmd.insert(1, "-q")
    res = subprocess.run(cmd, capture_output=quiet, text=True)
    if res.returncode != 0:
        raise BrokerError(f"mvn failed to resolve Kafka {KAFKA_VERSION}: {(res.stdout or '')[-2000:]}")
    if not any(tmp.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        raise BrokerError(f"mvn finished but kafka_2.13-{KAFKA_VERSION}.jar is missing in {tmp}")
    (tmp / ".complete").write_text(KAFKA_VERSION)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def class_archive(build: bool = True) -> Path | None:
    """A class-data-sharing archive of Kafka's classes for cluster nodes (JDK AppCDS): the JVM maps
    them instead of loading and verifying each class at every start. Built once per Kafka release
    and JVM by a one-node cluster run with -XX:ArchiveClassesAtExit (the JVM writes it on a clean
    exit), then cached; None if it cannot be built (a node then starts without it, only slower).
    A JVM that does not match the archive ignores it and says so in the node's stdout.log."""
    java = Path(shutil.which("java") or "java").resolve()
    stamp = f"{java}:{java.stat().st_mtime_ns if java.exists() else 0}"
    path = CACHE_DIR / f"classes-{KAFKA_VERSION}-{uuid.uuid5(uuid.NAMESPACE_URL, stamp).hex[:12]}.jsa"
    if path.exists() or not build:
        return path if path.exists() else None
    work = CACHE_DIR / f"classes-build-{uuid.uuid4().hex[:8]}"
    tmp = work / "classes.jsa"
    try:
        one = LocalCluster(work / "cluster", nodes=1, class_data=False)
        one.node(1).jvm_options.append(f"-XX:ArchiveClassesAtExit={tmp}")
        one.start()
        one.stop(timeout=180)  # SIGTERM: a clean exit writes the archive (slow on a busy machine)
        if tmp.exists():
            tmp.rename(path)  # atomic: two test processes building at once both end with one file
    except BrokerError:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path if path.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding (as Kafka's own
    # Uuid.randomUuid, never one that starts with "-").
    while (text := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return text


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class LocalBroker:
    """One broker+controller process. `start()` returns once it answers a metadata request.

    Alone (the default) it is its own single-voter quorum. As a node of a `LocalCluster`, it gets its
    id, both ports and the quorum's voters (`node id -> controller port`) from the cluster."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        node_id: int = 1,
        controller_port: int | None = None,
        voters: dict[int, int] | None = None,
    ) -> None:
        self.dir = Path(data_dir).resolve()
        self.node_id = node_id
        self.voters = voters  # None: a single node, formatted as a standalone quorum
        self.jvm_options = ["-Xms256m", "-Xmx768m", "-XX:+UseG1GC"] if voters is None else list(CLUSTER_JVM)
        # KRaft records the controller's address at format time: a restart on the same storage must
        # reuse both ports, so they are kept beside the data.
        ports = self.dir / "ports"
        if ports.exists() and (self.dir / "data" / "meta.properties").exists():
            saved = [int(x) for x in ports.read_text().split()]
            self.port, self.controller_port = (port or saved[0]), saved[1]
        else:
            self.port = port or free_port()
            self.controller_port = controller_port or free_port()
            self.dir.mkdir(parents=True, exist_ok=True)
            ports.write_text(f"{self.port} {self.controller_port}")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.port}"

    @property
    def log_file(self) -> Path:
        """Broker log (log4j) that a failing test points to."""
        return self.dir / "logs" / "server.log"

    def _write_config(self) -> Path:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.bootstrap.servers": f"localhost:{self.controller_port}",
            "listeners": f"PLAINTEXT://localhost:{self.port},CONTROLLER://localhost:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://localhost:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
            "num.partitions": "1",
            # Single node: every internal topic has one replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "log.cleaner.backoff.ms": "1000",
            # A restarted node re-registers only once its old session expired (default 9 s).
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
        }
        if self.voters is not None:  # a cluster's node: static voters instead of a bootstrap server
            del props["controller.quorum.bootstrap.servers"]
            props.update(_cluster_props(self.voters))
        cfg = self.dir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_file))
        return cfg

    def _java(self, main: str, *args: str) -> list[str]:
        libs = fetch_jars()
        return [
            "java",
            *self.jvm_options,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0) -> LocalBroker:
        self.launch()
        self.wait_ready(timeout)
        return self

    @property
    def formatted(self) -> bool:
        return (self.dir / "data" / "meta.properties").exists()

    def format_command(self, cluster_id: str) -> list[str]:
        """StorageTool's command that formats this node's storage (its config written first)."""
        cfg = self._write_config()
        # `=`: an id may start with "-", which argparse would take for an option.
        args = ["kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(cfg)]
        if self.voters is None:
            args.append("--standalone")  # a single-voter quorum; a cluster's voters are in the config
        return self._java(*args)

    def launch(self) -> None:
        """Format the storage if new, then start the process; returns at once (see wait_ready)."""
        cfg = self._write_config()
        if not self.formatted:
            fmt = subprocess.run(self.format_command(_cluster_id()), capture_output=True, text=True)
            if fmt.returncode != 0:
                raise BrokerError(f"kafka StorageTool format failed: {fmt.stdout}{fmt.stderr}")
        out = open(self.dir / "logs" / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            self._java("kafka.Kafka", str(cfg)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        atexit.register(self.stop)  # an interrupted test run or script leaves no JVM behind

    def wait_ready(self, timeout: float = 90.0) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0, "logger": _silent_logger()})
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"Kafka exited with {self.proc.returncode}; see {self.log_file}")
            try:
                md = admin.list_topics(timeout=2)
            except Exception as exc:  # not up yet
                last = exc
            else:
                if md.brokers:
                    # An idempotent producer's first request fails ("load in progress") until the
                    # broker has its block of producer ids: wait for it here, not in every caller.
                    asyncio.run(_producer_ids_ready(self.bootstrap, max(1.0, deadline - time.monotonic())))
                    return
            time.sleep(0.2)
        raise BrokerError(f"Kafka did not answer within {timeout:.0f}s ({last}); see {self.log_file}")

    def kill(self) -> None:
        """SIGKILL: the node dies at once, as in a crash (no controlled shutdown, nothing flushed)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean controlled shutdown), then SIGKILL; never leaves a JVM behind."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_props(voters: dict[int, int]) -> dict[str, str]:
    """A node of a cluster: a static quorum of every node, internal topics replicated like ours."""
    replicas = str(min(3, len(voters)))
    min_isr = str(max(1, min(3, len(voters)) - 1))
    return {
        "controller.quorum.voters": ",".join(f"{i}@localhost:{p}" for i, p in sorted(voters.items())),
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        # Topics made without an explicit factor (Faust's, auto-created) are replicated too.
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
    }


class LocalCluster:
    """`nodes` combined broker+controller processes (see the module docstring), on free ports.

    `start()` formats every node's storage with one cluster id and starts them all at once, and
    returns when every broker is registered. A killed node can be started again (`node(i).start()`)
    on the same storage and ports."""

    def __init__(self, data_dir: str | os.PathLike[str], nodes: int = 3, class_data: bool = True) -> None:
        self.dir = Path(data_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "ports"  # "node-id broker-port controller-port" per line, for a restart
        if saved.exists():
            rows = [tuple(int(x) for x in line.split()) for line in saved.read_text().splitlines() if line]
            ports = {i: (b, c) for i, b, c in rows}
        else:
            free = free_ports(2 * nodes)
            ports = {i: (free[2 * i - 2], free[2 * i - 1]) for i in range(1, nodes + 1)}
            saved.write_text("".join(f"{i} {b} {c}\n" for i, (b, c) in ports.items()))
        voters = {i: c for i, (_, c) in ports.items()}
        self.nodes = {
            i: LocalBroker(self.dir / f"node{i}", b, node_id=i, controller_port=c, voters=voters)
            for i, (b, c) in ports.items()
        }
        self.class_data = class_data  # start the nodes with the class archive (built if missing)

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes.values())

    def node(self, node_id: int) -> LocalBroker:
        return self.nodes[node_id]

    @property
    def log_files(self) -> list[Path]:
        return [n.log_file for n in self.nodes.values()]

    def start(self, timeout: float = 120.0) -> LocalCluster:
        atexit.register(self.stop)
        try:
            new = [n for n in self.nodes.values() if not n.formatted]
            if new:
                self._format(new)
            archive = class_archive() if self.class_data else None
            if archive is not None:
                for n in self.nodes.values():
                    if f"-XX:SharedArchiveFile={archive}" not in n.jvm_options:
                        n.jvm_options.append(f"-XX:SharedArchiveFile={archive}")
            for n in self.nodes.values():
                n.launch()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _format(self, nodes: list[LocalBroker]) -> None:
        """Format the nodes' storage with one new cluster id, without a JVM per node: with static
        voters, StorageTool writes only `meta.properties` (cluster id, node id, a directory id) and
        `bootstrap.checkpoint` (the feature levels, the same for every node of a release). The first
        format on a machine runs StorageTool and caches that checkpoint; every node after that gets
        a copy and a `meta.properties` of its own (a JVM's start costs seconds of CPU)."""
        cluster_id = _cluster_id()
        cached = CACHE_DIR / f"bootstrap-static-{KAFKA_VERSION}.checkpoint"
        if not cached.exists():
            first = nodes[0]
            fmt = subprocess.run(first.format_command(cluster_id), capture_output=True, text=True)
            if fmt.returncode != 0:
                raise BrokerError(
                    f"kafka StorageTool format of node {first.node_id} failed: {fmt.stdout}{fmt.stderr}"
                )
            tmp = cached.with_suffix(".part")
            shutil.copyfile(first.dir / "data" / "bootstrap.checkpoint", tmp)
            tmp.rename(cached)
        for n in nodes:
            if n.formatted:
                continue
            data = n.dir / "data"
            data.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, data / "bootstrap.checkpoint")
            meta = f"version=1\ncluster.id={cluster_id}\nnode.id={n.node_id}\ndirectory.id={_cluster_id()}\n"
            (data / "meta.properties").write_text(meta)

    def wait_ready(self, timeout: float = 120.0, nodes: int | None = None) -> None:
        """Until `nodes` brokers (default: every node) are registered and a controller leads."""
        from confluent_kafka.admin import AdminClient

        want = len(self.nodes) if nodes is None else nodes
        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0, "logger": _silent_logger()})
        seen = 0
        while time.monotonic() < deadline:
            for n in self.nodes.values():
                if n.proc is not None and n.proc.poll() is not None:
                    raise BrokerError(
                        f"Kafka node {n.node_id} exited with {n.proc.returncode}; see {n.log_file}"
                    )
            with contextlib.suppress(Exception):  # not up yet
                seen = len(admin.list_topics(timeout=2).brokers)
            if seen >= want:
                # Each broker gets its first block of producer ids from the controller on the first
                # idempotent producer's request (seconds, on a busy machine): before, not in a test.
                asyncio.run(_producer_ids_ready(self.bootstrap, max(1.0, deadline - time.monotonic())))
                return
            time.sleep(0.2)
        raise BrokerError(
            f"{seen} of {want} Kafka nodes registered within {timeout:.0f}s; see {self.dir}/node*/logs"
        )

    def active_controller(self, timeout: float = 30.0) -> int:
        """The node id of the active controller: the leader of the metadata quorum, as Kafka's
        DescribeQuorum API reports it (a broker forwards the request to the controllers). Not the
        "controller" of describe_cluster: in KRaft a broker names a random broker there."""
        alive = ",".join(
            n.bootstrap for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None
        )
        return asyncio.run(_quorum_leader(alive, timeout))

    def kill(self, node_id: int) -> None:
        self.nodes[node_id].kill()

    def stop(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """Stop every node that still runs: SIGTERM to all at once (a controlled shutdown), then
        SIGKILL what lingers; `graceful=False` SIGKILLs them at once (throw-away data)."""
        running = [n for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None]
        for n in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)  # type: ignore[union-attr]
        for n in running:
            n.stop(timeout)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together while they are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def _producer_ids_ready(bootstrap: str, timeout: float) -> None:
    """Until every broker hands out a producer id (InitProducerId without a transactional id, what
    an idempotent producer sends first); a broker answers "load in progress" until it has a block."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.transaction import InitProducerIdRequest

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    deadline = time.monotonic() + timeout
    try:
        await client.bootstrap()
        for broker in client.cluster.brokers():
            while True:
                with contextlib.suppress(Exception):
                    if (
                        await client.send(broker.nodeId, InitProducerIdRequest(None, 60_000))
                    ).error_code == 0:
                        break
                if time.monotonic() > deadline:
                    raise BrokerError(f"broker {broker.nodeId} gave no producer id within {timeout:.0f}s")
                await asyncio.sleep(0.2)
    finally:
        await client.close()


async def _quorum_leader(bootstrap: str, timeout: float) -> int:
    """DescribeQuorum (API 55, v0) on `__cluster_metadata` partition 0: the quorum leader's id.
    aiokafka has no call for it, but its protocol classes encode and decode the request."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.api import Request, RequestStruct, Response
    from aiokafka.protocol.types import CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields

    replica = CompactArray(("replica_id", Int32), ("log_end_offset", Int64), ("tags", TaggedFields))

    class DescribeQuorumResponse_v0(Response):
        API_KEY = 55
        API_VERSION = 0
        SCHEMA = Schema(
            ("error_code", Int16),
            (
                "topics",
                CompactArray(
                    ("topic_name", CompactString("utf-8")),
                    (
                        "partitions",
                        CompactArray(
                            ("partition_index", Int32),
                            ("error_code", Int16),
                            ("leader_id", Int32),
                            ("leader_epoch", Int32),
                            ("high_watermark", Int64),
                            ("current_voters", replica),
                            ("observers", replica),
                            ("tags", TaggedFields),
                        ),
                    ),
                    ("tags", TaggedFields),
                ),
            ),
            ("tags", TaggedFields),
        )

    class DescribeQuorumRequest_v0(RequestStruct):
        FLEXIBLE_VERSION = True
        API_KEY = 55
        API_VERSION = 0
        RESPONSE_TYPE = DescribeQuorumResponse_v0
        SCHEMA = Schema(
            (
                "topics",
                CompactArray(
                    ("topic_name", CompactString("utf-8")),
                    ("partitions", CompactArray(("partition_index", Int32), ("tags", TaggedFields))),
                    ("tags", TaggedFields),
                ),
            ),
            ("tags", TaggedFields),
        )

    class DescribeQuorumRequest(Request[DescribeQuorumRequest_v0]):
        API_KEY = 55

        def build(self, request_struct_class: type[DescribeQuorumRequest_v0]) -> DescribeQuorumRequest_v0:
            return request_struct_class([("__cluster_metadata", [(0, {})], {})], {})

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    deadline = time.monotonic() + timeout
    last: object = None
    try:
        await client.bootstrap()
        while time.monotonic() < deadline:
            for broker in client.cluster.brokers():
                try:
                    resp = await client.send(broker.nodeId, DescribeQuorumRequest())
                except Exception as exc:  # that broker is gone: ask another
                    last = exc
                    continue
                part = resp.topics[0][1][0]  # (partition_index, error_code, leader_id, ...)
                if resp.error_code == 0 and part[1] == 0 and part[2] >= 0:
                    return int(part[2])
                last = f"error {resp.error_code}/{part[1]}, leader {part[2]}"  # an election is on
            await asyncio.sleep(0.2)
    finally:
        await client.close()
    raise BrokerError(f"no metadata quorum leader within {timeout:.0f}s ({last})")


def _silent_logger():  # librdkafka logs every refused connection while the broker starts
    import logging

    log = logging.getLogger("local_broker.rdkafka")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.local_broker", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="resolve the Kafka jars from Maven Central into the cache")
    st = sub.add_parser("start", help="run a broker (or a cluster) in the foreground until interrupted")
    st.add_argument(
        "--port", type=int, default=9092, help="the single broker's port (a cluster takes free ports)"
    )
    st.add_argument("--nodes", type=int, default=1, help="3: a 3-node KRaft cluster (LocalCluster)")
    st.add_argument("--dir", default=None, help="data directory (default .cache/kafka/dev, or .../cluster)")
    st.add_argument("--ready-file", help="write the bootstrap address here once the broker answers")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch_jars(quiet=False))
            class_archive()  # a cluster's nodes start on it (about 9 s of CPU less per 3-node start)
            return 0
        kafka: LocalBroker | LocalCluster
        if args.nodes > 1:
            kafka = LocalCluster(args.dir or CACHE_DIR / "cluster", nodes=args.nodes)
            logs = f"{kafka.dir}/node*/logs/server.log"
        else:
            kafka = LocalBroker(args.dir or CACHE_DIR / "dev", port=args.port)
            logs = str(kafka.log_file)
        stop = {"now": False}

        def _on_signal(*_: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        kafka.start()
        print(f"Kafka {KAFKA_VERSION} ready at {kafka.bootstrap} (log: {logs})", flush=True)
        if isinstance(kafka, LocalCluster):
            print(f"active controller: node {kafka.active_controller()}", flush=True)
        if args.ready_file:
            Path(args.ready_file).write_text(kafka.bootstrap)
        nodes = kafka.nodes.values() if isinstance(kafka, LocalCluster) else [kafka]
        try:
            while not stop["now"] and any(n.proc is not None and n.proc.poll() is None for n in nodes):
                time.sleep(0.5)
        finally:
            kafka.stop()
        return 0
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
