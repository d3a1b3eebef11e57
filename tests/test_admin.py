"""Admin API against a real worker and broker: auth on every route, bad input, endpoints, the DLQ,
attempts, event ingest over HTTP, and the CLI and the API acting on the same state."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aiohttp import web

from app.config import Settings
from app.signing import verify_hex
from tests.helpers import cli, cli_json, delete_topics, eventually
from tests.receiver import Receiver, Reply
from tests.workers import TOKEN, WorkerProcess

pytestmark = pytest.mark.kafka

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
METHODS = ("get", "post", "put", "patch", "delete")
MAX_EVENT_BYTES = 20_000


def module_settings(kafka: Any) -> Settings:
    return Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        }
    )


@pytest.fixture(scope="module")
def env(kafka: Any) -> Iterator[SimpleNamespace]:
    """One worker (one-tier 100 ms retry schedule, 20 kB event limit) and one receiver per module."""
    from app.topics import apply

    settings = module_settings(kafka)
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(
        settings,
        name="admin",
        WEBHOOKS_RETRY_SCHEDULE="100ms",
        WEBHOOKS_MAX_EVENT_BYTES=str(MAX_EVENT_BYTES),
    )
    extra: list[WorkerProcess] = []
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker, extra=extra)
    finally:
        for w in [worker, *extra]:
            w.stop()
        receiver.stop()
        delete_topics(settings.bootstrap_servers, settings.topic_prefix)


def openapi_routes() -> set[tuple[str, str]]:
    doc = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops if m in METHODS}


def create(w: WorkerProcess, url: str, events: str, mode: str = "immediate", **kw: Any) -> dict[str, Any]:
    r = w.api("POST", "/api/endpoints", json={"url": url, "events": events, "mode": mode, **kw})
    assert r.status_code == 201, r.text
    return r.json()


# ---- contract: routes and docs ---------------------------------------------------------------------
def test_openapi_describes_exactly_the_routes(tmp_path: Path) -> None:
    from app.admin import API_KEY, install

    settings = Settings.from_env({"WEBHOOKS_ADMIN_TOKEN": "x", "WEBHOOKS_DATA_DIR": str(tmp_path)})
    app = web.Application()
    install(app, settings, SimpleNamespace())  # routes only: nothing starts until on_startup
    api = app[API_KEY]
    served = {(r.method, r.resource.canonical) for r in api.router.routes() if r.method != "HEAD"}
    assert served, "no /api routes installed"
    documented = openapi_routes()
    assert served - documented == set(), "routes missing from docs/openapi.yaml"
    assert documented - served == set(), "docs/openapi.yaml describes routes the app does not serve"


def test_openapi_document_is_valid() -> None:
    from openapi_spec_validator import validate  # a test dependency: missing is a failure
    validate(yaml.safe_load(OPENAPI.read_text(encoding="utf-8")))


def test_every_documented_route_answers_with_the_token(env: SimpleNamespace) -> None:
    # Without a token or with a wrong one every route is refused: tests/test_security.py
    # (test_every_api_route_needs_the_token, over the routes the server really has).
    for method, path in sorted(openapi_routes()):
        # Whatever the answer (404 for a made-up id, 400 for an empty body), it is not a refusal
        # and not a crash. The replay-all call is a dry run: it must not touch the DLQ.
        body = {"dry_run": True} if path == "/api/dlq/replay" else {}
        r = env.worker.api(method, path.replace("{id}", "dlv_nothing"), json=body)
        assert r.status_code != 401 and r.status_code < 500, (method, path, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("application/json")


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_bodies_get_4xx_with_a_reason_never_a_500(env: SimpleNamespace) -> None:
    w = env.worker
    ep = create(w, env.receiver.url("/bad"), "expense.created")
    ep_path = f"/api/endpoints/{ep['id']}"
    deep: Any = {"id": "1"}
    for _ in range(40):
        deep = {"x": deep}
    ok_url = env.receiver.url("/x")
    cases: list[tuple[str, str, Any]] = [
        ("POST", "/api/endpoints", b"not json"),
        ("POST", "/api/endpoints", b"\xff\xfe{"),
        ("POST", "/api/endpoints", b""),
        ("POST", "/api/endpoints", []),
        ("POST", "/api/endpoints", None),
        ("POST", "/api/endpoints", {"url": 5, "events": "invoice.*"}),
        ("POST", "/api/endpoints", {"events": "invoice.*"}),
        ("POST", "/api/endpoints", {"url": "ftp://example.com/x", "events": "invoice.*"}),
        ("POST", "/api/endpoints", {"url": "http://[::1", "events": "invoice.*"}),
        ("POST", "/api/endpoints", {"url": "http://u:p@example.com/", "events": "invoice.*"}),
        ("POST", "/api/endpoints", {"url": ok_url, "events": "nosuch.*"}),
        ("POST", "/api/endpoints", {"url": ok_url, "events": [1, 2]}),
        ("POST", "/api/endpoints", {"url": ok_url, "events": ""}),
        ("POST", "/api/endpoints", {"url": ok_url, "events": "invoice.*", "mode": "fast"}),
        ("POST", "/api/endpoints", {"url": ok_url, "events": "invoice.*", "secret": "short"}),
        ("POST", "/api/endpoints", {"url": ok_url, "events": "invoice.*", "enabled": "yes"}),
        ("POST", "/api/endpoints", {"url": ok_url, "events": "invoice.*", "colour": "red"}),
        ("PATCH", ep_path, {}),
        ("PATCH", ep_path, b"{"),
        ("PATCH", ep_path, {"secret": "whsec_AAAAAAAAAAAAAAAAAAAAAAAA"}),
        ("PATCH", ep_path, {"mode": "later"}),
        ("PATCH", ep_path, {"enabled": 1}),
        ("PATCH", ep_path, {"events": {"a": 1}}),
        ("PATCH", ep_path, {"url": "gopher://x"}),
        ("PATCH", "/api/endpoints/ep_missing", {"description": "x"}),
        ("POST", ep_path + "/rotate-secret", {"grace": "25h"}),
        ("POST", ep_path + "/rotate-secret", {"grace": "soon"}),
        ("POST", ep_path + "/rotate-secret", {"grace": -1}),
        ("POST", ep_path + "/rotate-secret", {"grace": True}),
        ("POST", ep_path + "/rotate-secret", {"secret": "short"}),
        ("POST", ep_path + "/rotate-secret", [1]),
        ("POST", "/api/endpoints/ep_missing/enable", None),
        ("DELETE", "/api/endpoints/ep_missing", None),
        ("POST", "/api/events", {}),
        ("POST", "/api/events", b"]"),
        ("POST", "/api/events", {"event": "invoice.paid"}),
        ("POST", "/api/events", {"event": "invoice.nope", "resource_id": "1"}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": "1", "data": [1]}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": True}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": " "}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": "1", "occurred_at": "yesterday"}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": "1", "previous": "x"}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": "1", "data": deep}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": "1", "id": "e" * 300}),
        ("POST", "/api/events", {"event": "invoice.paid", "resource_id": "1", "extra": 1}),
        ("POST", "/api/dlq/replay", {"since": "last week"}),
        ("POST", "/api/dlq/replay", {"endpoint": 5}),
        ("POST", "/api/dlq/replay", {"dry_run": "yes"}),
        ("POST", "/api/dlq/replay", {"all": True}),
        ("POST", "/api/dlq/dlv_missing/replay", None),
        ("GET", "/api/dlq?since=tuesday", None),
        ("GET", "/api/dlq?limit=0", None),
        ("GET", "/api/dlq?limit=many", None),
        ("GET", "/api/attempts?limit=-1", None),
        ("GET", "/api/dlq/dlv_missing", None),
        ("GET", "/api/deliveries/dlv_missing/attempts", None),
        ("GET", "/api/endpoints/ep_missing/attempts", None),
        ("GET", "/api/no-such-route", None),
        ("PUT", "/api/endpoints", {}),
    ]
    for method, path, body in cases:
        kw: dict[str, Any] = {}
        if isinstance(body, bytes):
            kw["content"] = body
        elif body is not None:
            kw["json"] = body
        r = w.api(method, path, **kw)
        assert 400 <= r.status_code < 500, (method, path, body, r.status_code, r.text)
        err = r.json().get("error")
        assert isinstance(err, str) and len(err) > 3, (method, path, r.text)
    # None of that changed the endpoint (the rotate calls were all refused).
    now = w.api("GET", ep_path).json()
    assert now["grace_secret_active"] is False and now["updated_at"] == ep["updated_at"]


def test_event_over_the_size_limit_is_413(env: SimpleNamespace) -> None:
    big = {"event": "invoice.paid", "resource_id": "1", "data": {"id": "1", "note": "x" * MAX_EVENT_BYTES}}
    r = env.worker.api("POST", "/api/events", json=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # Far over the limit (past the web server's own body cap) is still a JSON 413, not a dropped connection.
    huge = orjson.dumps({**big, "data": {"note": "y" * (MAX_EVENT_BYTES * 10)}})
    r = env.worker.api("POST", "/api/events", content=huge)
    assert r.status_code == 413 and r.json()["error"]


# ---- endpoints -----------------------------------------------------------------------------------------
def test_endpoint_lifecycle_and_the_secret_only_on_create_and_rotate(env: SimpleNamespace) -> None:
    w = env.worker
    ep = create(w, env.receiver.url("/life"), "contract.*", mode="smart", description="ERP sync")
    secret = ep["secret"]
    assert secret.startswith("whsec_") and ep["mode"] == "smart" and ep["enabled"] is True
    assert ep["failure_streak"] == 0 and ep["last_attempt"] is None
    path = f"/api/endpoints/{ep['id']}"

    listing = w.api("GET", "/api/endpoints")
    assert listing.status_code == 200
    assert ep["id"] in {e["id"] for e in listing.json()["endpoints"]}
    shown = w.api("GET", path)
    assert shown.status_code == 200 and shown.json()["description"] == "ERP sync"
    for r in (listing, shown):
        assert secret not in r.text and '"secret"' not in r.text

    r = w.api("PATCH", path, json={"events": ["contract.signed", "contract.renewed"], "mode": "async"})
    assert r.status_code == 200, r.text
    assert r.json()["events"] == ["contract.signed", "contract.renewed"] and r.json()["mode"] == "async"
    assert secret not in r.text

    r = w.api("POST", path + "/disable")
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["disabled_reason"]
    assert w.api("GET", path).json()["enabled"] is False
    r = w.api("POST", path + "/enable")
    assert r.status_code == 200 and r.json()["enabled"] is True and r.json()["disabled_reason"] is None
    r = w.api("PATCH", path, json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False

    r = w.api("POST", path + "/rotate-secret", json={"grace": "1h"})
    assert r.status_code == 200, r.text
    new_secret = r.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != secret
    assert r.json()["grace_secret_active"] is True
    assert secret not in r.text  # the old secret is not echoed back
    again = w.api("GET", path)
    assert new_secret not in again.text and secret not in again.text

    r = w.api("DELETE", path)
    assert r.status_code == 200 and r.json() == {"id": ep["id"], "deleted": True}
    assert w.api("GET", path).status_code == 404
    assert w.api("DELETE", path).status_code == 404

    log = env.worker.log_path.read_text(encoding="utf-8", errors="replace")
    assert secret not in log and new_secret not in log and TOKEN not in log


def test_cli_and_api_act_on_the_same_endpoints(env: SimpleNamespace) -> None:
    w, s = env.worker, env.settings
    made = cli_json(s, "endpoints", "add", "--url", env.receiver.url("/cli"), "--events", "item.*")
    # An acknowledged CLI write is in the API's answer at once (the view catches up first).
    r = w.api("GET", f"/api/endpoints/{made['id']}")
    assert r.status_code == 200 and r.json()["url"] == env.receiver.url("/cli")
    assert made["secret"] not in r.text

    ep = create(w, env.receiver.url("/api-made"), "project.*")
    assert ep["id"] in {e["id"] for e in cli_json(s, "endpoints", "list")}
    assert w.api("POST", f"/api/endpoints/{ep['id']}/disable").status_code == 200
    assert cli_json(s, "endpoints", "show", ep["id"])["enabled"] is False

    assert cli(s, "endpoints", "disable", made["id"]).exit_code == 0
    assert w.api("GET", f"/api/endpoints/{made['id']}").json()["enabled"] is False
    assert cli(s, "endpoints", "delete", made["id"]).exit_code == 0
    assert w.api("GET", f"/api/endpoints/{made['id']}").status_code == 404


def test_catalog(env: SimpleNamespace) -> None:
    r = env.worker.api("GET", "/api/catalog")
    assert r.status_code == 200
    doc = r.json()
    assert doc["count"] == 138 and doc["documented"] == 73 and len(doc["resources"]) == 19
    names = {e["name"] for res in doc["resources"].values() for e in res["events"]}
    assert "invoice.paid" in names


# ---- event ingest over HTTP ----------------------------------------------------------------------------
def test_posted_event_lands_on_crm_events_and_is_delivered(env: SimpleNamespace) -> None:
    from app.topic_tables import read_table

    w = env.worker
    ep = create(w, env.receiver.url("/ingest"), "payment.received")
    sent = {
        "event": "payment.received",
        "resource_id": 4242,
        "data": {"id": "4242", "amount": "21.80", "note": "Zürich/€ <b>"},
        "previous": {"amount": "0.00"},
    }
    r = w.api("POST", "/api/events", json=sent)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["id"].startswith("evt_") and accepted["key"] == "payment:4242"

    got = env.receiver.wait_for(1, "/ingest", timeout=30)[0]
    doc = got.json
    assert doc["event_id"] == accepted["id"] and doc["event"] == "payment.received"
    assert doc["payload"] == sent["data"] and doc["previous"] == sent["previous"]
    assert verify_hex(got.body, got.header("X-PerfexAPI-Signature") or "", [ep["secret"]])

    on_topic = read_table(env.settings, "crm.events")["payment:4242"]
    assert on_topic["id"] == accepted["id"] and on_topic["resource_id"] == "4242"

    # A caller-chosen event id and time are kept.
    r = w.api(
        "POST",
        "/api/events",
        json={
            "event": "payment.received",
            "resource_id": "7",
            "id": "evt_crm_1",
            "occurred_at": "2026-11-27T10:00:00.123Z",
        },
    )
    assert r.status_code == 202 and r.json()["id"] == "evt_crm_1"
    got = eventually(
        lambda: [x for x in env.receiver.received("/ingest") if x.json["event_id"] == "evt_crm_1"]
    )
    assert got[0].json["occurred_at"] == "2026-11-27T10:00:00.123Z"


# ---- DLQ and attempts ----------------------------------------------------------------------------------
def test_dlq_attempts_and_replay_through_the_api(env: SimpleNamespace) -> None:
    w, s, rx = env.worker, env.settings, env.receiver
    healthy = {"/dead-a": False, "/dead-b": False}
    for path in healthy:
        rx.on(path, lambda _n, p=path: Reply(200 if healthy[p] else 500))
    a = create(w, rx.url("/dead-a"), "proposal.*")
    b = create(w, rx.url("/dead-b"), "estimate.sent")
    for event, rid in (("proposal.sent", "1"), ("proposal.accepted", "2"), ("estimate.sent", "3")):
        assert w.api("POST", "/api/events", json={"event": event, "resource_id": rid}).status_code == 202

    def dlq(**q: str) -> dict[str, Any]:
        r = w.api("GET", "/api/dlq", params=q)
        assert r.status_code == 200, r.text
        return r.json()

    eventually(
        lambda: dlq(endpoint=a["id"])["total"] == 2 and dlq(endpoint=b["id"])["total"] == 1, 60, "3 dead"
    )
    entries = dlq(endpoint=a["id"])["entries"]
    assert all(e["reason"] == "retries_exhausted" and e["attempts"] == 2 and e["replayable"] for e in entries)
    assert all(e["last_status"] == 500 for e in entries)
    assert "history" not in entries[0] and "data" not in entries[0]
    assert {e["event"] for e in dlq(event="estimate.*")["entries"]} == {"estimate.sent"}
    assert dlq(endpoint=a["id"], since=str(time.time() + 60))["total"] == 0
    assert dlq(endpoint=a["id"], until="2000-01-01T00:00:00Z")["total"] == 0
    first, second = sorted(e["delivery_id"] for e in entries)

    listed = {e["delivery_id"] for e in cli_json(s, "dlq", "list")}
    assert {first, second} <= listed

    # What happened to one delivery: two attempts (first + one 100 ms retry), then the DLQ.
    hist = eventually(
        lambda: (
            (r := w.api("GET", f"/api/deliveries/{first}/attempts").json())
            and len(r.get("attempts", [])) == 2
            and r
        ),
        30,
        "attempt log",
    )
    assert [x["n"] for x in hist["attempts"]] == [1, 2]
    assert all(x["status"] == 500 and x["outcome"] == "http_error" for x in hist["attempts"])
    assert hist["dlq"]["reason"] == "retries_exhausted" and len(hist["dlq"]["history"]) == 2
    eventually(lambda: w.api("GET", f"/api/endpoints/{a['id']}").json()["failure_streak"] == 4, 30, "streak")
    per_ep = w.api("GET", f"/api/endpoints/{a['id']}/attempts", params={"limit": "3"}).json()
    assert len(per_ep["attempts"]) == 3 and per_ep["failure_streak"] == 4
    recent = eventually(
        lambda: (
            len(r := w.api("GET", "/api/attempts", params={"endpoint": b["id"]}).json()["attempts"]) == 2
            and r
        )
    )
    assert recent[0]["at"] >= recent[1]["at"]
    one = w.api("GET", f"/api/dlq/{first}").json()
    assert one["data"] == {"id": one["resource"].split(":")[1]} and len(one["history"]) == 2

    # Replay one: same delivery id, gone from the DLQ for the API and the CLI alike.
    healthy["/dead-a"] = healthy["/dead-b"] = True
    r = w.api("POST", f"/api/dlq/{first}/replay")
    assert r.status_code == 200 and r.json()["replayed"] == 1 and r.json()["delivery_ids"] == [first]
    eventually(
        lambda: [
            x for x in rx.received("/dead-a") if x.header("X-PerfexAPI-Delivery") == first and x.status == 200
        ]
    )
    assert w.api("GET", f"/api/dlq/{first}").status_code == 404
    assert w.api("POST", f"/api/dlq/{first}/replay").status_code == 404
    assert first not in {e["delivery_id"] for e in cli_json(s, "dlq", "list")}

    # Replay all, filtered: a dry run changes nothing; then only endpoint A's entry goes.
    r = w.api("POST", "/api/dlq/replay", json={"endpoint": a["id"], "dry_run": True})
    assert r.status_code == 200 and r.json()["would_replay"] == [second]
    assert dlq(endpoint=a["id"])["total"] == 1
    r = w.api("POST", "/api/dlq/replay", json={"endpoint": a["id"]})
    assert r.status_code == 200 and r.json()["replayed"] == 1 and r.json()["delivery_ids"] == [second]
    assert dlq(endpoint=b["id"])["total"] == 1
    eventually(
        lambda: [
            x
            for x in rx.received("/dead-a")
            if x.header("X-PerfexAPI-Delivery") == second and x.status == 200
        ]
    )

    # The rest by event filter, from the CLI's point of view empty afterwards.
    r = w.api("POST", "/api/dlq/replay", json={"event": "estimate.*", "since": 0, "until": time.time() + 60})
    assert r.status_code == 200 and r.json()["replayed"] == 1
    eventually(lambda: rx.received("/dead-b")[-1].status == 200)
    assert cli_json(s, "dlq", "list", "--endpoint", b["id"]) == []
    assert dlq()["size"] == 0
    assert "webhooks_dlq_size 0.0" in w.metrics()


def test_replay_to_a_disabled_endpoint_warns_and_it_comes_back(env: SimpleNamespace) -> None:
    w, rx = env.worker, env.receiver
    healthy = {"on": False}
    rx.on("/off", lambda _n: Reply(200 if healthy["on"] else 500))
    ep = create(w, rx.url("/off"), "credit_note.*")
    assert (
        w.api("POST", "/api/events", json={"event": "credit_note.created", "resource_id": "9"}).status_code
        == 202
    )
    entry = eventually(
        lambda: w.api("GET", "/api/dlq", params={"endpoint": ep["id"]}).json()["entries"], what="dead"
    )[0]
    d_id = entry["delivery_id"]
    assert w.api("POST", f"/api/endpoints/{ep['id']}/disable").status_code == 200
    r = w.api("POST", f"/api/dlq/{d_id}/replay")
    assert r.status_code == 200 and "disabled" in r.json()["warnings"][0]
    # Back in the DLQ (still disabled, not attempted); enabling and replaying delivers it, same id.
    eventually(
        lambda: w.api("GET", f"/api/dlq/{d_id}").json().get("reason") == "endpoint_disabled", what="parked"
    )
    healthy["on"] = True
    assert w.api("POST", f"/api/endpoints/{ep['id']}/enable").status_code == 200
    r = w.api("POST", "/api/dlq/replay", json={"endpoint": ep["id"]})
    assert r.json()["replayed"] == 1 and r.json()["warnings"] == []
    eventually(lambda: [x for x in rx.received("/off") if x.status == 200], what="delivered")
    assert {x.header("X-PerfexAPI-Delivery") for x in rx.received("/off")} == {d_id}


# ---- insecure mode, and a second worker gives the same answers -------------------------------------------
def test_cli_worker_refuses_to_start_without_a_token(env: SimpleNamespace) -> None:
    res = cli(env.settings, "worker", WEBHOOKS_ADMIN_TOKEN=None, WEBHOOKS_ADMIN_INSECURE=None)
    assert res.exit_code != 0 and "WEBHOOKS_ADMIN_TOKEN" in res.output


def test_second_worker_insecure_mode_same_answers(env: SimpleNamespace) -> None:
    """Last in the module: it adds a worker to the group (a rebalance)."""
    w1 = env.worker
    w2 = WorkerProcess(
        env.settings, name="admin-insecure", WEBHOOKS_ADMIN_TOKEN="", WEBHOOKS_ADMIN_INSECURE="true"
    )
    env.extra.append(w2)
    w2.start()

    log = w2.log_path.read_text(encoding="utf-8", errors="replace")
    assert "ADMIN API OPEN" in log
    page = httpx.get(w2.base + "/admin", timeout=10)
    assert page.status_code == 200 and 'data-insecure="true"' in page.text
    banner = re.compile(r'<div id="insecure-banner"[^>]*>')
    assert "hidden" not in banner.search(page.text).group(0)  # type: ignore[union-attr]
    secure_page = httpx.get(w1.base + "/admin", timeout=10)
    assert "hidden" in banner.search(secure_page.text).group(0)  # type: ignore[union-attr]

    # No token needed on w2; its answers are w1's.
    def same(path: str, key: Callable[[Any], Any]) -> bool:
        a = httpx.get(w2.base + path, timeout=10)
        return a.status_code == 200 and key(a.json()) == key(w1.api("GET", path).json())

    eventually(
        lambda: same("/api/endpoints", lambda d: sorted((e["id"], e["enabled"]) for e in d["endpoints"]))
    )
    eventually(lambda: same("/api/dlq", lambda d: sorted(e["delivery_id"] for e in d["entries"])))
    eventually(
        lambda: same(
            "/api/attempts?limit=1000",
            lambda d: sorted(x["delivery_id"] + str(x["n"]) for x in d["attempts"]),
        )
    )
    r = httpx.post(
        w2.base + "/api/endpoints", json={"url": env.receiver.url("/w2"), "events": "task.*"}, timeout=10
    )
    assert r.status_code == 201
    assert w1.api("GET", f"/api/endpoints/{r.json()['id']}").status_code == 200
