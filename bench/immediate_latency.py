"""Immediate-mode latency: `occurred_at` to receipt, at a steady rate, with a same-run floor.

    .venv/bin/python -m bench.immediate_latency [--rate 200] [--seconds 20] [--warmup 3]

One immediate endpoint; a paced producer (app.producer.Producer.emit, which produces and waits
for the broker's ack, as the Python API does for each CRM save) emits `invoice.updated` at
`--rate` events/s, first for `--warmup` seconds (not measured), then for `--seconds`. The
receiver (its own process) notes time.time() on arrival and the bench
subtracts the body's `occurred_at` (same machine clock; occurred_at has millisecond resolution,
truncated, so a latency reads up to 1 ms high). Beside the worker, bench/floor_consumer.py reads
the same events with a bare aiokafka consumer and posts them: the floor any Kafka-fed deliverer
pays on this machine at that moment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from app.producer import Producer
from bench.harness import (
    REPO,
    BenchWorker,
    ReceiverProcess,
    invoice,
    kafka,
    machine,
    new_settings,
    percentile,
    print_result,
    register,
    save,
)

WARMUP = 20


def _summary(latencies_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies_s]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
    }


def _timeline(stats: dict[str, Any]) -> list[list[float]]:
    """[second of the run, p50 ms, max ms] per second of event time: shows when a tail happened."""
    rows = [
        (at - lat, lat)
        for at, lat, rid in zip(stats["arrivals"], stats["latencies"], stats["resources"], strict=True)
        if not rid.startswith("w")
    ]
    if not rows:
        return []
    t0 = min(t for t, _ in rows)
    per: dict[int, list[float]] = {}
    for t, lat in rows:
        per.setdefault(int(t - t0), []).append(lat * 1000)
    return [[s, round(percentile(v, 50), 1), round(max(v), 1)] for s, v in sorted(per.items())]


def _measured(stats: dict[str, Any]) -> list[float]:
    return [
        lat
        for lat, rid in zip(stats["latencies"], stats["resources"], strict=True)
        if not rid.startswith("w")
    ]


def _paced(
    p: Producer, rate: float, ids: list[str], acks: dict[str, tuple[float, float]] | None = None
) -> tuple[float, int]:
    """Emit one event per id at `rate`/s on an absolute schedule; (seconds taken, late sends).
    `acks` gets each id's (time.time() before the produce, time.time() once the broker acked it)."""
    start = time.perf_counter()
    late = 0
    for i, rid in enumerate(ids):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.005:
            late += 1
        sent = time.time()
        p.emit("invoice.updated", rid, {**invoice(i), "id": rid})
        if acks is not None:
            acks[rid] = (sent, time.time())
    return time.perf_counter() - start, late


def _floor_parts(
    acks: dict[str, tuple[float, float]], consumed: dict[str, float], stats: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """The floor split in three, per event (p50/p99 ms each): produce -> broker ack (what `emit`
    waits for), ack -> the floor consumer has it, and consumed -> the receiver has the POST.
    (A consumer may see a record a moment before the producer's process has its ack: the middle
    part can be slightly negative.)"""
    arrivals = dict(zip(stats["resources"], stats["arrivals"], strict=True))
    parts: dict[str, list[float]] = {"produce_ack": [], "ack_to_consume": [], "consume_to_receipt": []}
    for rid, (sent, acked) in acks.items():
        got, arrived = consumed.get(rid), arrivals.get(rid)
        if got is None or arrived is None:
            continue
        parts["produce_ack"].append((acked - sent) * 1000)
        parts["ack_to_consume"].append((got - acked) * 1000)
        parts["consume_to_receipt"].append((arrived - got) * 1000)
    return {
        name: {"p50_ms": round(percentile(v, 50), 2), "p99_ms": round(percentile(v, 99), 2)}
        for name, v in parts.items()
        if v
    }


def _consumed(path: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rid, _, at = line.strip().partition(" ")
            if at:
                out.setdefault(rid, float(at))
    return out


def run(
    rate: float = 200.0,
    seconds: float = 20.0,
    warmup: float = 3.0,
    bootstrap: str | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    n = int(rate * seconds)
    n_warm = max(WARMUP, int(rate * warmup))
    result: dict[str, Any] = {
        "machine": machine(),
        "rate_per_s": rate,
        "seconds": seconds,
        "warmup_seconds": warmup,
        "events": n,
    }
    acks: dict[str, tuple[float, float]] = {}
    with kafka(bootstrap) as bs, ReceiverProcess() as rx, tempfile.TemporaryDirectory() as tmp:
        s = new_settings(bs)
        ep = register(s, rx.url("/immediate"), "invoice.*", "immediate")
        times = os.path.join(tmp, "consumed.txt")
        floor = subprocess.Popen(
            [
                sys.executable, "-m", "bench.floor_consumer", "--bootstrap", bs,
                "--topic", s.topic("crm.events"), "--url", rx.url("/floor"), "--times", times,
            ],
            cwd=REPO,
            env={**os.environ, "BENCH_FLOOR_SECRET": ep.secret},
            stdout=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert floor.stdout is not None
            if floor.stdout.readline().strip() != b"ready":
                raise RuntimeError("floor consumer did not start")
            with BenchWorker(s, name="immediate", profile=profile) as wk, Producer(s) as p:
                # Warm-up at the same pace (resource ids w*), not measured: a broker just started
                # and a worker's first seconds under load (JIT, connections, fetch sessions) show
                # stalls of 100+ ms that are not the steady state this bench is about.
                _paced(p, rate, [f"w{i}" for i in range(n_warm)])
                rx.wait_for(n_warm, "/immediate", timeout=60)
                rx.wait_for(n_warm, "/floor", timeout=60)
                procs = {"worker": psutil.Process(wk.pid), "floor": psutil.Process(floor.pid)}
                cpu0 = {k: v.cpu_times() for k, v in procs.items()}
                produced_in, late = _paced(p, rate, [str(i) for i in range(n)], acks)
                rx.wait_for(n_warm + n, "/immediate", timeout=120)
                rx.wait_for(n_warm + n, "/floor", timeout=120)
                cpu1 = {k: v.cpu_times() for k, v in procs.items()}
                w_stats, f_stats = rx.stats("/immediate"), rx.stats("/floor")
                worker, base = _measured(w_stats), _measured(f_stats)
        finally:
            os.killpg(floor.pid, 15)
            floor.wait(10)
        parts = _floor_parts(acks, _consumed(times), f_stats)
    w, f = _summary(worker), _summary(base)
    result.update(
        {
            "achieved_rate_per_s": round(n / produced_in, 1),
            "late_sends": late,
            "worker": w,
            "floor": f,
            "floor_parts": parts,
            "worker_over_50ms": sum(x > 0.05 for x in worker),
            # CPU per event while measuring: the whole worker process vs the bare floor consumer.
            "cpu_ms_per_event": {
                k: round((cpu1[k].user + cpu1[k].system - cpu0[k].user - cpu0[k].system) * 1000 / n, 3)
                for k in cpu0
            },
            "p50_over_floor": round(w["p50_ms"] / f["p50_ms"], 2),
            "p99_over_floor": round(w["p99_ms"] / f["p99_ms"], 2),
            "deliveries": len(worker),
            "timeline_worker": _timeline(w_stats),
            "timeline_floor": _timeline(f_stats),
            "targets": {"p50_ms": 2, "p99_ms": 4, "p99_over_floor": 1.5},
        }
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.immediate_latency", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds at the same rate, not measured")
    ap.add_argument("--profile", help="run the worker under pyinstrument; write the report here")
    args = ap.parse_args(argv)
    result = run(rate=args.rate, seconds=args.seconds, warmup=args.warmup, profile=args.profile)
    path = save("immediate_latency", result)
    print_result(
        "immediate latency (occurred_at -> receipt)",
        result,
        [
            "events", "warmup_seconds", "achieved_rate_per_s", "late_sends", "worker", "floor",
            "floor_parts", "worker_over_50ms", "cpu_ms_per_event", "p50_over_floor", "p99_over_floor",
        ],
    )  # fmt: skip
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
