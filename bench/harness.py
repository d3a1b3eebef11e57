"""What every benchmark shares: a Kafka broker, a receiver process, worker processes, machine facts.

- `kafka()`: BENCH_BOOTSTRAP if set, else a fresh LocalBroker (Kafka 4.0.2) in a temp dir.
- `ReceiverProcess`: bench/receiver.py in its own process (never on the worker's event loop).
- `BenchWorker`: a real `perfex-webhooks worker` subprocess; with `profile=` it runs under
  pyinstrument through bench/profile_worker.py instead (the only profiling hook, kept in bench/).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from app import route
from app.config import Settings
from app.endpoints import Endpoint, create_endpoint
from app.producer import Producer
from app.topics import apply
from devtools.local_broker import KAFKA_VERSION, LocalBroker, free_port

REPO = Path(__file__).resolve().parent.parent
OUTPUT = Path(os.environ.get("BENCH_OUTPUT", REPO / "test-output" / "bench"))
ADMIN_TOKEN = "bench-admin-token-0123456789abcdefghijklmnop"  # the worker refuses < 32 characters


# ---- broker -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def kafka(bootstrap: str | None = None) -> Iterator[str]:
    """The bootstrap address of a broker for one bench run; a broker we start is stopped after."""
    external = bootstrap or os.environ.get("BENCH_BOOTSTRAP")
    if external:
        yield external
        return
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        broker = LocalBroker(tmp)
        broker.start()
        try:
            yield broker.bootstrap
        finally:
            broker.stop()


def new_settings(bootstrap: str, **env: str) -> Settings:
    """Settings on a topic prefix of its own, topics applied (so runs never see each other)."""
    s = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:8]}.",
            "WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true",
            **env,
        }
    )
    apply(s)
    return s


# ---- receiver -----------------------------------------------------------------------------------------
class ReceiverProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(timeout=60)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self, timeout: float = 30.0) -> ReceiverProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.receiver", "--port", str(self.port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                self.count("/")
                return self
            time.sleep(0.05)
        raise RuntimeError("receiver did not start")

    def count(self, path: str) -> int:
        return int(self._http.get(self.url("/_count"), params={"path": path}).text)

    def stats(self, path: str) -> dict[str, Any]:
        return orjson.loads(self._http.get(self.url("/_stats"), params={"path": path}).content)

    def sample(self, path: str) -> dict[str, Any]:
        return orjson.loads(self._http.get(self.url("/_sample"), params={"path": path}).content)

    def wait_for(self, count: int, path: str, timeout: float, quiet_after: float = 0.0) -> int:
        """Poll until `count` requests reached `path` (then `quiet_after` s more with none extra)."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n = self.count(path)
            if n >= count:
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"{path}: {n} of {count} requests within {timeout:.0f}s")
        if quiet_after:
            time.sleep(quiet_after)  # duplicates or extra deliveries would show up here
            n = self.count(path)
        return n

    def stop(self) -> None:
        self._http.close()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def __enter__(self) -> ReceiverProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- where the CPU went during a stage ------------------------------------------------------------------
def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each kind of thread of one process (Linux /proc): the main thread (the event
    loop), librdkafka's threads (`rdk:*`, all together) and the other threads (Faust's consumer
    thread, the delivery agent's polling thread, asyncio's helpers)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"main": 0.0, "librdkafka": 0.0, "other threads": 0.0}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as f:
                    stat = f.read()
            except OSError:
                continue  # the thread ended
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            kind = "main" if int(tid) == pid else "librdkafka" if comm.startswith("rdk:") else "other threads"
            out[kind] += cpu
    return out


class CpuShare:
    """Cores used by the worker (per kind of thread), the receiver and the whole machine between
    `start()` and `stop()`: says whether a worker below one core waited for a core (the machine
    was busy) or for something else (its receiver, the broker, its own limits)."""

    def __init__(self, worker_pid: int, receiver_pid: int | None) -> None:
        self.pids = {"worker": worker_pid, "receiver": receiver_pid}

    def _read(self) -> dict[str, Any]:
        import psutil

        snap: dict[str, Any] = {"t": time.monotonic(), "machine": psutil.cpu_times()}
        snap["threads"] = thread_cpu(self.pids["worker"])
        rx = self.pids["receiver"]
        if rx is not None:
            with contextlib.suppress(psutil.Error):
                c = psutil.Process(rx).cpu_times()
                snap["receiver"] = c.user + c.system
        return snap

    def start(self) -> None:
        self._a = self._read()

    def stop(self) -> dict[str, float]:
        a, b = self._a, self._read()
        wall = max(1e-9, b["t"] - a["t"])
        ma, mb = a["machine"], b["machine"]
        idle = (mb.idle + getattr(mb, "iowait", 0)) - (ma.idle + getattr(ma, "iowait", 0))
        total = sum(mb) - sum(ma)
        out = {f"worker_{k.replace(' ', '_')}_cores": round((b["threads"][k] - a["threads"][k]) / wall, 2) for k in b["threads"]}
        if "receiver" in a and "receiver" in b:
            out["receiver_cores"] = round((b["receiver"] - a["receiver"]) / wall, 2)
        out["machine_busy_cores"] = round((os.cpu_count() or 1) * (total - idle) / max(1e-9, total), 2)
        return out


# ---- worker -------------------------------------------------------------------------------------------
class BenchWorker:
    """One `perfex-webhooks worker` process on the bench's prefix (a temp Faust data dir)."""

    def __init__(
        self,
        settings: Settings,
        name: str = "worker",
        profile: str | None = None,
        loglevel: str = "info",  # the CLI's default, so the bench runs what operators run
        **env: str,
    ):
        self.settings = settings
        self.port = free_port()
        self._data = tempfile.TemporaryDirectory(prefix="bench-faust-")
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "WEBHOOKS_TOPIC_PREFIX": settings.topic_prefix,
            "WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true",
            "WEBHOOKS_ADMIN_TOKEN": ADMIN_TOKEN,
            "WEBHOOKS_WEB_PORT": str(self.port),
            "WEBHOOKS_DATA_DIR": self._data.name,
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.profile = profile
        self.loglevel = loglevel
        if profile:
            self.env["PERFEX_BENCH_PROFILE"] = profile
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUTPUT / f"{settings.topic_prefix}{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> BenchWorker:
        module = "bench.profile_worker" if self.profile else "app.cli"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "worker", "--loglevel", self.loglevel],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=1)
                if r.status_code == 200 and r.json().get("assigned"):
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready within {timeout:.0f}s; see {self.log_path}")

    def spy(self, out: str) -> subprocess.Popen[bytes]:
        """py-spy (if installed: `pip install py-spy`) sampling every thread of the worker into `out`
        (collapsed stacks). Unlike pyinstrument it also sees Faust's consumer thread. Stop it
        with SIGINT; `python -m bench.spy_report FILE` summarises it."""
        exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        return subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--format", "raw", "-o", out, "--threads",
             "--rate", "250", "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._data.cleanup()

    def __enter__(self) -> BenchWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- data ---------------------------------------------------------------------------------------------
def register(
    settings: Settings, url: str, events: str, mode: str, producer: Producer | None = None
) -> Endpoint:
    """An endpoint record on the registry topic, as `perfex-webhooks endpoints add` writes it."""
    ep = create_endpoint(settings, url=url, events=events, mode=mode)
    if producer is None:
        with Producer(settings) as p:
            p.send(route.ENDPOINTS, ep.id, ep.record())
    else:
        producer.send(route.ENDPOINTS, ep.id, ep.record())
    return ep


def invoice(i: int, version: int = 0) -> dict[str, Any]:
    """A Perfex-like invoice (every value a string or null, ~1.1 kB as JSON)."""
    return {
        "id": str(i),
        "sent": "1",
        "datesend": "2026-11-27 10:00:00",
        "clientid": str(1000 + i % 97),
        "deleted_customer_name": None,
        "number": str(i),
        "prefix": "INV-",
        "number_format": "1",
        "datecreated": "2026-11-27 09:58:12",
        "date": "2026-11-27",
        "duedate": "2026-12-27",
        "currency": "1",
        "subtotal": "18.00",
        "total_tax": "3.80",
        "total": "21.80",
        "adjustment": "0.00",
        "addedfrom": "1",
        "hash": f"{i:032x}",
        "status": str(1 + version % 4),
        "clientnote": "Thank you for your business / Vielen Dank für Ihren Auftrag",
        "adminnote": "",
        "last_overdue_reminder": None,
        "cancel_overdue_reminders": "0",
        "allowed_payment_modes": 'a:1:{i:0;s:1:"1";}',
        "token": None,
        "discount_percent": "0.00",
        "discount_total": "0.00",
        "discount_type": "",
        "recurring": "0",
        "recurring_type": None,
        "custom_recurring": "0",
        "cycles": "0",
        "total_cycles": "0",
        "is_recurring_from": None,
        "last_recurring_date": None,
        "terms": "Payment within 30 days.",
        "sale_agent": "0",
        "billing_street": "Bahnhofstrasse 1",
        "billing_city": "Zürich",
        "billing_state": "ZH",
        "billing_zip": "8001",
        "billing_country": "204",
        "include_shipping": "0",
        "show_shipping_on_invoice": "1",
        "show_quantity_as": "1",
        "project_id": "0",
        "subscription_id": "0",
        "short_link": None,
        "version": str(version),
    }


# ---- reporting ----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "memory_gib": mem_gib,
        "cpu": cpu,
        "python": platform.python_version(),
        "kafka": f"Apache Kafka {KAFKA_VERSION}, local single node"
        + (" (BENCH_BOOTSTRAP)" if os.environ.get("BENCH_BOOTSTRAP") else ""),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": _git("rev-parse", "--short", "HEAD")
        + ("+dirty" if _git("status", "--porcelain", "app") else ""),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def save(name: str, result: dict[str, Any]) -> Path:
    """Write the result as JSON under test-output/bench/ (or BENCH_OUTPUT) and return the path."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    # Other work on the machine moves the numbers: keep the load seen at the end beside the start's.
    result.setdefault("machine", {})["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = OUTPUT / f"{name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return path


def print_result(title: str, result: dict[str, Any], keys: list[str]) -> None:
    print(f"== {title}")
    m = result.get("machine", {})
    print(
        f"   {m.get('date')} | nproc={m.get('nproc')} mem={m.get('memory_gib')}GiB cpu={m.get('cpu')} "
        f"| {m.get('kafka')} | load={m.get('load_avg_at_start')}->{m.get('load_avg_at_end')} "
        f"| commit {m.get('commit')}"
    )
    for k in keys:
        print(f"   {k}: {result.get(k)}")
