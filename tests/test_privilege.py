"""Least privilege and safe defaults (issue 14), against real workers on the session broker:

- strong tokens only (a weak or placeholder token stops every serving command at start);
- scoped tokens (admin / read / ingest), 401 vs 403, `X-API-KEY`, the ingest rate limit;
- insecure mode stays local (loopback bind, JSON-only writes, own Origin, loopback Host);
- endpoint secrets encrypted at rest with WEBHOOKS_SECRETS_KEY, re-encrypted with a new key;
- every inet_aton spelling of a forbidden address refused at registration and at delivery;
- /metrics behind WEBHOOKS_METRICS_TOKEN, and the series of deleted endpoints removed.

Two workers serve the module: `keyed` (every token, a secrets key, a small ingest bucket, private
targets allowed for the test receiver) and `local` (insecure mode, no key, the SSRF guard on).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import psutil
import pytest
import schemathesis
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hsettings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.endpoints import Endpoint, read_endpoints
from app.producer import Producer
from app.route import ENDPOINTS as ENDPOINTS_TOPIC
from app.signing import generate_secret
from app.topics import apply
from tests.helpers import cli, eventually, metric_value, parse_metrics
from tests.receiver import Receiver
from tests.workers import TOKEN, WorkerProcess

pytestmark = pytest.mark.kafka

INGEST = "ingest-token-" + "i" * 32
READ = "read-token-" + "r" * 32
METRICS = "metrics-token-" + "m" * 32
KEY1 = Fernet.generate_key().decode()
KEY2 = Fernet.generate_key().decode()
BURST = 6


@pytest.fixture(scope="module")
def stack(kafka) -> Iterator[SimpleNamespace]:
    import uuid

    keyed_settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
            "WEBHOOKS_SECRETS_KEY": KEY1,
        }
    )
    local_settings = Settings.from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}."}
    )
    apply(keyed_settings)
    apply(local_settings)
    receiver = Receiver().start()
    keyed = WorkerProcess(
        keyed_settings,
        name="privilege-keyed",
        WEBHOOKS_INGEST_TOKEN=INGEST,
        WEBHOOKS_READ_TOKEN=READ,
        WEBHOOKS_METRICS_TOKEN=METRICS,
        WEBHOOKS_SECRETS_KEY=KEY1,
        WEBHOOKS_INGEST_RATE="0.25",
        WEBHOOKS_INGEST_BURST=str(BURST),
    )
    local = WorkerProcess(
        local_settings,
        name="privilege-local",
        WEBHOOKS_ADMIN_TOKEN="",
        WEBHOOKS_ADMIN_INSECURE="true",
        WEBHOOKS_ALLOW_PRIVATE_TARGETS="false",
        WEBHOOKS_ALLOWED_TARGETS="",  # the plain default: not even the test receiver
        WEBHOOKS_RETRY_SCHEDULE=",".join(["30s"] * 8),
    )
    try:
        keyed.start(wait=False)
        local.start(wait=False)
        # A deadline, not a timing: a fresh session broker on a loaded machine may take a minute to
        # offer a group coordinator.
        keyed.wait_ready(timeout=180)
        local.wait_ready(timeout=180)
        yield SimpleNamespace(keyed=keyed, local=local, receiver=receiver, settings=keyed_settings)
    finally:
        stops = [threading.Thread(target=w.stop, kwargs={"timeout": 5}) for w in (keyed, local)]
        for t in stops:
            t.start()
        for t in stops:
            t.join()
        receiver.stop()


def call(w: WorkerProcess, method: str, path: str, token: str | None, header: str = "bearer", **kw):
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        if header == "bearer":
            headers["Authorization"] = f"Bearer {token}"
        else:
            headers["X-API-KEY"] = token
    return httpx.request(method, w.base + path, headers=headers, timeout=30, **kw)


# ---- 1. strong tokens only ------------------------------------------------------------------------
def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKS_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "--env-file", "/nonexistent", "worker"],
        env={**base, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"WEBHOOKS_ADMIN_TOKEN": "short"}, "WEBHOOKS_ADMIN_TOKEN"),
        ({"WEBHOOKS_ADMIN_TOKEN": "change-me-to-a-long-random-token"}, "WEBHOOKS_ADMIN_TOKEN"),
        ({"WEBHOOKS_ADMIN_TOKEN": TOKEN, "WEBHOOKS_INGEST_TOKEN": "crm"}, "WEBHOOKS_INGEST_TOKEN"),
        ({"WEBHOOKS_ADMIN_TOKEN": TOKEN, "WEBHOOKS_METRICS_TOKEN": "prom"}, "WEBHOOKS_METRICS_TOKEN"),
        ({"WEBHOOKS_ADMIN_INSECURE": "true", "WEBHOOKS_WEB_HOST": "0.0.0.0"}, "WEBHOOKS_WEB_HOST"),
        ({"WEBHOOKS_ADMIN_TOKEN": TOKEN, "WEBHOOKS_SECRETS_KEY": "not-a-key"}, "WEBHOOKS_SECRETS_KEY"),
    ],
)
def test_worker_refuses_weak_tokens_and_unsafe_settings_in_one_line(env: dict[str, str], variable: str) -> None:
    res = serve(env)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0, res.stderr
    assert len(lines) == 1 and variable in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for secret in ("short", "not-a-key", "prom", "crm"):
        assert f"'{secret}'" not in res.stderr  # the refusal never echoes the value


# ---- 2. scoped tokens ---------------------------------------------------------------------------
def test_ingest_token_may_only_post_events_and_read_token_only_read(stack) -> None:
    w, rx = stack.keyed, stack.receiver
    created = call(
        w, "POST", "/api/endpoints", TOKEN, header="x-api-key",
        json={"url": rx.url("/scoped"), "events": "lead.*"},
    )
    assert created.status_code == 201, created.text  # X-API-KEY carries the admin token too
    ep_id = created.json()["id"]
    event = {"event": "lead.created", "resource_id": "s1", "data": {"id": "s1"}}

    assert call(w, "POST", "/api/events", INGEST, json=event).status_code == 202
    assert call(w, "POST", "/api/events", INGEST, header="x-api-key", json=event).status_code == 202
    assert call(w, "POST", "/api/events", READ, json=event).status_code == 403
    writes = [
        ("POST", "/api/endpoints", {"url": rx.url("/evil"), "events": "*"}),
        ("PATCH", f"/api/endpoints/{ep_id}", {"url": rx.url("/evil")}),
        ("DELETE", f"/api/endpoints/{ep_id}", None),
        ("POST", f"/api/endpoints/{ep_id}/disable", {}),
        ("POST", f"/api/endpoints/{ep_id}/rotate-secret", {"grace": "0s"}),
        ("POST", "/api/dlq/replay", {}),
    ]
    for token in (INGEST, READ):
        for method, path, body in writes:
            r = call(w, method, path, token, json=body)
            assert r.status_code == 403, (token[:6], method, path, r.status_code, r.text)
    for path in ("/api/endpoints", f"/api/endpoints/{ep_id}", "/api/dlq", "/api/attempts", "/api/catalog"):
        assert call(w, "GET", path, INGEST).status_code == 403, path
        assert call(w, "GET", path, READ).status_code == 200, path
    # Any known token may ask its own scope (the page shows write controls to admin only).
    for token, scope in ((TOKEN, "admin"), (READ, "read"), (INGEST, "ingest")):
        assert call(w, "GET", "/api/whoami", token).json() == {"scope": scope, "insecure": False}
    assert call(w, "GET", "/api/whoami", "x" * 40).status_code == 401
    for token in ("x" * 40, INGEST + "x", READ[:-1], ""):
        r = call(w, "GET", "/api/endpoints", token or None)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert call(w, "POST", "/api/events", token or None, json=event).status_code == 401
    # Nothing the refused calls asked for happened.
    now = call(w, "GET", f"/api/endpoints/{ep_id}", READ).json()
    assert now["enabled"] and now["url"] == rx.url("/scoped") and not now["grace_secret_active"]
    assert [e["id"] for e in call(w, "GET", "/api/endpoints", READ).json()["endpoints"]].count(ep_id) == 1
    assert eventually(lambda: len(rx.received("/scoped")) == 2, what="both ingested events delivered")


def test_ingest_is_rate_limited_per_token_with_retry_after(stack) -> None:
    w = stack.keyed
    event = {"event": "task.created", "resource_id": "r1", "data": {"id": "r1"}}
    started, statuses = time.monotonic(), []
    for _ in range(BURST + 20):
        limited = call(w, "POST", "/api/events", TOKEN, json=event)
        statuses.append(limited.status_code)
        if limited.status_code != 202:
            break
    elapsed = time.monotonic() - started
    # A bucket of BURST refilled at 0.25/s: the whole burst is taken, then at most what refilled
    # while the requests ran (each waits for Kafka's ack: seconds on a loaded machine), then 429.
    assert statuses[-1] == 429 and set(statuses[:-1]) == {202}, statuses
    assert BURST <= len(statuses) - 1 <= BURST + int(elapsed * 0.25) + 1, (statuses, elapsed)
    assert 1 <= int(limited.headers["Retry-After"]) <= 4 and "rate limit" in limited.json()["error"]
    # Per token: the admin token's empty bucket does not hold the ingest token back, and reads are free.
    assert call(w, "GET", "/api/endpoints", TOKEN).status_code == 200
    assert call(w, "POST", "/api/events", INGEST, json=event).status_code == 202


# ---- 3. insecure mode stays local --------------------------------------------------------------------
def non_loopback_ipv4() -> str:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    raise AssertionError("this machine has no non-loopback IPv4 address to test the bind against")


def test_insecure_mode_is_local_json_only_and_same_origin(stack) -> None:
    w = stack.local
    # A public IP literal: no DNS needed; no event of the module is a task.* one.
    body = orjson.dumps({"url": "https://93.184.215.14/hook", "events": "task.*"})
    own = {"Content-Type": "application/json"}
    r = httpx.post(w.base + "/api/endpoints", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    for ctype in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert httpx.post(w.base + "/api/endpoints", content=body, headers={"Content-Type": ctype}).status_code == 415
    foreign = [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{w.port + 1}"},
        {"Referer": "https://evil.example/page"},
    ]
    for extra in foreign:
        r = httpx.post(w.base + "/api/endpoints", content=body, headers={**own, **extra})
        assert r.status_code == 403, (extra, r.text)
        assert httpx.get(w.base + "/api/endpoints", headers=extra).status_code == 403
    # DNS rebinding: the attacker's page reaches 127.0.0.1 under its own name.
    assert httpx.get(w.base + "/api/endpoints", headers={"Host": f"evil.example:{w.port}"}).status_code == 403
    assert httpx.get(w.base + "/api/endpoints", headers={"Host": f"localhost:{w.port}"}).status_code == 200
    assert [e for e in httpx.get(w.base + "/api/endpoints").json()["endpoints"] if e["url"].startswith("https://93.184.215.14")] == []
    # The page itself (same origin, JSON) may write.
    ok = httpx.post(w.base + "/api/endpoints", content=body, headers={**own, "Origin": w.base})
    assert ok.status_code == 201, ok.text
    # Bound to loopback: the machine's other address does not answer.
    addr = non_loopback_ipv4()
    with pytest.raises(OSError):
        socket.create_connection((addr, w.port), timeout=3).close()
    assert "127.0.0.1" in w.log_path.read_text(errors="replace")


# ---- 4. secrets at rest -----------------------------------------------------------------------------
def raw_registry(settings: Settings) -> bytes:
    """Every record value of the registry topic, up to its end, as bytes."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "raw", "enable.auto.commit": False})
    name = settings.topic(ENDPOINTS_TOPIC)
    try:
        ends, tps = {}, []
        for p in c.list_topics(name, timeout=10).topics[name].partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(name, p), timeout=10)
            if hi > lo:
                ends[p] = hi
                tps.append(TopicPartition(name, p, lo))
        c.assign(tps)
        chunks: list[bytes] = []
        deadline = time.monotonic() + 20
        while ends and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            chunks.append(msg.value() or b"")
            if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                ends.pop(msg.partition(), None)
        assert not ends, "could not read the registry topic to its end"
        return b"\n".join(chunks)
    finally:
        c.close()


def test_secrets_are_encrypted_at_rest_and_re_encrypted_with_a_new_key(stack) -> None:
    w, rx, s = stack.keyed, stack.receiver, stack.settings
    api = call(w, "POST", "/api/endpoints", TOKEN, json={"url": rx.url("/sealed"), "events": "invoice.*"}).json()
    res = cli(s, "endpoints", "add", "--url", rx.url("/sealed-cli"), "--events", "invoice.*", "--json",
              WEBHOOKS_SECRETS_KEY=KEY1)
    assert res.exit_code == 0, res.output
    by_cli = orjson.loads(res.output)
    rotated = call(w, "POST", f"/api/endpoints/{api['id']}/rotate-secret", TOKEN, json={"grace": "1h"}).json()
    secrets = [api["secret"], by_cli["secret"], rotated["secret"]]
    raw = raw_registry(s)
    for secret in secrets:
        assert secret.encode() not in raw and secret.removeprefix("whsec_").encode() not in raw
    assert raw.count(b'"fernet:') >= 4  # two created, one rotated with its grace secret

    # The workers still sign with the clear secret (old and new during the grace period).
    call(w, "POST", "/api/events", INGEST, json={"event": "invoice.paid", "resource_id": "k1", "data": {"id": "k1"}})
    got = rx.wait_for(1, "/sealed")[0]
    assert len((got.header("webhook-signature") or "").split()) == 2
    clear = read_endpoints(s)
    assert clear[api["id"]].secret == rotated["secret"] and clear[api["id"]].grace_secret == api["secret"]
    assert all(x not in repr(clear[api["id"]]) for x in secrets)

    # Rotation: the new key first, the old one after it; re-encrypt; then the old key alone is not enough.
    res = cli(s, "endpoints", "re-encrypt", WEBHOOKS_SECRETS_KEY=f"{KEY2},{KEY1}")
    assert res.exit_code == 0 and "re-encrypted" in res.output, res.output
    only_new = Settings(bootstrap_servers=s.bootstrap_servers, topic_prefix=s.topic_prefix, secrets_key=KEY2)
    assert eventually(lambda: read_endpoints(only_new).get(by_cli["id"]), what="readable with the new key alone").secret == by_cli["secret"]
    old_only = cli(s, "endpoints", "list", WEBHOOKS_SECRETS_KEY=KEY1)
    assert old_only.exit_code != 0 and "WEBHOOKS_SECRETS_KEY" in old_only.output
    assert by_cli["secret"] not in old_only.output
    log = w.log_path.read_text(errors="replace")
    assert "stored in clear" not in log and all(x not in log for x in secrets)


def test_worker_without_a_key_warns_once_that_secrets_are_in_clear(stack) -> None:
    log = stack.local.log_path.read_text(errors="replace")
    assert log.count("WEBHOOKS_SECRETS_KEY is not set") == 1


# ---- 5. SSRF spellings -------------------------------------------------------------------------------
SPELLINGS = ["2130706433", "0177.0.0.1", "127.1", "0x7f.1", "0x7f000001", "017700000001", "0x7f.0.0.1", "0177.1", "0"]


def test_every_ipv4_spelling_refused_at_registration_and_at_delivery(stack) -> None:
    w, rx = stack.local, stack.receiver
    for host in SPELLINGS:
        r = httpx.post(w.base + "/api/endpoints", json={"url": f"http://{host}:{rx.port}/x", "events": "lead.*"})
        assert r.status_code == 400 and "WEBHOOKS_ALLOW_PRIVATE_TARGETS" in r.json()["error"], (host, r.text)
    # Records that reached the registry without validation (another writer, an older release).
    s = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": w.settings.bootstrap_servers, "WEBHOOKS_TOPIC_PREFIX": w.settings.topic_prefix})
    eps = {
        host: Endpoint(id=f"ep_ssrf{i}", url=f"http://{host}:{rx.port}/ssrf{i}", events=("lead.*",),
                       mode="immediate", secret=generate_secret())
        for i, host in enumerate(SPELLINGS)
    }
    with Producer(s) as p:
        for ep in eps.values():
            p.send(ENDPOINTS_TOPIC, ep.id, ep.record())
    eventually(lambda: len(read_endpoints(s)) >= len(eps), what="records written")
    eventually(
        lambda: all(httpx.get(f"{w.base}/api/endpoints/{ep.id}").status_code == 200 for ep in eps.values()),
        what="the worker follows the records",
    )
    with Producer(s) as p:
        p.emit("lead.created", "ssrf", {"id": "ssrf"})

    def outcomes() -> dict[str, str] | None:
        out = {}
        for host, ep in eps.items():
            rows = httpx.get(f"{w.base}/api/endpoints/{ep.id}/attempts").json()["attempts"]
            if not rows:
                return None
            out[host] = rows[0]["outcome"]  # newest first; the first attempt is all there is yet
        return out

    got = eventually(outcomes, timeout=40, what="one attempt per endpoint")
    assert got == {host: "forbidden" for host in SPELLINGS}, got
    assert [x for x in rx.received() if x.path.startswith("/ssrf")] == []


# ---- 6. metrics -------------------------------------------------------------------------------------
def test_metrics_need_the_token_and_forget_deleted_endpoints(stack) -> None:
    w, rx = stack.keyed, stack.receiver
    assert httpx.get(w.base + "/metrics").status_code == 401
    assert call(w, "GET", "/metrics", TOKEN).status_code == 401  # the metrics token, not another
    scrape = lambda: call(w, "GET", "/metrics", METRICS)  # noqa: E731
    assert scrape().status_code == 200
    ep = call(w, "POST", "/api/endpoints", TOKEN, json={"url": rx.url("/gone-soon"), "events": "contract.*"}).json()
    call(w, "POST", "/api/events", INGEST, json={"event": "contract.signed", "resource_id": "m1", "data": {"id": "m1"}})
    rx.wait_for(1, "/gone-soon")
    eventually(
        lambda: metric_value(parse_metrics(scrape().text), "webhooks_deliveries_total", endpoint=ep["id"]),
        what="a deliveries series for the endpoint",
    )
    assert call(w, "DELETE", f"/api/endpoints/{ep['id']}", TOKEN).status_code == 200
    text = scrape().text
    assert metric_value(parse_metrics(text), "webhooks_deliveries_total", endpoint=ep["id"]) is None
    assert ep["id"] not in text


# ---- 7. fuzzing the admin API against docs/openapi.yaml ---------------------------------------------
# Last in the module: what the fuzzer creates (endpoints, events) must not disturb the tests above.
SCHEMA = schemathesis.openapi.from_path(Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml")
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@SCHEMA.parametrize()
@hsettings(
    max_examples=2,  # per operation (24): with the explicit examples, ~1 min of the suite's budget
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_admin_api_fuzzed_against_its_openapi_document(case, stack) -> None:
    case.call_and_validate(
        base_url=stack.keyed.base, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS, timeout=30
    )
