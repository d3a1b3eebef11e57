"""The SSRF guard as users get it: a worker started with the default settings (no
WEBHOOKS_ALLOW_PRIVATE_TARGETS, no WEBHOOKS_ALLOWED_TARGETS) refuses loopback/private endpoint URLs
on the API and the CLI, and never POSTs to one that reached the registry some other way: the
delivery is parked with its reason. The rest of the suite keeps the guard on too and reaches its
receivers through WEBHOOKS_ALLOWED_TARGETS (tests/workers.py), which the last tests pin down."""

from __future__ import annotations

import pytest

from app.config import ConfigError, Settings
from app.dlq import read_view
from app.netguard import parse_allowed_targets, target_key, validate_url
from app.producer import Producer
from tests.helpers import cli, eventually, metric, register, settle

# ---- the option itself -------------------------------------------------------------------------------


def test_allowed_targets_are_parsed_to_one_spelling() -> None:
    got = parse_allowed_targets(" 127.0.0.1:8000, [::1]:9000 ,Hooks.Internal:443,,[0:0::1]:9000")
    assert got == {"127.0.0.1:8000", "[::1]:9000", "hooks.internal:443"}
    assert target_key("::1", 9000) == "[::1]:9000" and target_key("[::1]", 9000) == "[::1]:9000"


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:", ":8000", "host:http", "host:0", "host:70000"])
def test_a_bad_allowed_target_is_a_config_error_naming_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match="WEBHOOKS_ALLOWED_TARGETS"):
        Settings.from_env({"WEBHOOKS_ALLOWED_TARGETS": bad})


def test_an_allowed_target_opens_exactly_its_port() -> None:
    allowed = parse_allowed_targets("127.0.0.1:8000,localhost:9000")
    assert validate_url("http://127.0.0.1:8000/hook", False, allowed=allowed)
    assert validate_url("http://localhost:9000/hook", False, allowed=allowed)
    for url in ("http://127.0.0.1:8001/hook", "http://127.0.0.1/hook", "http://localhost:8000/hook"):
        with pytest.raises(ValueError, match="loopback"):
            validate_url(url, False, allowed=allowed)
    assert Settings.from_env({}).allowed_targets == frozenset()  # the default allows nothing


# ---- a worker with the default settings ------------------------------------------------------------------


@pytest.mark.kafka
def test_default_worker_refuses_private_urls_and_never_posts_to_one(settings, receiver, workers) -> None:
    # "" = the plain default; workers otherwise get the test receivers' allow-list.
    w = workers(WEBHOOKS_ALLOWED_TARGETS="", WEBHOOKS_RETRY_SCHEDULE="100ms")
    assert not settings.allow_private_targets and not settings.allowed_targets

    # The API refuses loopback and private URLs with a reason.
    for url, why in ((receiver.url("/api"), "loopback"), ("http://10.1.2.3/hook", "private")):
        r = w.api("POST", "/api/endpoints", json={"url": url, "events": "invoice.*", "mode": "immediate"})
        assert r.status_code == 400 and why in r.text, r.text
    # So does the CLI, with the environment of a default install.
    res = cli(
        settings,
        "endpoints", "add", "--url", receiver.url("/cli"), "--events", "invoice.*", "--mode", "async",
        WEBHOOKS_ALLOWED_TARGETS=None,
    )  # fmt: skip
    assert res.exit_code != 0 and "loopback" in res.output, res.output
    assert w.api("GET", "/api/endpoints").json()["endpoints"] == []

    # Records naming loopback targets, written to the registry directly (an older client, a
    # restored backup): by IP literal (checked before connecting) and by name (checked by the
    # resolver), on the immediate and the async path.
    literal = register(settings, receiver, "/literal", "invoice.*", "immediate")
    by_name = register(settings, receiver, "/by-name", "invoice.*", "async")
    assert by_name.url.startswith("http://127.0.0.1:")
    from app.route import ENDPOINTS as TOPIC

    by_name = by_name.changed(url=by_name.url.replace("127.0.0.1", "localhost")).next_version()
    with Producer(settings) as p:
        p.send(TOPIC, by_name.id, by_name.record())
    eventually(lambda: len(w.api("GET", "/api/endpoints").json()["endpoints"]) == 2, 15, "registry seen by the worker")

    with Producer(settings) as p:
        ids = {p.emit("invoice.paid", f"r{i}", {"id": f"r{i}"})["id"] for i in range(3)}

    def parked() -> dict:
        view = read_view(settings)
        return view if len(view) >= 6 else {}

    view = eventually(parked, 30, "six deliveries parked")
    settle(w, accounted=lambda: len(read_view(settings)) == 6)
    view = read_view(settings)
    assert len(view) == 6  # 3 events x 2 endpoints, each parked once
    assert {e["endpoint_id"] for e in view.values()} == {literal.id, by_name.id}
    assert {e["event_id"] for e in view.values()} == ids
    for e in view.values():
        assert e["dlq_reason"] == "forbidden_target", e
        # One attempt that never reached the network, with the guard's reason.
        assert [a["outcome"] for a in e["attempts"]] == ["forbidden"], e
        assert "loopback" in e["attempts"][0]["error"], e
    assert receiver.received() == []  # never POSTed
    text = w.metrics()
    assert metric(text, "webhooks_dlq_entries_total", reason="forbidden_target") == 6
    assert metric(text, "webhooks_deliveries_total", outcome="forbidden") == 6
    assert metric(text, "webhooks_deliveries_total", outcome="success") == 0


@pytest.mark.kafka
def test_the_suites_workers_keep_the_guard_on_and_allow_only_the_receivers(receiver, workers) -> None:
    """How every other test reaches its receivers: the guard on, exactly their host:port allowed."""
    w = workers()
    assert "WEBHOOKS_ALLOW_PRIVATE_TARGETS" not in w.env or w.env["WEBHOOKS_ALLOW_PRIVATE_TARGETS"] != "true"
    ok = w.api("POST", "/api/endpoints", json={"url": receiver.url("/ok"), "events": "invoice.*", "mode": "immediate"})
    assert ok.status_code == 201, ok.text
    other = f"http://127.0.0.1:{receiver.port + 1 if receiver.port < 65535 else 1}/no"
    r = w.api("POST", "/api/endpoints", json={"url": other, "events": "invoice.*", "mode": "immediate"})
    assert r.status_code == 400 and "loopback" in r.text, r.text
