"""Registry versions (issue 11 item 5): no registry write undoes another it never saw.

Two real worker processes on one real broker. A secret rotation made through worker A survives a
change based on the version before it, whether that change comes through worker B's API, a stale
record in the topic, the CLI or racing writers; a 410 Gone that races an update keeps both.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from app import route
from app.config import Settings
from app.endpoints import StaleWrite, read_endpoints, update_endpoint, write_endpoint
from app.producer import Producer
from app.signing import verify_hex
from app.topic_tables import read_table
from tests.helpers import cli, cli_json, eventually, metric
from tests.receiver import Receiver, Reply
from tests.workers import OUTPUT, WorkerProcess


def read_all_values(settings: Settings, ep_id: str) -> list[dict[str, Any]]:
    """Every record of `ep_id` in the registry topic, in order (before any compaction)."""
    seen: list[dict[str, Any]] = []
    read_table(settings, route.ENDPOINTS, on_record=lambda k, v: seen.append(v) if k == ep_id and v else None)
    return seen


def two_workers(settings: Settings, workers: Any) -> tuple[WorkerProcess, WorkerProcess]:
    data = OUTPUT / "faust-data" / f"{settings.topic_prefix}versions"
    a = workers("a", start=False, WEBHOOKS_DATA_DIR=str(Path(data, "a")))
    b = workers("b", start=False, WEBHOOKS_DATA_DIR=str(Path(data, "b")))
    a.start(wait=False)
    b.start(wait=False)
    a.wait_ready(90)
    b.wait_ready(90)
    return a, b


def show(w: WorkerProcess, ep_id: str) -> dict[str, Any]:
    r = w.api("GET", f"/api/endpoints/{ep_id}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_registry_writes_based_on_a_stale_version_are_refused(
    settings: Settings, receiver: Receiver, workers: Any
) -> None:
    """One pair of workers for every case (starting workers is most of the cost)."""
    a, b = two_workers(settings, workers)
    t0 = time.monotonic()
    rotation_on_one_worker_survives_stale_writes_everywhere(settings, receiver, a, b)
    t1 = time.monotonic()
    disable_by_410_racing_an_update_keeps_both(settings, receiver, a, b)
    print(f"rotation and stale writes {t1 - t0:.1f}s, 410 race {time.monotonic() - t1:.1f}s")


def rotation_on_one_worker_survives_stale_writes_everywhere(
    settings: Settings, receiver: Receiver, a: WorkerProcess, b: WorkerProcess
) -> None:
    r = a.api("POST", "/api/endpoints", json={"url": receiver.url("/hook"), "events": "invoice.*", "mode": "immediate"})
    assert r.status_code == 201, r.text
    ep_id, first_secret = r.json()["id"], r.json()["secret"]
    assert r.json()["version"] == 1
    eventually(lambda: b.api("GET", f"/api/endpoints/{ep_id}").status_code == 200, 10, "B to see the endpoint")
    stale = read_endpoints(settings)[ep_id]  # what a writer read before the rotation
    assert stale.version == 1

    r = a.api("POST", f"/api/endpoints/{ep_id}/rotate-secret", json={"grace": 0})
    assert r.status_code == 200, r.text
    rotated = r.json()
    new_secret = rotated["secret"]
    assert rotated["version"] == 2 and new_secret != first_secret

    # B's API, told the version its client read before the rotation: 409, nothing written.
    r = b.api("PATCH", f"/api/endpoints/{ep_id}", json={"description": "stale"}, headers={"If-Match": '"1"'})
    assert r.status_code == 409, r.text
    assert "changed by another writer" in r.json()["error"] and "version 2" in r.json()["error"]
    r = b.api("POST", f"/api/endpoints/{ep_id}/disable", headers={"If-Match": "1"})
    assert r.status_code == 409, r.text

    # A writer whose view was a moment stale puts its record in the topic anyway (Kafka has no
    # compare-and-set): version 2, the old secret, the old state. Every reader ignores it.
    with Producer(settings) as p:
        stale_write = update_endpoint(settings, stale, {"description": "stale write"}).next_version()
        p.send(route.ENDPOINTS, ep_id, stale_write.record())
    for w in (a, b):
        now = show(w, ep_id)  # each worker first catches up with every acknowledged write
        assert (now["version"], now["description"], now["grace_secret_active"]) == (2, "", False), now
    assert read_endpoints(settings)[ep_id].secret == new_secret  # the CLI's reader
    assert cli_json(settings, "endpoints", "show", ep_id)["version"] == 2
    assert read_table(settings, route.ENDPOINTS)[ep_id]["description"] == "stale write"  # it is in the topic

    # The CLI writing from its stale read: refused, the rotation written again after its record.
    with pytest.raises(StaleWrite, match="now at version 2"):
        write_endpoint(settings, ep_id, stale.changed(enabled=False))
    last = read_table(settings, route.ENDPOINTS)[ep_id]  # what a reader sees once compaction has run
    assert (last["version"], last["secret"], last["enabled"]) == (2, new_secret, True)
    res = cli(settings, "endpoints", "disable", ep_id, "--if-version", "1")
    assert res.exit_code == 1, res.output
    assert f"endpoint {ep_id} was changed by another writer (it is now at version 2)" in res.output
    res = cli(settings, "endpoints", "rotate-secret", ep_id, "--if-version", "1")
    assert res.exit_code == 1 and "now at version 2" in res.output, res.output

    # Deliveries, from whichever worker fans out, are signed with the rotated secret only.
    with Producer(settings) as p:
        p.emit("invoice.paid", "77", {"id": "77"})
    got = receiver.wait_for(1, "/hook")[0]
    assert verify_hex(got.body, got.header("X-PerfexAPI-Signature") or "", [new_secret])
    assert not verify_hex(got.body, got.header("X-PerfexAPI-Signature") or "", [first_secret])

    # Racing writers on both workers, no If-Match: each answer is 200 or 409; every 200 got its own
    # version, and every reader ends on the last of them.
    answers: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def writer(w: WorkerProcess, name: str) -> None:
        for i in range(4):
            r = w.api("PATCH", f"/api/endpoints/{ep_id}", json={"description": f"{name}{i}"})
            with lock:
                answers.append((r.status_code, r.json()))

    threads = [threading.Thread(target=writer, args=(w, n)) for w, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 8 and {s for s, _ in answers} <= {200, 409}, answers
    won = sorted(doc["version"] for s, doc in answers if s == 200)
    assert won == list(range(3, 3 + len(won))), answers  # no version given out twice, no gaps
    final = max((doc for s, doc in answers if s == 200), key=lambda d: d["version"])
    for w in (a, b):
        now = show(w, ep_id)
        assert (now["version"], now["description"]) == (final["version"], final["description"])
    ep = read_endpoints(settings)[ep_id]
    assert (ep.version, ep.description, ep.secret) == (final["version"], final["description"], new_secret)
    print(f"racing writers: {len(won)} x 200, {8 - len(won)} x 409")


def disable_by_410_racing_an_update_keeps_both(
    settings: Settings, receiver: Receiver, a: WorkerProcess, b: WorkerProcess
) -> None:
    r = a.api("POST", "/api/endpoints", json={"url": receiver.url("/gone"), "events": "lead.deleted", "mode": "immediate"})
    assert r.status_code == 201, r.text
    ep_id = r.json()["id"]
    eventually(lambda: b.api("GET", f"/api/endpoints/{ep_id}").status_code == 200, 10, "B to see the endpoint")
    patched: list[int] = []

    def gone(n: int) -> Reply:
        # While the delivering worker waits for this answer, an admin changes the endpoint through
        # the other worker: the worker that gets the 410 may still hold version 1.
        if n == 1:
            for w in (a, b):
                r = w.api("PATCH", f"/api/endpoints/{ep_id}", json={"description": f"patched on {w.port}"})
                patched.append(r.status_code)
        return Reply(410, body=b"gone")

    receiver.on("/gone", gone)
    with Producer(settings) as p:
        p.emit("lead.deleted", "9", {"id": "9"})
    receiver.wait_for(1, "/gone")

    def settled(w: WorkerProcess) -> dict[str, Any] | None:
        now = show(w, ep_id)
        return now if not now["enabled"] else None

    for w in (a, b):
        now = eventually(lambda w=w: settled(w), 20, "the endpoint disabled by the 410")
        assert now["disabled_reason"] == "410 Gone from the endpoint", now
        assert now["description"] == f"patched on {b.port}" and now["version"] == 4, now
    assert patched == [200, 200]
    ep = read_endpoints(settings)[ep_id]
    assert (ep.enabled, ep.description, ep.version) == (False, f"patched on {b.port}", 4)
    assert sum(metric(w.metrics(), "webhooks_endpoints_disabled_total") for w in (a, b)) == 1
    assert len(receiver.received("/gone")) == 1


def test_410_disable_based_on_a_stale_view_re_reads_and_retries(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The dispatcher's own write loses (its view is deterministically stale: the update below is
    produced while the event loop is blocked, so the registry follower cannot have read it), and the
    disable is made again on top of the update."""
    from app.delivery import HttpSender
    from app.dispatch import Dispatcher
    from app.endpoints import Registry, create_endpoint
    from app.outbox import Outbox
    from app.topics import apply

    apply(settings)
    local = replace(settings, allow_private_targets=True)  # the URL is never called
    ep = create_endpoint(local, url="http://127.0.0.1:9/gone", events="lead.*", mode="immediate")

    async def go() -> None:
        registry, outbox = Registry(settings), Outbox(settings)
        await asyncio.gather(registry.start(), outbox.start())
        try:
            written = await registry.write(ep.id, ep, lambda rec: outbox.publish(route.ENDPOINTS, ep.id, rec))
            assert written is not None and written.version == 1
            update = update_endpoint(local, written, {"description": "updated"}).next_version()
            with Producer(settings) as p:  # another writer, based on version 1 too
                p.send(route.ENDPOINTS, ep.id, update.record())
            assert registry.get(ep.id) == written  # the view does not have the update yet
            dispatcher = Dispatcher(settings, registry, HttpSender(settings), outbox)
            await dispatcher.disable_endpoint(ep.id, "410 Gone from the endpoint")
            now = registry.get(ep.id)
            assert now is not None
            assert (now.version, now.enabled, now.description) == (3, False, "updated"), now
        finally:
            await outbox.stop()
            await registry.stop()

    with caplog.at_level("INFO", logger="app.dispatch"):
        asyncio.run(go())
    assert any("re-reading" in r.getMessage() for r in caplog.records), "the first disable did not lose"
    final = read_endpoints(settings)[ep.id]
    assert (final.version, final.enabled, final.description) == (3, False, "updated")
    assert final.disabled_reason == "410 Gone from the endpoint"
    versions = [r["version"] for r in read_all_values(settings, ep.id)]
    assert versions == [1, 2, 2, 2, 3], versions  # the update, our lost disable, the update again
