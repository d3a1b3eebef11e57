"""Secret rotation without downtime (SPEC §2.6, §3.2), against a real worker and broker.

Before a rotation every signature uses the old secret. During the grace window the hex headers
(`X-PerfexAPI-Signature`, `X-Webhook-Signature`) use the new primary only and `webhook-signature`
carries one `v1,` entry per live secret, so a receiver holding either secret verifies it. After the
window the old secret is gone by itself. "During" uses a 24 h window; "after" a 3 s one that the
test waits out by polling the API until the endpoint reports its grace secret inactive.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.config import Settings
from app.signing import generate_secret, verify_hex, verify_standard
from tests.helpers import cli, delete_topics
from tests.receiver import Received, Receiver
from tests.workers import TOKEN, WorkerProcess

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def env(kafka: Any) -> Iterator[SimpleNamespace]:
    from app.topics import apply

    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        }
    )
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(settings, name="rotation")
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop()
        receiver.stop()
        delete_topics(settings.bootstrap_servers, settings.topic_prefix)


def make_endpoint(env: SimpleNamespace, path: str, event: str) -> dict[str, Any]:
    r = env.worker.api(
        "POST", "/api/endpoints", json={"url": env.receiver.url(path), "events": event, "mode": "immediate"}
    )
    assert r.status_code == 201, r.text
    return r.json()


def deliver(env: SimpleNamespace, path: str, event: str) -> Received:
    """Post one event over the admin API and return the delivery it causes at `path`."""
    before = len(env.receiver.received(path))
    r = env.worker.api("POST", "/api/events", json={"event": event, "resource_id": uuid.uuid4().hex[:8]})
    assert r.status_code == 202, r.text
    event_id = r.json()["id"]
    got = env.receiver.wait_for(before + 1, path, timeout=30)[before:]
    [hit] = [g for g in got if g.json["event_id"] == event_id]
    return hit


def signatures(d: Received) -> list[str]:
    return (d.header("webhook-signature") or "").split()


def std_ok(d: Received, secret: str) -> bool:
    """Standard Webhooks verification with our verifier and with the reference library, which must agree."""
    ours = verify_standard(
        d.body,
        d.header("webhook-id") or "",
        d.header("webhook-timestamp") or "",
        " ".join(signatures(d)),
        [secret],
    )
    try:
        Webhook(secret).verify(d.body, {k.lower(): v for k, v in d.headers.items()})
        theirs = True
    except WebhookVerificationError:
        theirs = False
    assert ours == theirs, "app.signing and the standardwebhooks package disagree"
    return ours


def hex_ok(d: Received, secret: str) -> bool:
    sig = d.header("X-PerfexAPI-Signature") or ""
    assert d.header("X-Webhook-Signature") == sig
    return verify_hex(d.body, sig, [secret])


def test_before_during_and_after_the_grace_window(env: SimpleNamespace) -> None:
    w = env.worker
    stranger = generate_secret()

    # Endpoint A: before, then during a 24 h window.
    a = make_endpoint(env, "/rot-a", "invoice.sent")
    old_a = a["secret"]
    d = deliver(env, "/rot-a", "invoice.sent")
    assert len(signatures(d)) == 1
    assert hex_ok(d, old_a) and std_ok(d, old_a)
    assert not hex_ok(d, stranger) and not std_ok(d, stranger)

    r = w.api("POST", f"/api/endpoints/{a['id']}/rotate-secret", json={})  # default grace: 24h
    assert r.status_code == 200, r.text
    rotated = r.json()
    new_a = rotated["secret"]
    assert new_a != old_a and rotated["grace_secret_active"] is True
    assert 86000 < rotated["grace_expires_at"] - time.time() <= 86400

    d = deliver(env, "/rot-a", "invoice.sent")
    assert len(signatures(d)) == 2
    assert hex_ok(d, new_a) and not hex_ok(d, old_a)  # hex headers: the new primary only
    assert std_ok(d, new_a) and std_ok(d, old_a)  # Standard Webhooks: either live secret
    assert not std_ok(d, stranger)

    # Endpoint B: a 3 s window, waited out; then only the new secret signs.
    b = make_endpoint(env, "/rot-b", "invoice.overdue")
    old_b = b["secret"]
    r = w.api("POST", f"/api/endpoints/{b['id']}/rotate-secret", json={"grace": "3s"})
    assert r.status_code == 200, r.text
    new_b = r.json()["secret"]
    assert r.json()["grace_secret_active"] is True
    deadline = time.monotonic() + 30
    while w.api("GET", f"/api/endpoints/{b['id']}").json()["grace_secret_active"]:
        assert time.monotonic() < deadline, "grace window did not end"
        time.sleep(0.2)
    d = deliver(env, "/rot-b", "invoice.overdue")
    assert len(signatures(d)) == 1
    assert hex_ok(d, new_b) and std_ok(d, new_b)
    assert not hex_ok(d, old_b) and not std_ok(d, old_b)

    # A still in its window: unaffected by B's expiry.
    d = deliver(env, "/rot-a", "invoice.sent")
    assert len(signatures(d)) == 2 and std_ok(d, old_a) and hex_ok(d, new_a)

    # The secrets were shown once (create, rotate) and never logged.
    listing = w.api("GET", "/api/endpoints").text
    log = w.log_path.read_text(encoding="utf-8", errors="replace")
    for secret in (old_a, new_a, old_b, new_b):
        assert secret not in listing and secret not in log


def test_grace_over_24h_is_refused_by_the_api_and_the_cli(env: SimpleNamespace) -> None:
    w = env.worker
    ep = make_endpoint(env, "/rot-c", "invoice.cancelled")
    path = f"/api/endpoints/{ep['id']}"
    for grace in ("25h", "24h1s", 86401, "2d", -5, "later", ""):
        r = w.api("POST", path + "/rotate-secret", json={"grace": grace})
        assert r.status_code == 400 and r.json()["error"], (grace, r.text)
    assert w.api("GET", path).json()["updated_at"] == ep["updated_at"]  # nothing changed

    res = cli(env.settings, "endpoints", "rotate-secret", ep["id"], "--grace", "25h")
    assert res.exit_code != 0 and "24h" in res.output
    res = cli(env.settings, "endpoints", "rotate-secret", ep["id"], "--grace", "soon")
    assert res.exit_code != 0
    assert w.api("GET", path).json()["grace_secret_active"] is False

    # The edge is allowed: exactly 24 h.
    r = w.api("POST", path + "/rotate-secret", json={"grace": 86400})
    assert r.status_code == 200 and r.json()["grace_secret_active"] is True


def test_cli_rotation_shows_in_the_api_and_signs(env: SimpleNamespace) -> None:
    ep = make_endpoint(env, "/rot-d", "invoice.partially_paid")
    res = cli(env.settings, "endpoints", "rotate-secret", ep["id"], "--grace", "1h", "--json")
    assert res.exit_code == 0, res.output
    new = orjson.loads(res.output)["secret"]
    shown = env.worker.api("GET", f"/api/endpoints/{ep['id']}")
    assert shown.json()["grace_secret_active"] is True and new not in shown.text
    assert 3500 < shown.json()["grace_expires_at"] - time.time() <= 3600
    d = deliver(env, "/rot-d", "invoice.partially_paid")
    assert hex_ok(d, new) and std_ok(d, new) and std_ok(d, ep["secret"])
    assert TOKEN not in env.worker.log_path.read_text(encoding="utf-8", errors="replace")
