"""Drop-in surfaces against a real worker and broker: the n8n PerfexCRM Trigger node's unchanged flow on
`/api/v1/webhooks` (create, exists, a delivery its own signature check accepts, delete, nothing
delivered afterwards), the rest of that API, and both body formats on the wire."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.helpers import cli, eventually
from tests.receiver import Received, Receiver, Reply
from tests.workers import TOKEN, WorkerProcess

pytestmark = pytest.mark.kafka

NODE = shutil.which("node")
TYPED_SECRET = "what an n8n user typed in Secret"  # no whsec_ prefix, not base64, has spaces

# The n8n node's webhook() check, unchanged: n8n hands it the parsed body; it re-serialises it with
# JSON.stringify and compares the hex HMAC keyed with the node's Secret field to x-webhook-signature.
NODE_CHECK = r"""
const crypto = require('crypto');
const lines = require('fs').readFileSync(0, 'utf8').split('\n').filter(Boolean);
for (const line of lines) {
  const r = JSON.parse(line);
  const bodyData = JSON.parse(Buffer.from(r.body, 'base64').toString('utf8'));
  const signature = r.headers['x-webhook-signature'];
  const expectedSignature = crypto.createHmac('sha256', r.secret).update(JSON.stringify(bodyData)).digest('hex');
  console.log(JSON.stringify({accepted: !!signature && signature === expectedSignature,
                              event: bodyData.event, payload: bodyData.payload, type: bodyData.type,
                              data: bodyData.data}));
}
"""


@pytest.fixture(scope="module")
def env(kafka: Any) -> Iterator[SimpleNamespace]:
    from app.topics import apply

    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
            "WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true",
        }
    )
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(settings, name="dropin", WEBHOOKS_RETRY_SCHEDULE="100ms")
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop()
        receiver.stop()


def n8n(w: WorkerProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    """A request as the node's `this.helpers.request` makes it: base URL + /api/v1, X-API-KEY."""
    return httpx.request(method, f"{w.base}/api/v1{path}", headers={"X-API-KEY": TOKEN}, timeout=30, **kw)


def node_check(tmp_path: Path, deliveries: list[tuple[Received, str]]) -> list[dict[str, Any]]:
    import base64

    assert NODE is not None, "node is required (Debian package nodejs, installed by scripts/bootstrap)"
    script = tmp_path / "n8n_check.js"
    script.write_text(NODE_CHECK, encoding="utf-8")
    lines = [
        json.dumps(
            {
                "body": base64.b64encode(r.body).decode(),
                "headers": {k.lower(): v for k, v in r.headers.items()},
                "secret": secret,
            }
        )
        for r, secret in deliveries
    ]
    out = subprocess.run(
        [NODE, str(script)], input="\n".join(lines), capture_output=True, text=True, timeout=60, check=True
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def emit(w: WorkerProcess, event: str, rid: str, data: dict[str, Any]) -> str:
    r = httpx.post(
        w.base + "/api/events",
        headers={"X-API-KEY": TOKEN},
        json={"event": event, "resource_id": rid, "data": data, "previous": {"status": "1"}},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_n8n_trigger_node_flow_unchanged(env: SimpleNamespace, tmp_path: Path) -> None:
    w, rx = env.worker, env.receiver
    rid = uuid.uuid4().hex[:8]
    # create: exactly the node's body (its workflow id in the name, its Secret field as typed).
    created = n8n(
        w,
        "POST",
        "/webhooks",
        json={
            "name": "n8n-webhook-wf42",
            "url": rx.url("/n8n"),
            "events": ["invoice.paid", "invoice.updated"],
            "secret": TYPED_SECRET,
            "is_active": 1,
        },
    )
    assert created.status_code == 201, created.text
    data = created.json()["data"]
    hook_id = data["id"]
    assert hook_id and data["is_active"] == 1 and data["mode"] == "async" and data["format"] == "perfexapi"
    assert data["secret"] == TYPED_SECRET and data["name"] == "n8n-webhook-wf42"
    # A second workflow asks for Standard Webhooks' body; and a plain subscriber is the sentinel.
    std = n8n(
        w,
        "POST",
        "/webhooks",
        json={
            "name": "std",
            "url": rx.url("/std"),
            "events": ["invoice.paid"],
            "format": "standard",
            "secret": TYPED_SECRET + "!",
            "is_active": 1,
            "workflow": {"unknown": "ignored"},
        },
    )
    assert std.status_code == 201, std.text
    sentinel = n8n(w, "POST", "/webhooks", json={"url": rx.url("/sentinel"), "events": ["invoice.paid"]})
    assert sentinel.status_code == 201, sentinel.text
    sentinel_secret = sentinel.json()["data"]["secret"]
    assert sentinel_secret.startswith("whsec_")  # none given: a generated one

    # exists: a truthy response.data, and never the secret.
    exists = n8n(w, "GET", f"/webhooks/{hook_id}")
    assert exists.status_code == 200 and exists.json()["data"]["id"] == hook_id
    assert TYPED_SECRET not in exists.text and "secret" not in exists.json()["data"]

    # A delivery the node's own check accepts, with the resource under `payload`.
    resource = {"id": rid, "total": "21.80", "note": "Zürich/€ </x> 東京", "url": "https://crm.example/a/b"}
    emit(w, "invoice.paid", rid, resource)
    got = rx.wait_for(1, "/n8n", timeout=30)[0]
    got_std = rx.wait_for(1, "/std", timeout=30)[0]
    rx.wait_for(1, "/sentinel", timeout=30)
    checks = node_check(
        tmp_path,
        [(got, TYPED_SECRET), (got_std, TYPED_SECRET + "!"), (got, "not the secret the node holds")],
    )
    assert checks[0] == {"accepted": True, "event": "invoice.paid", "payload": resource}
    assert checks[1] == {"accepted": True, "type": "invoice.paid", "data": resource}
    assert checks[2]["accepted"] is False
    assert got.json["previous"] == {"status": "1"} and got.json["id"] == got.header("X-PerfexAPI-Delivery")
    assert got_std.header("X-PerfexAPI-Event-Id") and set(got_std.json) == {"type", "timestamp", "data"}

    # delete, then exists answers no.
    deleted = n8n(w, "DELETE", f"/webhooks/{hook_id}")
    assert deleted.status_code == 200 and deleted.json()["data"] == {"id": hook_id, "deleted": True}
    assert n8n(w, "GET", f"/webhooks/{hook_id}").status_code == 404

    # Nothing is delivered afterwards: the next event reaches the sentinel, never the deleted hook.
    emit(w, "invoice.paid", rid, {**resource, "total": "0.00"})
    eventually(lambda: len(rx.received("/sentinel")) >= 2, 30, "the sentinel's second delivery")
    eventually(lambda: len(rx.received("/std")) >= 2, 30, "the standard hook's second delivery")
    assert len(rx.received("/n8n")) == 1
    dlq = httpx.get(w.base + "/api/dlq", headers={"X-API-KEY": TOKEN}, timeout=30).json()
    assert [e for e in dlq["entries"] if e["endpoint_id"] == hook_id] == []


def test_webhooks_v1_api(env: SimpleNamespace) -> None:
    w, rx = env.worker, env.receiver
    # Unauthorised: no key, a wrong key; the bearer header keeps working.
    base = f"{w.base}/api/v1/webhooks"
    assert httpx.get(base, timeout=10).status_code == 401
    assert httpx.get(base, headers={"X-API-KEY": "wrong"}, timeout=10).status_code == 401
    assert w.api("GET", "/api/v1/webhooks").status_code == 200

    # Bad input: a clear 4xx, nothing stored.
    for body, reason in (
        ({"events": ["invoice.paid"]}, "url"),
        ({"url": rx.url("/v1"), "events": []}, "events"),
        ({"url": rx.url("/v1"), "events": ["payment.recorded"]}, "payment.recorded"),
        ({"url": rx.url("/v1"), "events": ["invoice.paid"], "secret": "short"}, "secret"),
        ({"url": rx.url("/v1"), "events": ["invoice.paid"], "is_active": 7}, "is_active"),
        ({"url": rx.url("/v1"), "events": ["invoice.paid"], "mode": "later"}, "mode"),
        ({"url": rx.url("/v1"), "events": ["invoice.paid"], "format": "xml"}, "format"),
    ):
        r = n8n(w, "POST", "/webhooks", json=body)
        assert r.status_code == 400 and reason in r.json()["error"], (body, r.text)

    made = [
        n8n(
            w,
            "POST",
            "/webhooks",
            json={
                "url": rx.url(f"/v1/{i}"),
                "events": "lead.*",
                "is_active": i % 2,
                "mode": "smart",
                "colour": "ignored",
            },
        )
        for i in range(3)
    ]
    assert [r.status_code for r in made] == [201, 201, 201], [r.text for r in made]
    ids = [r.json()["data"]["id"] for r in made]
    assert [r.json()["data"]["is_active"] for r in made] == [0, 1, 0]
    # The same endpoints the admin API manages: is_active 0 is enabled false.
    assert w.api("GET", f"/api/endpoints/{ids[0]}").json()["enabled"] is False

    listed = n8n(w, "GET", "/webhooks", params={"limit": 2, "page": 1}).json()
    assert listed["meta"]["total"] >= 3 and len(listed["data"]) == 2 and "secret" not in str(listed)
    everything = [
        row["id"]
        for p in (1, 2, 3)
        for row in n8n(w, "GET", "/webhooks", params={"limit": 2, "page": p}).json()["data"]
    ]
    assert set(ids) <= set(everything) and len(everything) == len(set(everything))

    changed = n8n(
        w, "PUT", f"/webhooks/{ids[0]}", json={"is_active": 1, "events": ["lead.created"], "name": "renamed"}
    )
    assert changed.status_code == 200, changed.text
    assert {k: changed.json()["data"][k] for k in ("is_active", "events", "name")} == {
        "is_active": 1,
        "events": ["lead.created"],
        "name": "renamed",
    }
    row = n8n(w, "GET", f"/webhooks/{ids[0]}").json()["data"]
    assert (row["is_active"], row["events"], row["name"], row["mode"]) == (
        1,
        ["lead.created"],
        "renamed",
        "smart",
    )
    assert n8n(w, "PUT", f"/webhooks/{ids[0]}", json={"unrelated": 1}).status_code == 400
    assert n8n(w, "PUT", "/webhooks/ep_missing", json={"is_active": 0}).status_code == 404
    assert n8n(w, "DELETE", "/webhooks/ep_missing").status_code == 404


# ---- the Python client and the CLI through it ------------------------------------------------------------
def test_client_against_a_real_worker(env: SimpleNamespace) -> None:
    from app.client import AsyncClient, AuthError, BadRequest, Client, NotFound, TransportError

    w, rx = env.worker, env.receiver
    rx.on("/client-down", lambda _n: Reply(500, body=b"down"))
    with Client(w.base, TOKEN) as api:
        ep = api.create_endpoint(rx.url("/client-down"), ["estimate.*"], mode="immediate", format="standard")
        assert ep.secret and ep.secret.startswith("whsec_") and ep.format == "standard" and ep.enabled
        assert ep.secret not in repr(ep)  # a model printed in a log never shows it
        assert ep.id in [e.id for e in api.list_endpoints()]
        assert api.get_endpoint(ep.id).secret is None  # only create and rotate answer with it
        assert api.update_endpoint(ep.id, description="by the client").description == "by the client"
        assert api.disable_endpoint(ep.id).enabled is False and api.enable_endpoint(ep.id).enabled is True
        rotated = api.rotate_secret(ep.id, grace="1h")
        assert rotated.secret not in (None, ep.secret) and rotated.grace_secret_active

        sent = {api.send_event("estimate.sent", f"c{i}", {"id": f"c{i}"}) for i in range(3)}
        assert len(sent) == 3
        # Pages of 2: three entries over two pages, none twice.
        dead = eventually(lambda: len(got := api.dlq(endpoint=ep.id, page_size=2)) == 3 and got, 60, "3 dead")
        assert len({e.delivery_id for e in dead}) == 3 and all(e.reason == "retries_exhausted" for e in dead)
        one = api.dlq_entry(dead[0].delivery_id)
        assert one.data is not None and one.history and one.history[0].status == 500
        assert not one.history[0].ok and one.history[0].outcome == "http_error"
        tried = api.delivery_attempts(one.delivery_id)
        assert [a.n for a in tried][:2] == [1, 2]
        # A failed attempt keeps the request as sent: headers and the standard-format body.
        assert tried[0].request is not None and tried[0].request["headers"]["X-PerfexAPI-Attempt"] == "1"
        assert json.loads(tried[0].request["body"])["type"] == "estimate.sent"
        assert {a.endpoint_id for a in api.attempts(endpoint=ep.id)} == {ep.id}

        dry = api.replay_all(endpoint=ep.id, dry_run=True)
        assert dry.dry_run and sorted(dry.delivery_ids) == sorted(e.delivery_id for e in dead)
        assert api.replay(one.delivery_id).replayed == 1

        with pytest.raises(NotFound):
            api.get_endpoint("ep_missing")
        with pytest.raises(BadRequest, match=r"no\.such"):
            api.create_endpoint(rx.url("/x"), ["no.such"])

    async def async_side() -> None:
        async with AsyncClient(w.base, TOKEN) as aapi:
            assert (await aapi.get_endpoint(ep.id)).description == "by the client"
            rows = [e async for e in aapi.iter_dlq(endpoint=ep.id, page_size=1)]
            assert {e.delivery_id for e in rows} <= {e.delivery_id for e in dead} and rows
            await aapi.delete_endpoint(ep.id)
            with pytest.raises(NotFound):
                await aapi.get_endpoint(ep.id)

    asyncio.run(async_side())
    with Client(w.base, "wrong-token") as bad, pytest.raises(AuthError):
        bad.list_endpoints()
    with Client("http://127.0.0.1:9", TOKEN, timeout=2) as nowhere, pytest.raises(TransportError):
        nowhere.list_endpoints()


def test_client_retries_429_and_503_no_sooner_than_retry_after(env: SimpleNamespace) -> None:
    from app.client import Client, Unavailable

    rx = env.receiver
    rx.on(
        "/busy/api/endpoints",
        lambda n: (
            Reply(503, {"Retry-After": "1"})
            if n == 1
            else Reply(200, {"Content-Type": "application/json"}, body=b'{"endpoints": []}')
        ),
    )
    rx.on("/full/api/endpoints", lambda _n: Reply(429, {"Retry-After": "0"}, body=b'{"error": "slow down"}'))
    with Client(rx.url("/busy"), TOKEN) as api:
        assert api.list_endpoints() == []
    first, second = rx.received("/busy/api/endpoints")
    assert second.at - first.at >= 1.0  # it waited as long as Retry-After asked
    with Client(rx.url("/full"), TOKEN, retries=2) as api, pytest.raises(Unavailable, match="slow down"):
        api.list_endpoints()
    assert len(rx.received("/full/api/endpoints")) == 3  # the first try and two retries


def test_cli_endpoints_and_dlq_through_the_api(env: SimpleNamespace) -> None:
    w, rx = env.worker, env.receiver
    rx.on("/cli-down", lambda _n: Reply(500))
    # Kafka is out of reach for this CLI: everything must go through the worker's API.
    api = {"WEBHOOKS_ADMIN_TOKEN": TOKEN, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}

    def run(*args: str, **extra: str) -> Any:
        res = cli(env.settings, *args, **{**api, **extra})
        assert res.exit_code == 0, res.output
        return json.loads(res.output) if "--json" in args else res.output

    made = run(
        "--api",
        w.base,
        "endpoints",
        "add",
        "--url",
        rx.url("/cli-down"),
        "--events",
        "item.*",
        "--mode",
        "immediate",
        "--secret",
        TYPED_SECRET,
        "--json",
    )
    assert made["secret"] == TYPED_SECRET and made["format"] == "perfexapi"
    ep_id = made["id"]
    assert ep_id in [e["id"] for e in run("endpoints", "list", "--json", WEBHOOKS_API_URL=w.base)]
    assert "item.*" in run("--api", w.base, "endpoints", "show", ep_id)
    assert run("--api", w.base, "endpoints", "disable", ep_id, "--json")["enabled"] is False
    assert run("--api", w.base, "endpoints", "enable", ep_id, "--json")["enabled"] is True
    rotated = run("--api", w.base, "endpoints", "rotate-secret", ep_id, "--grace", "10m", "--json")
    assert rotated["secret"] != TYPED_SECRET and rotated["grace_secret_active"] is True

    httpx.post(
        w.base + "/api/events",
        headers={"X-API-KEY": TOKEN},
        timeout=30,
        json={"event": "item.created", "resource_id": "cli1", "data": {"id": "cli1"}},
    )
    dead = eventually(lambda: run("--api", w.base, "dlq", "list", "--endpoint", ep_id, "--json"), 60, "dead")
    d_id = dead[0]["delivery_id"]
    assert f"would replay {d_id}" in run(
        "--api", w.base, "dlq", "replay", "--all", "--endpoint", ep_id, "--dry-run"
    )
    assert run("--api", w.base, "dlq", "replay", "--delivery-id", d_id, "--json")["replayed"] == 1
    # One clear line and a non-zero exit for what the API refuses.
    missing = cli(env.settings, "--api", w.base, "endpoints", "show", "ep_missing", **api)
    assert missing.exit_code == 1 and "no endpoint ep_missing" in missing.output
    refused = cli(
        env.settings, "--api", w.base, "endpoints", "list", **{**api, "WEBHOOKS_ADMIN_TOKEN": "nope"}
    )
    assert refused.exit_code == 1 and "401" not in refused.output and "token" in refused.output
    assert run("--api", w.base, "endpoints", "delete", ep_id, "--json") == {"id": ep_id, "deleted": True}


# ---- the attempt log's per-endpoint hour and the requests it keeps (no Kafka) ------------------------------
def test_attempt_log_last_hour_stats_and_bounded_requests() -> None:
    from app.attempt_log import AttemptLog

    log = AttemptLog(Settings.from_env({}), per_endpoint=50, requests=3)
    now = 1_800_000_000.0
    log.add(
        {
            "delivery_id": "old",
            "endpoint_id": "ep",
            "n": 1,
            "at": now - 4000,
            "outcome": "http_error",
            "latency_ms": 9999,
        }
    )
    for i in range(20):  # 19 successes and one failure in the hour, latencies 1..20 ms
        outcome = "timeout" if i == 7 else "success"
        log.add(
            {
                "delivery_id": f"d{i}",
                "endpoint_id": "ep",
                "n": 1,
                "at": now - 100 + i,
                "outcome": outcome,
                "latency_ms": float(i + 1),
                "request": {"headers": {"h": str(i)}, "body": "{}"},
            }
        )
    st = log.stats("ep", now)
    assert st == {"attempts": 20, "success_rate": 0.95, "p95_latency_ms": 19.0, "complete": True}
    assert log.stats("nobody", now)["attempts"] == 0
    # Requests: the newest 3 only, never inside the bounded lists.
    assert "request" not in log.recent(1)[0]
    assert log.for_delivery("d19")[0]["request"]["headers"] == {"h": "19"}
    assert "request" not in log.for_delivery("d10")[0]
    # A full per-endpoint list inside the hour: the stats say they may not cover all of it.
    busy = AttemptLog(Settings.from_env({}), per_endpoint=5)
    for i in range(9):
        busy.add(
            {
                "delivery_id": f"b{i}",
                "endpoint_id": "ep",
                "n": 1,
                "at": now - i,
                "outcome": "success",
                "latency_ms": 1.0,
            }
        )
    assert busy.stats("ep", now)["complete"] is False
