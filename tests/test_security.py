"""Safe by default (SPEC §5): the SSRF guard, redirects, response-body cap, the admin token, secrets
kept out of every output, and headers that event data cannot forge.

Guard and HTTP-attempt checks run in-process against real sockets; the rest run against one real
worker (module fixture) on the session broker.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import psutil
import pytest
from aiohttp import web

from app.config import Settings
from app.delivery import Attempt, Delivery, HttpSender
from app.endpoints import Endpoint, read_endpoints
from app.events import ChangeEvent, build_event, parse_event
from app.netguard import ForbiddenTarget, GuardedResolver, check_literal_host, forbidden_reason, validate_url
from app.route import ENDPOINTS
from app.signing import generate_secret
from tests.helpers import delete_topics, settle
from tests.receiver import Receiver, Reply
from tests.workers import TOKEN, WorkerProcess, free_port

# ---- helpers ---------------------------------------------------------------------------------------


def _event(rid: str = "1", **data: Any) -> ChangeEvent:
    key, value = build_event("invoice.paid", rid, {"id": rid, **data})
    return parse_event(key.encode(), orjson.dumps(value))


def _endpoint(url: str) -> Endpoint:
    # Built directly, as if its record reached the registry without validate_url (another client, or
    # DNS that changed since registration): the connect-time guard must hold on its own.
    return Endpoint(id="ep_sec", url=url, events=("invoice.*",), mode="immediate", secret=generate_secret())


async def _attempt(url: str, allow_private: bool, timeout: float = 3.0) -> Attempt:
    sender = HttpSender(Settings(allow_private_targets=allow_private, delivery_timeout=timeout))
    await sender.start()
    try:
        ep = _endpoint(url)
        return await sender.attempt(Delivery.for_event(_event(), ep, "immediate"), ep)
    finally:
        await sender.stop()


def attempt(url: str, allow_private: bool = False, timeout: float = 3.0) -> Attempt:
    return asyncio.run(_attempt(url, allow_private, timeout))


@pytest.fixture(scope="module")
def http() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch):
    """Answer chosen names with chosen addresses (asyncio's getaddrinfo calls socket.getaddrinfo)."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, family, type, proto, flags)
        out = []
        for addr in answers[name]:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sockaddr = (addr, int(port or 0), 0, 0) if fam == socket.AF_INET6 else (addr, int(port or 0))
            out.append((fam, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


# ---- SSRF: addresses ---------------------------------------------------------------------------------
FORBIDDEN = [
    "127.0.0.1",
    "127.0.0.2",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "::127.0.0.1",  # IPv4-compatible (deprecated) form
    "fe80::1",
    "fe80::1%eth0",
    "fd00::1",
    "fec0::1",  # deprecated site-local
    "169.254.169.254",
    "::ffff:169.254.169.254",
    "fd00:ec2::254",
    "100.100.100.200",
    "0.0.0.0",
    "::",
    "100.64.0.1",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of the metadata address
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "198.18.0.1",
]
PUBLIC = ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8"]


def _url_host(addr: str) -> str:
    return f"[{addr.replace('%', '%25')}]" if ":" in addr else addr


@pytest.mark.parametrize("addr", FORBIDDEN)
def test_forbidden_addresses_refused_as_literals_and_in_urls(addr: str) -> None:
    assert forbidden_reason(addr), addr
    with pytest.raises(ForbiddenTarget):
        check_literal_host(_url_host(addr), allow_private=False)
    with pytest.raises(ValueError, match="WEBHOOKS_ALLOW_PRIVATE_TARGETS"):
        validate_url(f"http://{_url_host(addr)}:8080/hook", allow_private=False)
    check_literal_host(_url_host(addr), allow_private=True)  # the dev switch lets it through


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses_allowed(addr: str) -> None:
    assert forbidden_reason(addr) is None
    assert validate_url(f"https://{_url_host(addr)}/hook", allow_private=False)


NUMERIC_LOOPBACK = [
    "2130706433", "0x7f.1", "017700000001", "0x7f000001", "127.1", "0177.0.0.1", "0", "0x7f.0.0.1", "0177.1",
    "0xA9.0xFE.0xA9.0xFE",  # the metadata address
]


@pytest.mark.parametrize("host", NUMERIC_LOOPBACK)
def test_decimal_octal_hex_ipv4_forms_refused(host: str, http: Receiver) -> None:
    """inet_aton spellings of 127.0.0.1 / 0.0.0.0: refused at registration and never connected to."""
    with pytest.raises(ValueError, match="WEBHOOKS_ALLOW_PRIVATE_TARGETS"):
        validate_url(f"http://{host}/hook", allow_private=False)
    path = f"/numeric-{host}"
    a = attempt(f"http://{host}:{http.port}{path}")
    # netguard reads every inet_aton spelling as the address it names, before aiohttp sees the URL.
    assert a.outcome == "forbidden" and a.status is None, a
    assert http.received(path) == []


def test_hex_ipv4_form_really_reaches_loopback_without_the_guard(http: Receiver) -> None:
    """The control for the test above: aiohttp does connect to 0x7f.1 when private targets are allowed."""
    a = attempt(f"http://0x7f.1:{http.port}/hex-control", allow_private=True)
    assert a.outcome == "success" and len(http.received("/hex-control")) == 1


# ---- SSRF: DNS answers -------------------------------------------------------------------------------
def _resolve(host: str, allow_private: bool = False) -> list[Any]:
    return asyncio.run(GuardedResolver(allow_private).resolve(host, 443, family=socket.AF_UNSPEC))


@pytest.mark.parametrize(
    "answer",
    [
        ["10.1.2.3"],
        ["127.0.0.1"],
        ["169.254.169.254"],
        ["::ffff:127.0.0.1"],
        ["fd00::5"],
        ["93.184.215.14", "10.0.0.7"],
        ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::1"],
    ],
)
def test_resolver_refuses_a_name_with_any_forbidden_answer(fake_dns, answer: list[str]) -> None:
    fake_dns["hooks.example.test"] = answer
    with pytest.raises(ForbiddenTarget):
        _resolve("hooks.example.test")
    with pytest.raises(ValueError, match="resolves to"):
        validate_url("https://hooks.example.test/x", allow_private=False)
    assert _resolve("hooks.example.test", allow_private=True)


def test_resolver_hands_aiohttp_exactly_the_checked_addresses(fake_dns) -> None:
    fake_dns["hooks.example.test"] = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    got = _resolve("hooks.example.test")
    assert [r["host"] for r in got] == fake_dns["hooks.example.test"]
    # Numeric: aiohttp connects to these addresses and does not look the name up again.
    assert all(r["flags"] & socket.AI_NUMERICHOST for r in got)
    assert all(r["hostname"] == "hooks.example.test" for r in got)


def test_dns_rebinding_after_registration_is_refused_at_connect(fake_dns, http: Receiver) -> None:
    fake_dns["rebind.example.test"] = ["93.184.215.14"]
    url = f"http://rebind.example.test:{http.port}/rebind"
    assert validate_url(url, allow_private=False) == url  # public at registration time
    fake_dns["rebind.example.test"] = ["127.0.0.1"]  # ... then the name points home
    a = attempt(url)
    assert a.outcome == "forbidden" and "loopback" in (a.error or ""), a
    assert http.received("/rebind") == []
    a = attempt(f"http://localhost:{http.port}/rebind")
    assert a.outcome == "forbidden" and http.received("/rebind") == []


# ---- redirects and the response-body cap -------------------------------------------------------------
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_a_failure_and_never_followed(status: int, http: Receiver) -> None:
    path, target = f"/redirect-{status}", f"/landed-{status}"
    http.on(path, lambda n: Reply(status, headers={"Location": http.url(target)}))
    a = attempt(http.url(path), allow_private=True)
    assert a.outcome == "http_error" and a.status == status and not a.ok
    assert len(http.received(path)) == 1 and http.received(target) == []


async def _endless_body(status: int) -> tuple[Attempt, int]:
    """A receiver that streams a body that never ends; returns the attempt and bytes it got out."""
    written = 0
    finished = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal written
        await request.read()
        resp = web.StreamResponse(status=status)
        await resp.prepare(request)
        chunk = b"x" * 65536
        try:
            while written < 500 * 1024 * 1024:  # a backstop only; the client is expected to hang up
                await resp.write(chunk)
                written += len(chunk)
                await asyncio.sleep(0.002)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            finished.set()
        return resp

    app = web.Application()
    app.router.add_post("/endless", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        a = await _attempt(f"http://127.0.0.1:{port}/endless", allow_private=True, timeout=20)
        await asyncio.wait_for(finished.wait(), 20)  # the server noticed the client hung up
        return a, written
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [200, 500])
def test_response_body_is_read_only_up_to_the_cap(status: int) -> None:
    a, written = asyncio.run(_endless_body(status))
    # Reading the whole (endless) body would have ended in a timeout; the cap makes it a plain answer.
    assert a.outcome == ("success" if status == 200 else "http_error"), a
    assert a.status == status
    assert len(a.error or "") <= 220  # the logged snippet is short
    assert written < 32 * 1024 * 1024, f"the server pushed {written} bytes before the client hung up"


# ---- one real worker for the rest ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(kafka) -> Iterator[SimpleNamespace]:
    import uuid

    from app.topics import apply

    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        }
    )
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(
        settings,
        name="security",
        WEBHOOKS_RETRY_SCHEDULE=",".join(["100ms"] * 8),
        WEBHOOKS_DELIVERY_TIMEOUT="3s",
    )
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop()
        receiver.stop()
        delete_topics(settings.bootstrap_servers, settings.topic_prefix)


def add_endpoint(stack: SimpleNamespace, path: str, events: str, mode: str = "immediate", **kw: Any) -> dict:
    r = stack.worker.api(
        "POST", "/api/endpoints", json={"url": stack.receiver.url(path), "events": events, "mode": mode, **kw}
    )
    assert r.status_code == 201, r.text
    doc = r.json()
    # The registry is a topic every component follows: wait until this worker's fan-out sees it.
    deadline = time.monotonic() + 15
    while doc["id"] not in read_endpoints(stack.settings):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return doc


def produce_raw(settings: Settings, key: bytes | None, value: bytes) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": settings.bootstrap_servers, "partitioner": "murmur2_random"})
    p.produce(settings.topic("crm.events"), key=key, value=value)
    assert p.flush(15) == 0


def wait_dlq(settings: Settings, ids: set[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    from app.dlq import read_view

    deadline = time.monotonic() + timeout
    while True:
        view = read_view(settings)
        if ids <= set(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.2)


@pytest.mark.kafka
def test_worker_does_not_follow_a_302_and_parks_it_after_nine_attempts(stack) -> None:
    r = stack.receiver
    ep = add_endpoint(stack, "/w-redirect", "invoice.*")
    r.on("/w-redirect", lambda n: Reply(302, headers={"Location": r.url("/w-landed")}))
    key, value = build_event("invoice.paid", "redir", {"id": "redir"})
    produce_raw(stack.settings, key.encode(), orjson.dumps(value))
    got = r.wait_for(9, "/w-redirect", timeout=60)
    dlv = got[0].header("X-PerfexAPI-Delivery")
    view = wait_dlq(stack.settings, {dlv})
    entry = view[dlv]
    assert entry["endpoint_id"] == ep["id"] and entry["dlq_reason"] == "retries_exhausted"
    assert [a["status"] for a in entry["attempts"]] == [302] * 9
    assert r.received("/w-landed") == []


@pytest.mark.kafka
def test_worker_reads_a_50_mb_response_only_up_to_the_cap_and_stays_healthy(stack) -> None:
    r, w = stack.receiver, stack.worker
    add_endpoint(stack, "/w-huge", "invoice.*")
    huge = b"y" * (50 * 1024 * 1024)
    r.on("/w-huge", lambda n: Reply(200, body=huge))
    assert w.proc is not None
    proc = psutil.Process(w.proc.pid)
    rss_before = proc.memory_info().rss
    ids = []
    for i in range(3):
        key, value = build_event("invoice.paid", f"huge{i}", {"id": f"huge{i}"})
        produce_raw(stack.settings, key.encode(), orjson.dumps(value))
        ids.append(value["id"])
    got = r.wait_for(3, "/w-huge", timeout=60)
    assert sorted(x.json["event_id"] for x in got) == sorted(ids)
    # Each was a success at the first attempt: no retry follows (a retry would come 100 ms later).
    settle(w, accounted=lambda: len(r.received("/w-huge")) >= 3)
    assert len(r.received("/w-huge")) == 3
    assert all(x.header("X-PerfexAPI-Attempt") == "1" for x in r.received("/w-huge"))
    assert proc.memory_info().rss - rss_before < 40 * 1024 * 1024  # never held a 50 MB body
    assert httpx.get(w.base + "/health", timeout=5).status_code == 200
    assert httpx.get(w.base + "/ready", timeout=5).status_code == 200


OUR_HEADERS = {
    "content-type",
    "user-agent",
    "x-perfexapi-signature",
    "x-webhook-signature",
    "x-perfexapi-delivery",
    "x-perfexapi-event",
    "x-perfexapi-timestamp",
    "x-perfexapi-attempt",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
}
TRANSPORT_HEADERS = {"host", "content-length", "accept", "connection"}


@pytest.mark.kafka
def test_event_data_cannot_inject_headers(stack) -> None:
    r = stack.receiver
    add_endpoint(stack, "/w-inject", "invoice.*")
    evil = "x\r\nX-Injected: 1\r\n\r\nGET /pwned HTTP/1.1\r\nHost: evil"
    rid = "inj\r\nX-Rid-Injected: 1"
    doc = {
        "id": "evt_inj\r\nX-Id-Injected: 1",
        "event": "invoice.paid",
        "occurred_at": "2026-11-27T10:00:00.123Z",
        "resource_id": rid,
        "data": {"id": rid, "name": evil, "nested": {"note": "a\nb\rc"}, "list": [evil]},
        "previous": {"name": evil},
    }
    produce_raw(stack.settings, f"invoice:{rid}".encode(), orjson.dumps(doc))
    (got,) = r.wait_for(1, "/w-inject", timeout=30)
    names = {k.lower() for k in got.headers}
    assert names - TRANSPORT_HEADERS == OUR_HEADERS, names
    for k, v in got.headers.items():
        assert "injected" not in k.lower() and "injected" not in v.lower() and "\r" not in v and "\n" not in v
    assert got.header("X-PerfexAPI-Event") == "invoice.paid"
    assert (got.header("X-PerfexAPI-Delivery") or "").startswith("dlv_")
    body = got.json
    assert (
        body["event_id"] == doc["id"] and body["payload"] == doc["data"] and body["previous"] == doc["previous"]
    )
    assert b"\\r\\n" in got.body and b"\r" not in got.body and b"\n" not in got.body
    assert r.received("/pwned") == []


# ---- the admin token -------------------------------------------------------------------------------------
UNAUTHENTICATED = {"/metrics", "/health", "/ready", "/admin", "/"}  # the page is static; its data is /api


def app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the worker's web app has, sub-applications included."""
    from app.web import WebServer

    settings = Settings(admin_token=TOKEN)
    components = SimpleNamespace(ready=asyncio.Event(), faust_app=None, registry=None, outbox=None)
    server = WebServer(settings, components)

    def walk(app: web.Application, prefix: str) -> list[tuple[str, str]]:
        out = []
        for res in app.router.resources():
            sub = getattr(res, "_app", None)
            if isinstance(sub, web.Application):
                out += walk(sub, prefix + res.canonical)
                continue
            for route in res:
                if route.method != "HEAD":
                    out.append((route.method, prefix + res.canonical))
        return out

    return walk(server.app, "")


@pytest.mark.kafka
def test_every_api_route_needs_the_token(stack) -> None:
    w = stack.worker
    ep = add_endpoint(stack, "/w-auth", "lead.*")
    routes = app_routes()
    api = [(m, p) for m, p in routes if p.startswith("/api/")]
    assert len(api) >= 10, routes  # the admin API is installed
    others = {p for _m, p in routes if not p.startswith("/api/")}
    assert others <= UNAUTHENTICATED, f"new unauthenticated routes: {others - UNAUTHENTICATED}"
    bad_auth: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
        {"X-Admin-Token": TOKEN},
    ]
    body = {"url": stack.receiver.url("/evil"), "events": "*", "mode": "immediate", "grace": "0s"}
    with httpx.Client(timeout=10) as client:  # one connection for the ~250 refusals
        for method, path, headers in ((m, p, h) for m, p in api for h in bad_auth):
            url = w.base + path.replace("{id}", ep["id"])
            r = client.request(method, url, headers=headers, json=body)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer") and r.json()["error"]
            assert ep["id"] not in r.text and TOKEN not in r.text  # nothing of the resource in the refusal
    assert httpx.get(w.base + "/api/no-such-route", timeout=10).status_code == 401
    # And nothing happened: the endpoint is still there, enabled, with the secret it had.
    now = read_endpoints(stack.settings)[ep["id"]]
    assert now.enabled and now.secret == ep["secret"] and now.url == stack.receiver.url("/w-auth")
    assert w.api("GET", "/api/endpoints/" + ep["id"]).status_code == 200  # the right token works


# ---- secrets stay secret ------------------------------------------------------------------------------
def topic_dump(settings: Settings) -> dict[str, bytes]:
    """Every record (keys, values, headers) of every topic of this prefix, as bytes per topic."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": "dump", "enable.auto.commit": False}
    )
    out: dict[str, bytes] = {}
    try:
        names = [n for n in c.list_topics(timeout=10).topics if n.startswith(settings.topic_prefix)]
        for name in names:
            md = c.list_topics(name, timeout=10).topics[name]
            tps, ends = [], {}
            for p in md.partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                if hi > lo:
                    tps.append(TopicPartition(name, p, lo))
                    ends[p] = hi
            chunks: list[bytes] = []
            c.assign(tps)
            deadline = time.monotonic() + 30
            while ends and time.monotonic() < deadline:
                msg = c.poll(0.5)
                if msg is None or msg.error():
                    continue
                chunks += [msg.key() or b"", msg.value() or b""]
                chunks += [k.encode() + v for k, v in (msg.headers() or [])]
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
            assert not ends, f"could not read {name} to its end"
            c.unassign()
            out[name] = b"\n".join(chunks)
    finally:
        c.close()
    return out


@pytest.mark.kafka
def test_secrets_never_appear_in_logs_metrics_listings_or_topics(stack) -> None:
    from app.dlq import read_view

    r, w, s = stack.receiver, stack.worker, stack.settings
    ok = add_endpoint(stack, "/w-secret-ok", "contract.*")
    bad = add_endpoint(stack, "/w-secret-bad", "contract.*", mode="async")
    r.on("/w-secret-bad", lambda n: Reply(500, body=b"nope"))
    assert ok["secret"].startswith("whsec_") and bad["secret"].startswith("whsec_")
    key, value = build_event("contract.signed", "s1", {"id": "s1"})
    produce_raw(s, key.encode(), orjson.dumps(value))
    r.wait_for(1, "/w-secret-ok")
    bad_dlv = r.wait_for(9, "/w-secret-bad", timeout=60)[0].header("X-PerfexAPI-Delivery")
    assert bad_dlv in wait_dlq(s, {bad_dlv})

    rotated = w.api("POST", f"/api/endpoints/{ok['id']}/rotate-secret", json={"grace": "1h"})
    assert rotated.status_code == 200 and rotated.json()["secret"] != ok["secret"]
    new_secret = rotated.json()["secret"]
    deadline = time.monotonic() + 15
    while read_endpoints(s)[ok["id"]].secret != new_secret:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    key, value = build_event("contract.signed", "s2", {"id": "s2"})
    produce_raw(s, key.encode(), orjson.dumps(value))
    got = r.wait_for(2, "/w-secret-ok")
    assert len((got[-1].header("webhook-signature") or "").split()) == 2  # signed with both during grace
    secrets = {"old": ok["secret"], "new": new_secret, "failing": bad["secret"]}

    sinks: dict[str, str] = {}
    sinks["worker log"] = w.log_path.read_text(errors="replace")
    sinks["/metrics"] = w.metrics()
    sinks["/admin page"] = httpx.get(w.base + "/admin", timeout=10).text
    for method, path in app_routes():
        if method != "GET" or not path.startswith("/api/"):
            continue
        for pid in (ok["id"], bad["id"], bad_dlv):
            resp = w.api("GET", path.replace("{id}", pid))
            sinks[f"GET {path} ({pid})"] = resp.text
    sinks["/api/dlq history"] = w.api("GET", f"/api/dlq/{bad_dlv}").text
    dlq_entry = read_view(s)[bad_dlv]
    assert len(dlq_entry["attempts"]) == 9
    sinks["DLQ record"] = orjson.dumps(dlq_entry).decode()
    topics = topic_dump(s)
    # The control: the registry topic must hold the secrets (workers sign with them), and the dump finds them.
    registry = topics.pop(s.topic(ENDPOINTS)).decode()
    assert all(secret in registry for secret in (ok["secret"], new_secret, bad["secret"]))
    for name, raw in topics.items():
        sinks[f"topic {name}"] = raw.decode("utf-8", "replace")
    assert any(name.endswith("webhooks.attempts") for name in sinks) and sinks["worker log"]
    for label, secret in secrets.items():
        body = secret.removeprefix("whsec_")  # nor the key material without its prefix
        leaks = [name for name, text in sinks.items() if secret in text or body in text]
        assert not leaks, f"the {label} secret appears in: {leaks}"
