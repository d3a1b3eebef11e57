"""The admin page in headless Chromium (Debian chromium on PATH, Python Playwright) against a real
worker and broker: sign in, see dead deliveries of a failing endpoint, replay one and then all, and
see them delivered; onboard an endpoint (create from the catalog, secret once, test event, stats,
delivery detail, rotate, disable, delete); the operator controls of issue 18 (filter, max rate and
ordering when creating and editing, the breaker state, enable with replay of what was parked); and
a read-only token sees the data without write controls. Screenshots (desktop and phone width) go
to test-output/browser/."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.config import Settings
from app.producer import Producer
from tests.helpers import delete_topics, eventually, require_tool
from tests.receiver import Receiver, Reply
from tests.workers import TOKEN, WorkerProcess

SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "browser"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
READ_TOKEN = "read-token-" + "r" * 32  # WEBHOOKS_READ_TOKEN of the module's worker
BREAKER_FAILURES = 5  # above the first test's 4 failures of one endpoint: its breaker stays closed
# Hostile data: it must show as text and never run.
HOSTILE = '<img src=x onerror="window.__xss=1;alert(1)"><script>window.__xss=2</script>'

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.browser,
]


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
    worker = WorkerProcess(
        settings,
        name="browser",
        WEBHOOKS_RETRY_SCHEDULE="100ms",
        WEBHOOKS_READ_TOKEN=READ_TOKEN,
        WEBHOOKS_BREAKER_FAILURES=str(BREAKER_FAILURES),
    )
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop()
        receiver.stop()
        delete_topics(settings.bootstrap_servers, settings.topic_prefix)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=require_tool("chromium"), args=ARGS)
        try:
            yield b
        finally:
            b.close()


class PageWatch:
    """Collects what must not happen on the page: script errors, console errors (CSP violations
    show there), and any dialog other than the expected confirmations and the prompts the test
    queued answers for (`answers`, in order)."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        self.answers: list[str] = []
        # A refused token (the test tries a wrong one) logs the 401s of the data calls: expected. A
        # test that sends bad input on purpose adds the status it expects.
        self.expected = ["status of 401"]
        page.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not any(e in msg.text for e in self.expected):
            self.problems.append(f"console: {msg.text}")

    def _dialog(self, dialog: Any) -> None:
        if dialog.type == "confirm" and (
            dialog.message.startswith(("Replay every DLQ entry", "Delete endpoint"))
            or (dialog.message.startswith("Endpoint ") and "parked in the DLQ" in dialog.message)
        ):
            dialog.accept()
        elif dialog.type == "prompt" and self.answers:
            dialog.accept(self.answers.pop(0))
        else:
            self.problems.append(f"unexpected {dialog.type}: {dialog.message}")
            dialog.dismiss()


def sign_in(page: Any, base: str, token: str = TOKEN) -> None:
    page.goto(base + "/admin")
    page.wait_for_selector("#signin-form", state="visible")
    page.fill("#token", token)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#app", state="visible")


def test_sign_in_see_the_dlq_replay_one_and_all(env: SimpleNamespace, browser: Any) -> None:
    w, rx = env.worker, env.receiver
    healthy = {"on": False}
    rx.on("/flaky", lambda _n: Reply(200 if healthy["on"] else 500))
    r = w.api(
        "POST",
        "/api/endpoints",
        json={"url": rx.url("/flaky"), "events": "lead.*", "mode": "immediate", "description": HOSTILE},
    )
    assert r.status_code == 201, r.text
    ep = r.json()
    for rid in ("1", "2"):
        body = {"event": "lead.created", "resource_id": rid, "data": {"id": rid, "name": HOSTILE}}
        assert w.api("POST", "/api/events", json=body).status_code == 202
    dead = eventually(
        lambda: (d := w.api("GET", "/api/dlq").json())["total"] == 2 and d["entries"],
        60,
        "two dead deliveries",
    )
    first, second = sorted(e["delivery_id"] for e in dead)
    SHOTS.mkdir(parents=True, exist_ok=True)

    # Desktop: a wrong token is refused, the right one shows the data.
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page)
    page.goto(w.base + "/admin")
    page.wait_for_selector("#signin-form", state="visible")
    assert page.locator("#app").is_hidden()
    page.fill("#token", "not-the-token")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('refused')")
    page.fill("#token", TOKEN)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector(f'#dlq tr[data-delivery="{first}"]')
    page.wait_for_selector(f'#dlq tr[data-delivery="{second}"]')
    row = page.locator(f'#endpoints tr[data-endpoint="{ep["id"]}"]')
    assert row.locator("td[data-label='Mode']").inner_text() == "immediate"
    assert row.locator("td[data-label='Events']").inner_text() == "lead.*"
    assert "enabled" in row.locator("td[data-label='Status']").inner_text()
    page.wait_for_selector(
        f'#endpoints tr[data-endpoint="{ep["id"]}"] td[data-label="Failure streak"]:has-text("4")'
    )
    assert HOSTILE in row.inner_text()  # shown as text ...
    page.wait_for_selector("#attempts tbody tr:has-text('http_error')")
    page.click(f'#dlq tr[data-delivery="{first}"] button:has-text("Details")')
    page.wait_for_selector("pre.payload")
    assert HOSTILE.replace('"', '\\"') in page.inner_text("pre.payload")
    assert page.locator("img, #dlq script, #endpoints script").count() == 0  # ... never as markup
    assert page.evaluate("window.__xss") is None
    page.screenshot(path=str(SHOTS / "admin.png"), full_page=True)

    # Phone width: the same data, nothing wider than the screen.
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone_watch = PageWatch(phone)
    sign_in(phone, w.base)
    phone.wait_for_selector(f'#dlq tr[data-delivery="{first}"]')
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert phone.locator(f'#dlq tr[data-delivery="{first}"] button[data-replay]').is_visible()
    phone.screenshot(path=str(SHOTS / "admin-phone.png"), full_page=True)
    phone.close()
    assert phone_watch.problems == []

    # The endpoint recovers; replay one from the page.
    healthy["on"] = True
    page.click(f'button[data-replay="{first}"]')
    page.wait_for_selector(f"#dlq-result:has-text('Replayed {first}')")
    eventually(
        lambda: [
            x for x in rx.received("/flaky") if x.header("X-PerfexAPI-Delivery") == first and x.status == 200
        ],
        what="replayed delivery",
    )
    page.wait_for_selector(f'#dlq tr[data-delivery="{first}"]', state="detached")
    assert page.locator(f'#dlq tr[data-delivery="{second}"]').is_visible()

    # Replay all (confirmed in the dialog): the DLQ empties and the last one is delivered.
    page.click("#replay-all")
    page.wait_for_selector("#dlq-result:has-text('Replayed 1 delivery')")
    eventually(
        lambda: [
            x for x in rx.received("/flaky") if x.header("X-PerfexAPI-Delivery") == second and x.status == 200
        ],
        what="replay-all delivery",
    )
    page.wait_for_selector("#dlq-empty", state="visible")
    page.wait_for_selector("#attempts tbody tr:has-text('success')")
    page.screenshot(path=str(SHOTS / "admin-after-replay.png"), full_page=True)
    assert w.api("GET", "/api/dlq").json()["total"] == 0
    assert watch.problems == []
    page.close()


def test_page_is_served_without_the_token_but_data_is_not(env: SimpleNamespace, browser: Any) -> None:
    import httpx

    page = httpx.get(env.worker.base + "/admin", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'nonce-" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert httpx.get(env.worker.base + "/api/endpoints", timeout=10).status_code == 401

    # Signing out forgets the token: the next load asks again.
    p = browser.new_page(viewport={"width": 1024, "height": 700})
    watch = PageWatch(p)
    sign_in(p, env.worker.base)
    p.click("#signout")
    p.wait_for_selector("#signin-form", state="visible")
    p.reload()
    p.wait_for_selector("#signin-form", state="visible")
    assert p.evaluate("sessionStorage.length") == 0
    p.close()
    assert watch.problems == []


def test_onboard_an_endpoint_from_the_page(env: SimpleNamespace, browser: Any) -> None:
    from app.signing import verify

    w, rx = env.worker, env.receiver
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, permissions=["clipboard-read", "clipboard-write"]
    )
    page = context.new_page()
    watch = PageWatch(page)
    sign_in(page, w.base)

    # Create: URL, events from the catalog (search, a resource wildcard, one name), mode, format.
    page.fill("#new-url", rx.url("/onboard"))
    page.fill("#event-search", "invoice")
    page.check('#event-list input[data-pattern="invoice.*"]')
    assert page.locator('#event-list input[data-pattern="invoice.paid"]').is_disabled()  # covered by invoice.*
    page.fill("#event-search", "lead.created")
    assert page.locator('#event-list input[data-pattern="invoice.*"]').count() == 0  # filtered out
    page.check('#event-list input[data-pattern="lead.created"]')
    page.fill("#new-patterns", "*.deleted")
    assert page.inner_text("#events-chosen") == "· invoice.*, lead.created, *.deleted"
    page.select_option("#new-mode", "immediate")
    page.select_option("#new-format", "standard")
    page.fill("#new-description", "onboarded from the page")
    page.click("#create-submit")
    page.wait_for_selector("#create-result:has-text('You are live')")
    ep_id = page.inner_text("#secret-endpoint")
    secret = page.inner_text("#secret-value")
    assert secret.startswith("whsec_")
    made = w.api("GET", f"/api/endpoints/{ep_id}").json()
    assert (made["events"], made["mode"], made["format"], made["description"]) == (
        ["invoice.*", "lead.created", "*.deleted"],
        "immediate",
        "standard",
        "onboarded from the page",
    )
    assert secret not in str(made)

    # The secret once, with a copy button; gone from the page once dismissed.
    page.click("#copy-secret")
    page.wait_for_selector("#copy-result:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.screenshot(path=str(SHOTS / "onboard-created.png"), full_page=True)
    page.click("#secret-done")
    assert page.locator("#secret-box").is_hidden() and secret not in page.content()

    # Send a test event: the receiver gets a signed standard-format delivery; the page shows the attempt.
    page.click(f'button[data-test="{ep_id}"]')
    page.wait_for_selector("#endpoint-result:has-text('success 200')")
    got = rx.wait_for(1, "/onboard", timeout=30)[0]
    verify(got.body, got.headers, [secret], require_standard=True)
    assert set(got.json) == {"type", "timestamp", "data"} and got.json["data"]["test"] == "true"
    assert got.json["type"].startswith("invoice.")  # the first catalog event of the first pattern
    assert page.inner_text("#test-detail pre.request-body") == got.body.decode()
    assert got.header("X-PerfexAPI-Signature") in page.inner_text("#test-detail pre.request-headers")

    # Per endpoint: success rate and p95 over the last hour, from the attempt log.
    row = f'#endpoints tr[data-endpoint="{ep_id}"]'
    page.wait_for_selector(f'{row} td[data-label="Last hour"]:has-text("100% ok")')
    assert "p95" in page.inner_text(f'{row} td[data-label="Last hour"]')
    assert page.inner_text(f'{row} td[data-label="Breaker"]').strip() == "closed"  # app/breaker.py
    page.screenshot(path=str(SHOTS / "onboard-tested.png"), full_page=True)

    # A delivery's detail: request headers and body as sent, response status and latency.
    delivery_id = got.header("X-PerfexAPI-Delivery")
    page.click(f'#attempts button[data-delivery-detail="{delivery_id}"]')
    page.wait_for_selector("#delivery-section h3:has-text('success 200')")
    assert page.inner_text("#delivery-id") == delivery_id
    assert page.inner_text("#delivery-detail pre.request-body") == got.body.decode()
    assert " ms" in page.inner_text("#delivery-detail h3")
    page.screenshot(path=str(SHOTS / "onboard-delivery.png"), full_page=True)

    # Rotate with a grace window: the next delivery is signed with the new and the old secret.
    page.click(f'button[data-rotate="{ep_id}"]')
    page.select_option("#rotate-grace", "1h")
    page.click("#rotate-go")
    page.wait_for_selector("#endpoint-result:has-text('rotated')")
    new_secret = page.inner_text("#secret-value")
    assert new_secret.startswith("whsec_") and new_secret != secret
    page.click("#secret-done")
    page.click(f'button[data-test="{ep_id}"]')
    second = rx.wait_for(2, "/onboard", timeout=30)[1]
    for accepted in ([secret], [new_secret]):
        verify(second.body, second.headers, accepted, require_standard=True)
    assert len(second.header("webhook-signature").split()) == 2

    # Disable, enable, delete (confirmed).
    page.click(f'{row} button:has-text("Disable")')
    page.wait_for_selector(f'{row} td[data-label="Status"]:has-text("disabled")')
    page.click(f'{row} button:has-text("Enable")')
    page.wait_for_selector(f'{row} td[data-label="Status"]:has-text("enabled")')
    page.click(f'button[data-delete="{ep_id}"]')
    page.wait_for_selector(row, state="detached")
    assert w.api("GET", f"/api/endpoints/{ep_id}").status_code == 404
    assert watch.problems == []
    context.close()


def test_operator_controls_from_the_page_and_a_read_only_token(env: SimpleNamespace, browser: Any) -> None:
    """Issue 18 from the page: filter, max rate and ordering when creating and editing; the breaker
    opening on a failing endpoint; deliveries parked while it is disabled and replayed on enabling;
    and the same page with the read token, without a single write control."""
    w, rx = env.worker, env.receiver
    healthy = {"on": False}
    rx.on("/controls", lambda _n: Reply(200 if healthy["on"] else 500))
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page)
    sign_in(page, w.base)
    assert page.locator("#read-only").is_hidden() and page.locator("#create-section").is_visible()

    # Create with a filter, a max rate and ordering per resource; a filter that is not JSON, or
    # that the server refuses, is said so and creates nothing.
    page.fill("#new-url", rx.url("/controls"))
    page.fill("#new-patterns", "lead.*")
    page.select_option("#new-mode", "immediate")
    page.fill("#new-filter", "{nope")
    page.click("#create-submit")
    page.wait_for_selector("#create-result.error:has-text('Filter: not JSON')")
    page.fill("#new-filter", '{"payload.status": {"$like": "2"}}')
    watch.expected.append("status of 400")
    page.click("#create-submit")
    page.wait_for_selector("#create-result.error:has-text('$like')")
    watch.expected.remove("status of 400")
    page.fill("#new-filter", '{"payload.status": {"$in": ["1", "2"]}}')
    page.fill("#new-max-rate", "5/s")
    page.select_option("#new-ordering", "resource")
    page.click("#create-submit")
    page.wait_for_selector("#create-result:has-text('You are live')")
    ep_id = page.inner_text("#secret-endpoint")
    page.click("#secret-done")
    made = w.api("GET", f"/api/endpoints/{ep_id}").json()
    assert (made["filter"], made["max_rate"], made["ordering"]) == ({"payload.status": {"$in": ["1", "2"]}}, 5, "resource")
    assert [e["url"] for e in w.api("GET", "/api/endpoints").json()["endpoints"]].count(rx.url("/controls")) == 1
    row = f'#endpoints tr[data-endpoint="{ep_id}"]'
    mode = page.locator(f'{row} td[data-label="Mode"]')
    assert "ordered per resource" in mode.inner_text()
    assert page.inner_text(f'[data-rate="{ep_id}"]') == "at most 5/s"
    assert json.loads(page.inner_text(f'[data-filter="{ep_id}"]').removeprefix("filter ")) == made["filter"]

    # Edit: filter and rate (two prompts), then ordering off.
    watch.answers += ['{"payload.status": "2"}', "600/m"]
    page.click(f'button[data-controls="{ep_id}"]')
    page.wait_for_selector(f"#endpoint-result:has-text('Filter and rate of {ep_id} saved')")
    page.wait_for_selector(f'[data-rate="{ep_id}"]:has-text("at most 10/s")')
    page.click(f'button[data-ordering="{ep_id}"]')
    page.wait_for_selector("#status:has-text('ordering none')")
    page.wait_for_selector(f'{row} td[data-label="Mode"]:not(:has-text("ordered per resource"))')
    edited = w.api("GET", f"/api/endpoints/{ep_id}").json()
    assert (edited["filter"], edited["max_rate"], edited["ordering"]) == ({"payload.status": "2"}, 10, "none")
    assert json.loads(page.inner_text(f'[data-filter="{ep_id}"]').removeprefix("filter ")) == edited["filter"]

    # The receiver fails: six matching events (and one the filter leaves out) open the breaker after
    # BREAKER_FAILURES failures; every delivery ends in the DLQ, none is lost.
    failing = [f"b{i}" for i in range(6)]
    with Producer(env.settings) as p:
        p.emit("lead.created", "filtered", {"id": "filtered", "status": "1"}, flush=False)
        for rid in failing:
            p.emit("lead.created", rid, {"id": rid, "status": "2"}, flush=False)
    # Meanwhile, the read token signs in on a second page (checked below, once there is a DLQ).
    ro = browser.new_page(viewport={"width": 1280, "height": 900})
    ro_watch = PageWatch(ro)
    sign_in(ro, w.base, READ_TOKEN)

    def dead() -> int:
        return int(w.api("GET", f"/api/dlq?endpoint={ep_id}").json()["total"])

    eventually(lambda: dead() == len(failing), 60, "the failing deliveries in the DLQ")
    breaker = w.api("GET", f"/api/endpoints/{ep_id}/breaker").json()
    assert breaker["state"] == "open" and breaker["consecutive_failures"] >= BREAKER_FAILURES
    page.click("#refresh")
    page.wait_for_selector(f'{row} [data-breaker="open"]')
    assert page.inner_text(f'{row} td[data-label="Breaker"]').startswith("open")
    page.screenshot(path=str(SHOTS / "controls-breaker-open.png"), full_page=True)

    # The read token: the same data, its scope from the server, and no write control anywhere.
    ro.click("#refresh")
    ro.wait_for_selector(f'{row} [data-breaker="open"]')
    ro.wait_for_selector(f'#dlq tr[data-delivery] td[data-label="Endpoint"]:has-text("{ep_id}")')
    assert ro.locator("#read-only").is_visible()
    assert ro.locator("#create-section").is_hidden() and ro.locator("#replay-all").is_hidden()
    assert ro.locator(f"{row} button").count() >= 6  # rendered, but not shown ...
    assert ro.locator("button.write:visible, #create-section:visible").count() == 0  # ... to this token
    assert ro.locator('#dlq button:visible:has-text("Details")').count() >= 1  # reading stays possible
    ro.screenshot(path=str(SHOTS / "controls-read-only.png"), full_page=True)
    ro.close()
    assert ro_watch.problems == []
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert w.api("GET", "/api/whoami", headers=read).json() == {"scope": "read", "insecure": False}
    assert w.api("GET", "/api/whoami").json()["scope"] == "admin"
    assert w.api("POST", f"/api/endpoints/{ep_id}/enable", headers=read).status_code == 403

    # Disabled from the page: two more are parked, not dropped; the row counts what is parked.
    page.click(f'{row} button:has-text("Disable")')
    page.wait_for_selector(f'{row} td[data-label="Status"]:has-text("disabled")')
    assert w.api("GET", f"/api/endpoints/{ep_id}").json()["enabled"] is False
    with Producer(env.settings) as p:
        for rid in ("p0", "p1"):
            p.emit("lead.created", rid, {"id": rid, "status": "2"}, flush=False)
    eventually(lambda: dead() == len(failing) + 2, 60, "the deliveries parked while disabled")
    parked = len(failing) + 2
    page.click("#refresh")
    page.wait_for_selector(f'{row} td[data-label="Status"]:has-text("{parked} deliveries parked")')

    # The receiver is back: Enable offers the replay (confirmed); every parked delivery arrives once.
    healthy["on"] = True
    page.click(f'{row} button:has-text("Enable")')
    page.wait_for_selector(f"#status:has-text('Replayed {parked} deliveries')")
    page.wait_for_selector(f'{row} td[data-label="Status"]:has-text("enabled")')
    assert w.api("GET", f"/api/endpoints/{ep_id}").json()["enabled"] is True

    def delivered() -> dict[str, int]:
        ids: dict[str, int] = {}
        for x in rx.received("/controls"):
            if x.status == 200:
                ids[x.json["payload"]["id"]] = ids.get(x.json["payload"]["id"], 0) + 1
        return ids

    eventually(lambda: len(delivered()) == parked and dead() == 0, 60, "the replayed deliveries")
    assert delivered() == {rid: 1 for rid in [*failing, "p0", "p1"]}  # none lost, none twice
    assert all(x.json["payload"]["id"] != "filtered" for x in rx.received("/controls"))
    page.click("#refresh")
    page.wait_for_selector(f'{row} [data-breaker="closed"]')  # the change closed it; successes since
    page.screenshot(path=str(SHOTS / "controls-replayed.png"), full_page=True)
    assert watch.problems == []
    page.close()
