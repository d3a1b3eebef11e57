"""Endpoint health (issue 18 part 2, app/breaker.py): the circuit breaker, auto-disable, parking
while disabled and replay on re-enable, against a real broker, a real worker and real receivers.

One worker per module with short timers: tiers of 0.5-3 s (11 s in all), the breaker opening after
3 consecutive failures with a 1 s cooldown, auto-disable after 10 s of failure (the breaker test's
endpoint must recover before that, also on a loaded machine).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app import route
from app.breaker import ATTEMPT, CLOSED, HALF_OPEN, OPEN, PROBE, Breakers
from app.config import HealthSettings, Settings
from app.dlq import read_view
from app.endpoints import read_endpoints
from app.producer import Producer
from app.signing import verify
from tests.helpers import cli, delete_topics, eventually, metric, register, settle
from tests.receiver import Receiver, Reply
from tests.workers import TOKEN, WorkerProcess

SCHEDULE = "500ms,500ms,1s,1s,1s,2s,2s,3s"
COOLDOWN = 1.0
OPERATOR_SECRET = "operator-secret-0123456789abcdef"


# ---- the breaker's rules (pure) ------------------------------------------------------------------
def test_breaker_opens_on_a_streak_holds_and_lets_one_probe_at_a_time() -> None:
    b = Breakers(HealthSettings(breaker_failures=3, breaker_rate=0, breaker_cooldown=10))
    t = 1000.0
    for i in range(3):
        assert b.admit("ep", 0, t + i) == ATTEMPT
        b.record("ep", False, ATTEMPT, t + i)
    assert b.view("ep")["state"] == OPEN
    assert b.admit("ep", 0, t + 5) is None  # held during the cooldown
    assert b.admit("ep", 0, t + 12.5) == PROBE  # half-open: one probe ...
    assert b.view("ep")["state"] == HALF_OPEN
    assert b.admit("ep", 0, t + 12.6) is None  # ... at a time
    b.record("ep", False, PROBE, t + 13)
    assert b.view("ep")["state"] == OPEN  # a failed probe opens it for another cooldown
    assert b.admit("ep", 0, t + 14) is None
    assert b.admit("ep", 0, t + 23.5) == PROBE
    b.record("ep", True, PROBE, t + 24)
    assert b.view("ep")["state"] == CLOSED and b.view("ep")["consecutive_failures"] == 0
    assert b.admit("ep", 0, t + 24.1) == ATTEMPT


def test_breaker_opens_on_a_failure_rate_and_closes_when_the_endpoint_changes() -> None:
    b = Breakers(HealthSettings(breaker_failures=0, breaker_rate=0.5, breaker_window=60, breaker_min_attempts=10))
    t = 1000.0
    for i in range(9):  # 5 of 9 failed: not enough attempts yet
        b.record("ep", i % 2 == 0, ATTEMPT, t + i)
    assert b.view("ep")["state"] == CLOSED
    b.record("ep", False, ATTEMPT, t + 9)  # 5 of 10: not over half
    assert b.view("ep")["state"] == CLOSED
    b.record("ep", False, ATTEMPT, t + 10)  # 6 of 11
    assert b.view("ep")["state"] == OPEN
    assert b.admit("ep", t + 5, t + 11) is None  # changed before it opened: still open
    assert b.admit("ep", t + 10.5, t + 11) == ATTEMPT  # re-enabled / new URL since: closed


def test_a_released_probe_frees_the_slot_and_overdue_counts_from_the_last_change() -> None:
    b = Breakers(HealthSettings(breaker_failures=1, breaker_cooldown=1, auto_disable_after=100))
    b.record("ep", False, ATTEMPT, 1000)
    assert b.admit("ep", 0, 1002) == PROBE
    b.release("ep", PROBE)  # the endpoint was saturated: no attempt made
    assert b.admit("ep", 0, 1002.1) == PROBE
    b.record("ep", False, PROBE, 1050)
    assert b.overdue("ep", 0, 1099) is None
    assert b.overdue("ep", 0, 1100) == 100
    assert b.overdue("ep", 1030, 1100) is None  # changed (re-enabled) 70 s ago: the clock restarted
    b.record("ep", True, ATTEMPT, 1101)
    assert b.overdue("ep", 0, 5000) is None


def test_a_held_delivery_walks_the_tiers_and_is_parked_after_the_last() -> None:
    s = Settings.from_env({"WEBHOOKS_RETRY_SCHEDULE": SCHEDULE})
    assert [route.held(s, n) for n in (1, 2, 8)] == [route.Tier(0), route.Tier(1), route.Tier(7)]
    assert route.held(s, 9) == route.Dead("retries_exhausted")


def test_health_settings_defaults_and_the_cooldown_follows_the_first_tier() -> None:
    h = Settings.from_env({}).health
    assert (h.breaker_failures, h.breaker_rate, h.breaker_cooldown, h.auto_disable_after) == (10, 0.5, 30.0, 5 * 86400)
    assert Settings.from_env({"WEBHOOKS_RETRY_SCHEDULE": "200ms"}).health.breaker_cooldown == 0.2
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="WEBHOOKS_OPERATOR_WEBHOOK_SECRET"):
        Settings.from_env({"WEBHOOKS_OPERATOR_WEBHOOK_URL": "https://ops.example/hook"})


# ---- against a real worker -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(kafka: Any) -> Iterator[SimpleNamespace]:
    from app.topics import apply

    settings = Settings.from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}."}
    )
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(
        settings,
        name="health",
        WEBHOOKS_RETRY_SCHEDULE=SCHEDULE,
        WEBHOOKS_BREAKER_FAILURES="3",
        WEBHOOKS_BREAKER_FAILURE_RATE="0",
        WEBHOOKS_BREAKER_COOLDOWN=f"{COOLDOWN}s",
        WEBHOOKS_AUTO_DISABLE_AFTER="10s",
        WEBHOOKS_OPERATOR_WEBHOOK_URL=receiver.url("/operator"),
        WEBHOOKS_OPERATOR_WEBHOOK_SECRET=OPERATOR_SECRET,
    )
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop()
        receiver.stop()
        delete_topics(settings.bootstrap_servers, settings.topic_prefix)


def delivered(receiver: Receiver, path: str) -> Counter[str]:
    """Delivery id -> times it was answered 2xx."""
    return Counter(r.header("X-PerfexAPI-Delivery") for r in receiver.received(path) if 200 <= r.status < 300)


def breaker(w: WorkerProcess, ep_id: str) -> dict[str, Any]:
    r = w.api("GET", f"/api/endpoints/{ep_id}/breaker")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_breaker_holds_and_recovers_and_auto_disable_parks_and_replays(env: SimpleNamespace) -> None:
    """One test, two endpoints at once (the suite's time): /ad fails until it is auto-disabled
    while /b's breaker opens, holds, probes and closes."""
    s, rx = env.settings, env.receiver
    ad = register(s, rx, "/ad", "lead.*", "async")
    down = {"on": True}
    rx.on("/ad", lambda n: Reply(500) if down["on"] else Reply(200))
    with Producer(s) as p:  # /ad's clock starts at its first failure
        for i in range(4):
            p.emit("lead.created", f"a{i}", {"id": f"a{i}"}, flush=False)
    breaker_holds_then_a_probe_closes_it(env)
    auto_disable_parks_then_re_enable_replays(env, ad.id, down)


def breaker_holds_then_a_probe_closes_it(env: SimpleNamespace) -> None:
    s, rx, w = env.settings, env.receiver, env.worker
    ep = register(s, rx, "/b", "invoice.*", "async")
    healthy = {"on": False}
    rx.on("/b", lambda n: Reply(200) if healthy["on"] else Reply(503))
    with Producer(s) as p:
        for i in range(3):
            p.emit("invoice.paid", f"b{i}", {"id": f"b{i}"}, flush=False)
    rx.wait_for(3, "/b")
    eventually(lambda: breaker(w, ep.id)["state"] in (OPEN, HALF_OPEN), 20, "the breaker open after 3 failures")
    opened = time.monotonic()
    hits_at_open = len(rx.received("/b"))

    with Producer(s) as p:
        for i in range(3, 13):
            p.emit("invoice.paid", f"b{i}", {"id": f"b{i}"}, flush=False)

    def held() -> float:
        return metric(w.metrics(), "webhooks_deliveries_total", endpoint=ep.id, outcome="breaker_open")

    # Every new delivery is held at least once (moved on to a tier, no attempt), and the held ones
    # move on through the tiers: more holds than deliveries.
    eventually(lambda: held() >= 16, 30, "deliveries held by the open breaker")
    probes = len(rx.received("/b")) - hits_at_open
    assert probes <= (time.monotonic() - opened) / COOLDOWN + 1, (probes, "attempts while open: one probe a cooldown")
    assert metric(w.metrics(), "webhooks_retries_scheduled_total", tier="30s") >= 13
    assert metric(w.metrics(), "webhooks_breaker_state", endpoint=ep.id) >= 1
    shown = cli(s, "--api", w.base, "endpoints", "breaker", ep.id, WEBHOOKS_ADMIN_TOKEN=TOKEN)
    assert shown.exit_code == 0 and ("breaker open" in shown.output or "breaker half-open" in shown.output), shown.output

    healthy["on"] = True  # recovers: the next probe succeeds, the breaker closes, the held arrive
    eventually(lambda: len(delivered(rx, "/b")) == 13, 30, "every held delivery delivered")
    got = delivered(rx, "/b")
    assert len(got) == 13 and set(got.values()) == {1}, got  # 0 lost, none twice (so far: see the end)
    bodies = {orjson.loads(r.body)["payload"]["id"] for r in rx.received("/b") if r.status == 200}
    assert bodies == {f"b{i}" for i in range(13)}
    assert breaker(w, ep.id)["state"] == CLOSED
    assert metric(w.metrics(), "webhooks_breaker_state", endpoint=ep.id) == 0
    env.breaker_endpoint = ep.id


def auto_disable_parks_then_re_enable_replays(env: SimpleNamespace, ep_id: str, down: dict[str, bool]) -> None:
    s, rx, w = env.settings, env.receiver, env.worker

    def disabled() -> Any:
        now = read_endpoints(s)[ep_id]
        return None if now.enabled else now

    now = eventually(disabled, 40, "the endpoint auto-disabled")
    assert "auto-disabled" in (now.disabled_reason or ""), now.disabled_reason
    # The registry write is visible before the disabling worker counts it: poll the counter.
    eventually(lambda: metric(w.metrics(), "webhooks_endpoints_auto_disabled_total") == 1, 10, "counted")
    (notice,) = rx.wait_for(1, "/operator")
    verify(notice.body, notice.headers, [OPERATOR_SECRET])  # signed: raises if not
    assert notice.json["event"] == "endpoint.auto_disabled" and notice.json["payload"]["endpoint_id"] == ep_id
    failed = len(rx.received("/ad"))  # the disabling worker makes no attempt after its write

    # Disabled: new events are parked too (with their delivery ids), nothing is sent or dropped.
    with Producer(s) as p:
        for i in range(4, 7):
            p.emit("lead.updated", f"a{i}", {"id": f"a{i}"}, flush=False)

    def parked() -> dict[str, dict[str, Any]]:
        return {k: e for k, e in read_view(s).items() if e.get("endpoint_id") == ep_id}

    def all_parked() -> dict[str, dict[str, Any]] | None:
        now = parked()
        return now if len(now) == 7 else None

    entries = eventually(all_parked, 30, "7 deliveries parked")
    assert sorted(e["data"]["id"] for e in entries.values()) == [f"a{i}" for i in range(7)]
    # Those made while it was disabled are parked as such; those held in the tiers meanwhile too,
    # unless (a slow machine) they walked past the last tier first.
    assert {e["dlq_reason"] for e in entries.values() if e["event"] == "lead.updated"} == {"endpoint_disabled"}
    assert {e["dlq_reason"] for e in entries.values()} <= {"endpoint_disabled", "retries_exhausted"}

    # Re-enabling offers the replay (the CLI on Kafka counts them; the API shows the count) ...
    down["on"] = False
    offer = cli(s, "endpoints", "enable", ep_id)
    assert offer.exit_code == 0 and "7 deliveries are parked" in offer.output, offer.output
    assert w.api("GET", f"/api/endpoints/{ep_id}").json()["parked"] == 7
    # ... and with it, each parked delivery is delivered exactly once, under its own id.
    r = w.api("POST", f"/api/endpoints/{ep_id}/enable?replay=true")
    assert r.status_code == 200 and r.json()["replayed"] == 7 and r.json()["enabled"], r.text
    assert sorted(r.json()["replayed_ids"]) == sorted(entries)
    eventually(lambda: len(delivered(rx, "/ad")) == 7, 30, "the replayed deliveries")
    settle(w, accounted=lambda: len(delivered(rx, "/ad")) == 7 and not parked())
    got = delivered(rx, "/ad")
    assert set(got) == set(entries) and set(got.values()) == {1}, got
    assert len([x for x in rx.received("/ad") if x.status == 500]) == failed  # none while disabled
    assert not parked() and read_endpoints(s)[ep_id].enabled
    # The breaker's endpoint, after the same settle: still each delivery once, nothing in the DLQ.
    b = env.breaker_endpoint
    assert set(delivered(rx, "/b").values()) == {1} and len(delivered(rx, "/b")) == 13
    assert not [e for e in read_view(s).values() if e.get("endpoint_id") == b] and read_endpoints(s)[b].enabled
