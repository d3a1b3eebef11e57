"""Real worker processes for integration tests (`perfex-webhooks worker` as a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from tests.receiver import allowed_targets

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
TOKEN = "test-admin-token-0123456789abcdefghijklmn"  # >= 32 characters: workers refuse shorter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "WEBHOOKS_TOPIC_PREFIX": settings.topic_prefix,
        "WEBHOOKS_ADMIN_TOKEN": TOKEN,
        "WEBHOOKS_DATA_DIR": str(OUTPUT / "faust-data"),
        "PYTHONUNBUFFERED": "1",
        # The circuit breaker (app/breaker.py) changes how many attempts a failing endpoint gets:
        # off in the suite's workers unless a test turns it on (tests/test_health.py), so the
        # designed loads of other tests (always-failing endpoints) keep their exact attempt counts.
        "WEBHOOKS_BREAKER_FAILURES": "0",
        "WEBHOOKS_BREAKER_FAILURE_RATE": "0",
    }
    env.update(extra)
    return env


class WorkerProcess:
    def __init__(self, settings: Settings, name: str = "worker", **env: str) -> None:
        self.settings = settings
        self.port = free_port()
        self.env = worker_env(settings, WEBHOOKS_WEB_PORT=str(self.port), **env)
        self.explicit = set(env)
        OUTPUT.mkdir(exist_ok=True)
        self.log_path = OUTPUT / f"{settings.topic_prefix}{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 90.0) -> WorkerProcess:
        log = open(self.log_path, "ab")
        # The SSRF guard stays on: only the test receivers made so far (before this start) are
        # allowed, unless the test chose WEBHOOKS_ALLOWED_TARGETS itself ("" = the plain default).
        env = dict(self.env)
        if "WEBHOOKS_ALLOWED_TARGETS" not in self.explicit:
            env["WEBHOOKS_ALLOWED_TARGETS"] = allowed_targets()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--loglevel", "info"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Ready = components up and the fan-out agent assigned partitions (Faust logs it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.get(self.base + "/ready", timeout=1)
                if r.status_code == 200 and self.assigned():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker not ready within {timeout:.0f}s; see {self.log_path}")

    def assigned(self) -> bool:
        r = httpx.get(self.base + "/ready", timeout=1)
        return bool(r.json().get("assigned", True))

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=5).text

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}", **kw.pop("headers", {})}
        return httpx.request(method, self.base + path, headers=headers, timeout=30, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
