"""Immediate-mode latency: `occurred_at` to receipt, at a steady rate, with a same-run floor.

    .venv/bin/python -m bench.immediate_latency [--rate 200] [--seconds 20]

One immediate endpoint; a paced producer (app.producer.Producer.emit, which produces and waits
for the broker's ack, as the Python API does for each CRM save) emits `invoice.updated` at
`--rate` events/s. The receiver (its own process) notes time.time() on arrival and the bench
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
import time
from typing import Any

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


def _measured(stats: dict[str, Any]) -> list[float]:
    return [
        lat
        for lat, rid in zip(stats["latencies"], stats["resources"], strict=True)
        if not rid.startswith("w")
    ]


def run(
    rate: float = 200.0, seconds: float = 20.0, bootstrap: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    n = int(rate * seconds)
    result: dict[str, Any] = {"machine": machine(), "rate_per_s": rate, "seconds": seconds, "events": n}
    with kafka(bootstrap) as bs, ReceiverProcess() as rx:
        s = new_settings(bs)
        ep = register(s, rx.url("/immediate"), "invoice.*", "immediate")
        floor = subprocess.Popen(
            [
                sys.executable, "-m", "bench.floor_consumer", "--bootstrap", bs,
                "--topic", s.topic("crm.events"), "--url", rx.url("/floor"),
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
            with BenchWorker(s, name="immediate", profile=profile), Producer(s) as p:
                # Warm-up (resource ids w*): connections, caches, first fetches; not measured.
                for i in range(WARMUP):
                    p.emit("invoice.updated", f"w{i}", {**invoice(i), "id": f"w{i}"})
                rx.wait_for(WARMUP, "/immediate", timeout=60)
                rx.wait_for(WARMUP, "/floor", timeout=60)
                start = time.perf_counter()
                late = 0
                for i in range(n):
                    due = start + i / rate
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    elif wait < -0.005:
                        late += 1
                    p.emit("invoice.updated", i, invoice(i))
                produced_in = time.perf_counter() - start
                rx.wait_for(WARMUP + n, "/immediate", timeout=120)
                rx.wait_for(WARMUP + n, "/floor", timeout=120)
                worker = _measured(rx.stats("/immediate"))
                base = _measured(rx.stats("/floor"))
        finally:
            os.killpg(floor.pid, 15)
            floor.wait(10)
    w, f = _summary(worker), _summary(base)
    result.update(
        {
            "achieved_rate_per_s": round(n / produced_in, 1),
            "late_sends": late,
            "worker": w,
            "floor": f,
            "p50_over_floor": round(w["p50_ms"] / f["p50_ms"], 2),
            "p99_over_floor": round(w["p99_ms"] / f["p99_ms"], 2),
            "deliveries": len(worker),
            "targets": {"p50_ms": 10, "p99_ms": 50},
        }
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.immediate_latency", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--profile", help="run the worker under pyinstrument; write the report here")
    args = ap.parse_args(argv)
    result = run(rate=args.rate, seconds=args.seconds, profile=args.profile)
    path = save("immediate_latency", result)
    print_result(
        "immediate latency (occurred_at -> receipt)",
        result,
        [
            "events",
            "achieved_rate_per_s",
            "late_sends",
            "worker",
            "floor",
            "p50_over_floor",
            "p99_over_floor",
        ],
    )
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
