"""A real single-node Apache Kafka (KRaft broker+controller) on localhost, for development and tests.

Kafka is not on PyPI or Debian, so the jars come from Maven Central (devtools/pom.xml) into a
git-ignored cache; the second start finds them there and touches no network. Used by
`scripts/run-local` when KAFKA_BOOTSTRAP_SERVERS is unset, by the test fixtures and by `.ci/run`.

    python -m devtools.local_broker fetch                  # resolve the jars (idempotent)
    python -m devtools.local_broker start --port 9092 --dir .cache/kafka/dev   # foreground until Ctrl-C
"""

from __future__ import annotations

import argparse
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


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
    """One broker+controller process. `start()` returns once it answers a metadata request."""

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None) -> None:
        self.dir = Path(data_dir).resolve()
        # KRaft records the controller's address at format time: a restart on the same storage must
        # reuse both ports, so they are kept beside the data.
        ports = self.dir / "ports"
        if ports.exists() and (self.dir / "data" / "meta.properties").exists():
            saved = [int(x) for x in ports.read_text().split()]
            self.port, self.controller_port = (port or saved[0]), saved[1]
        else:
            self.port = port or free_port()
            self.controller_port = free_port()
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
            "node.id": "1",
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
        cfg = self.dir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_file))
        return cfg

    def _java(self, main: str, *args: str) -> list[str]:
        libs = fetch_jars()
        return [
            "java",
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0) -> LocalBroker:
        cfg = self._write_config()
        if not (self.dir / "data" / "meta.properties").exists():
            fmt = subprocess.run(
                self._java(
                    # `=`: an id may start with "-", which argparse would take for an option.
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={_cluster_id()}",
                    "-c",
                    str(cfg),
                    "--standalone",
                ),
                capture_output=True,
                text=True,
            )
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
        self.wait_ready(timeout)
        return self

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
                if md.brokers:
                    return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.2)
        raise BrokerError(f"Kafka did not answer within {timeout:.0f}s ({last}); see {self.log_file}")

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
    st = sub.add_parser("start", help="run a broker in the foreground until interrupted")
    st.add_argument("--port", type=int, default=9092)
    st.add_argument("--dir", default=str(CACHE_DIR / "dev"))
    st.add_argument("--ready-file", help="write the bootstrap address here once the broker answers")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch_jars(quiet=False))
            return 0
        broker = LocalBroker(args.dir, port=args.port)
        stop = {"now": False}

        def _on_signal(*_: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        broker.start()
        print(f"Kafka {KAFKA_VERSION} ready at {broker.bootstrap} (log: {broker.log_file})", flush=True)
        if args.ready_file:
            Path(args.ready_file).write_text(broker.bootstrap)
        try:
            while not stop["now"] and broker.proc is not None and broker.proc.poll() is None:
                time.sleep(0.5)
        finally:
            broker.stop()
        return 0
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
