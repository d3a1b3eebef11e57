"""A real HTTP receiver for tests: an aiohttp server in a background thread that records requests.

Each path can be given a behaviour: a callable (n-th request to that path, 1-based) -> Reply, or
with `on_body` one that also sees the request body (fail one delivery, not the n-th request).
Reply can ask for a status, extra headers, a delay, a hang (never answers), or a dropped connection.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False
    drop: bool = False
    body: bytes = b"ok"
    gate: threading.Event | None = None  # answer only once this is set (at most 60 s)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


# host:port of every receiver this test process made: the SSRF guard stays on in the suite's workers
# and CLI, with exactly these pairs allowed (WEBHOOKS_ALLOWED_TARGETS; see allowed_targets()).
_MADE: list[str] = []


def allowed_targets() -> str:
    """WEBHOOKS_ALLOWED_TARGETS for every receiver made so far in this process."""
    return ",".join(_MADE)


class Receiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host  # 0.0.0.0: reachable from containers (tests/test_containers.py)
        self.requests: list[Received] = []
        self.behaviours: dict[str, Callable[[int], Reply]] = {}
        self.body_behaviours: dict[str, Callable[[int, bytes], Reply]] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        _MADE.append(f"127.0.0.1:{self.port}")

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str, behaviour: Callable[[int], Reply]) -> None:
        self.behaviours[path] = behaviour

    def on_body(self, path: str, behaviour: Callable[[int, bytes], Reply]) -> None:
        self.body_behaviours[path] = behaviour

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 30.0) -> list[Received]:
        """Poll until at least `count` requests (2xx or not) reached `path`, or fail with what came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received(path)
            if len(got) >= count:
                return got
            time.sleep(0.02)
        got = self.received(path)
        raise AssertionError(f"expected {count} requests on {path or 'any path'}, got {len(got)}")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        with self._lock:
            n = self._counts[path] = self._counts.get(path, 0) + 1
        by_body = self.body_behaviours.get(path)
        reply = by_body(n, body) if by_body else self.behaviours.get(path, lambda _n: Reply())(n)
        with self._lock:
            self.requests.append(Received(path, dict(request.headers), body, time.time(), reply.status))
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.gate is not None:
            await asyncio.get_running_loop().run_in_executor(None, reply.gate.wait, 60)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.drop:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)

    def start(self) -> Receiver:
        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=16 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
            self._runner = runner
            self._started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="receiver")
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
