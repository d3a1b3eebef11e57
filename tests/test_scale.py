"""Horizontal scale on the real broker: a second worker joins and the first leaves while events flow.

What is proven (SPEC §5, at-least-once):
- immediate and async: every event produced is delivered to each endpoint (the set of event ids
  received equals the set produced); duplicates (a record re-read after a rebalance) are counted,
  allowed, and reported, and carry the same delivery id as the first delivery of that event.
- the fan-out keeps each resource's order across both handovers: in `webhooks.deliveries` the
  first delivery of each event of a resource comes after the first delivery of the event before it
  (a record re-read after a rebalance may repeat deliveries, never overtake them). Ordered delivery
  per resource (app/ordering.py) starts from this order.
- smart: bursts on a few resources straddle both handovers (B joining, A leaving on SIGTERM). The
  pending items live in a changelogged table and flush markers travel in the resource's own
  partition, behind every event produced before them, so a burst whose saves are closer than the
  window is never cut short: EVERY smart delivery of a burst carries the burst's final state, and
  at least one of them merges the whole burst (collapsed >= burst length). A second delivery of
  a burst can legitimately happen: the old owner flushed it but had not committed the offsets of
  the burst's last events when it lost the partition; the new owner re-reads those events and
  flushes them again (final state again, smaller count, so another delivery id). Such duplicates are
  counted and reported, never a partial delivery without the final state.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from app import route
from app.config import Settings
from app.delivery import Delivery
from app.producer import Producer
from tests.helpers import metric_value, parse_metrics, read_to_end, register
from tests.receiver import Receiver
from tests.workers import OUTPUT, WorkerProcess

pytestmark = pytest.mark.kafka

BURST_GAP = 0.15  # seconds between saves of one burst: well inside the window
WINDOW = "1s"
STEADY_GAP = 0.04  # ~25 events/s of steady traffic for the immediate and async endpoints


class Load(threading.Thread):
    """Steady invoice events, plus smart bursts on tickets that run from `burst` to `end`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True, name="scale-load")
        self.settings = settings
        self.sent: list[str] = []  # invoice event ids
        self.sent_info: dict[str, tuple[str, float]] = {}  # event id -> (key, monotonic time sent)
        self.saves: dict[str, int] = {}  # ticket id -> saves produced
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def burst(self, ids: list[str]) -> None:
        with self._lock:
            for i in ids:
                self.saves[i] = 0
                self._active.add(i)

    def end(self, ids: list[str]) -> None:
        with self._lock:
            self._active.difference_update(ids)

    def run(self) -> None:
        try:
            with Producer(self.settings) as p:
                n = 0
                next_burst = time.monotonic()
                while not self._halt.is_set():
                    rid = f"s{n % 24}"
                    ev = p.emit("invoice.updated", rid, {"id": rid, "seq": str(n)}, flush=False)
                    self.sent.append(ev["id"])
                    self.sent_info[ev["id"]] = (f"invoice:{rid}", time.monotonic())
                    n += 1
                    if time.monotonic() >= next_burst:
                        next_burst = time.monotonic() + BURST_GAP
                        with self._lock:
                            active = sorted(self._active)
                        for t in active:
                            k = self.saves[t]
                            p.emit("ticket.updated", t, {"id": t, "n": str(k)}, flush=False)
                            with self._lock:
                                self.saves[t] = k + 1
                    p.flush()  # every save is on the broker before the next one is timed
                    time.sleep(STEADY_GAP)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


def consumed(w: WorkerProcess, event: str) -> float:
    return metric_value(parse_metrics(w.metrics()), "webhooks_events_consumed_total", event=event) or 0.0


def wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_second_worker_joins_first_leaves_nothing_lost(
    settings: Settings, receiver: Receiver, workers
) -> None:
    register(settings, receiver, "/immediate", "invoice.*", "immediate")
    async_ep = register(settings, receiver, "/async", "invoice.*", "async")
    register(settings, receiver, "/smart", "ticket.*", "smart")
    env = {"WEBHOOKS_SMART_WINDOW": WINDOW, "WEBHOOKS_SMART_MAX_WAIT": "120s"}
    data = OUTPUT / "faust-data" / f"{settings.topic_prefix}scale"
    a = workers("a", WEBHOOKS_DATA_DIR=str(Path(data, "a")), **env)
    load = Load(settings)
    load.start()
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    joining = [f"join{i}" for i in range(6)]
    leaving = [f"leave{i}" for i in range(6)]
    try:
        wait_until(lambda: consumed(a, "invoice.updated") > 20, 30, "worker A to consume")

        # B joins. The first bursts run from before B starts until B consumes, i.e. through the
        # rebalance in which every partition is revoked and reassigned.
        load.burst(joining)
        b = workers("b", start=False, WEBHOOKS_DATA_DIR=str(Path(data, "b")), **env)
        b.start(wait=False)
        b.wait_ready(90)
        marks["b_assigned"] = time.monotonic() - t0
        wait_until(lambda: consumed(b, "ticket.updated") > 0, 30, "worker B to consume bursts")
        load.end(joining)

        # A leaves (SIGTERM: graceful shutdown, LeaveGroup) in the middle of the second bursts.
        load.burst(leaving)
        before = consumed(a, "ticket.updated") + consumed(b, "ticket.updated")
        wait_until(
            lambda: (
                consumed(a, "ticket.updated") + consumed(b, "ticket.updated") >= before + 3 * len(leaving)
            ),
            30,
            "the second bursts to be consumed",
        )
        marks["a_sigterm"] = time.monotonic() - t0
        a.stop()
        marks["a_gone"] = time.monotonic() - t0
        after = consumed(b, "ticket.updated")
        wait_until(lambda: consumed(b, "ticket.updated") >= after + 2 * len(leaving), 30, "B to take over")
        load.end(leaving)
        marks["load_end"] = time.monotonic() - t0
    finally:
        load.stop()
    assert load.error is None, load.error
    assert len(load.sent) > 100

    expected = set(load.sent)

    def ids(path: str) -> Counter[str]:
        return Counter(r.json["event_id"] for r in receiver.received(path))

    def missing(path: str) -> str:
        from aiokafka.partitioner import murmur2

        lost = sorted(expected - set(ids(path)), key=lambda e: load.sent_info[e][1])
        rows = [
            f"{e} key={load.sent_info[e][0]} partition={(murmur2(load.sent_info[e][0].encode()) & 0x7FFFFFFF) % 12}"
            f" sent_at={load.sent_info[e][1] - t0:.2f}s"
            for e in lost[:20]
        ]
        return f"{len(lost)} of {len(expected)} events never reached {path} (marks {marks}):\n" + "\n".join(
            rows
        )

    for path in ("/immediate", "/async"):
        try:
            wait_until(lambda p=path: expected <= set(ids(p)), 60, f"every event delivered to {path}")
        except AssertionError:
            raise AssertionError(missing(path)) from None
    # Each burst is flushed one window after its last save; wait for all of them.
    wait_until(
        lambda: {r.json["payload"]["id"] for r in receiver.received("/smart")} >= set(load.saves),
        30,
        "a smart delivery for every burst",
    )
    marks["delivered"] = time.monotonic() - t0

    report = []
    for path in ("/immediate", "/async"):
        got = ids(path)
        assert set(got) == expected, f"{path}: unexpected event ids {set(got) - expected}"
        ids_per_event: dict[str, set[str]] = {}
        for r in receiver.received(path):
            ids_per_event.setdefault(r.json["event_id"], set()).add(r.json["id"])
        renamed = {e: d for e, d in ids_per_event.items() if len(d) > 1}
        assert not renamed, f"{path}: duplicates must carry the same delivery id: {renamed}"
        report.append(f"{path}: {len(expected)} events, {sum(got.values()) - len(got)} duplicate deliveries")

    # The fan-out's output order per resource: each event's first delivery to the async endpoint
    # in `webhooks.deliveries` (one partition per resource) comes after its predecessor's.
    first_seen: dict[str, list[int]] = {}
    for m in read_to_end(settings, route.DELIVERIES):
        d = Delivery.decode(m.value())
        if d.endpoint_id == async_ep.id:
            seqs = first_seen.setdefault(d.resource_key, [])
            if int(d.data["seq"]) not in seqs:
                seqs.append(int(d.data["seq"]))
    overtaken = {k: v for k, v in first_seen.items() if v != sorted(v)}
    assert not overtaken, f"the fan-out published a resource's events out of order: {overtaken}"
    assert sum(len(v) for v in first_seen.values()) == len(expected)

    smart: dict[str, dict[str, dict]] = {}
    for r in receiver.received("/smart"):
        smart.setdefault(r.json["payload"]["id"], {})[r.json["id"]] = r.json  # same id twice: one delivery
    cut_short = []
    for ticket, saves in load.saves.items():
        deliveries = list(smart.get(ticket, {}).values())
        assert deliveries, f"burst {ticket}: no smart delivery"
        for d in deliveries:
            if d["payload"]["n"] != str(saves - 1):
                cut_short.append(f"{ticket}: delivery {d['id']} carries save {d['payload']['n']} of {saves}")
        merged = [d.get("collapsed", 1) for d in deliveries]
        assert max(merged) >= saves, f"burst {ticket}: no delivery merges all {saves} saves: {merged}"
        if len(deliveries) > 1:
            report.append(f"smart {ticket}: {len(deliveries)} deliveries, collapsed {merged}")
    assert not cut_short, "bursts cut short across a handover:\n" + "\n".join(cut_short)
    report.append(
        f"smart: {len(load.saves)} bursts of {sorted(load.saves.values())} saves, "
        f"{sum(len(v) for v in smart.values())} distinct deliveries"
    )
    print("\n".join(report))
    print({k: round(v, 1) for k, v in marks.items()})
