"""Worker RSS with an empty DLQ and with 100,000 DLQ entries of ~10 KB each.

    .venv/bin/python -m bench.dlq_memory [--entries 100000] [--size 10240]

Every worker follows the whole `webhooks.dlq` topic. It keeps an index of each entry (delivery id,
endpoint, event, reason, times, attempt count, partition/offset: app/observe.py) and reads payloads
from Kafka only when asked (admin show, list pages, replay). The claim: RSS with the full DLQ stays
within +64 MiB of the empty one, also after a restart that reads the whole topic cold.
Entries are written straight to `webhooks.dlq` (as the dispatcher parks them: a delivery record
with 9 attempts, a `dlq_reason` and a `dead_at`); RSS (psutil) is read once steady.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import orjson

from app.delivery import Delivery, new_delivery_id
from app.producer import Producer
from bench.harness import BenchWorker, kafka, machine, new_settings, print_result, save
from bench.memory import steady_rss

CLAIM_MIB = 64


def dlq_size(worker: BenchWorker) -> int:
    for line in worker.metrics().splitlines():
        if line.startswith("webhooks_dlq_size "):
            return int(float(line.split()[1]))
    return -1


def wait_size(worker: BenchWorker, want: int, timeout: float) -> float:
    started = time.monotonic()
    while dlq_size(worker) != want:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the worker's DLQ view did not reach {want} (at {dlq_size(worker)})")
        time.sleep(1)
    return round(time.monotonic() - started, 1)


def entry(i: int, size: int) -> dict[str, Any]:
    attempts = [
        {"at": 1767225600.0 + n, "status": 500, "outcome": "http_error", "latency_ms": 12.5, "error": "HTTP 500"}
        for n in range(9)
    ]
    d = Delivery(
        id=new_delivery_id(),
        endpoint_id=f"ep_{i % 50:016x}",
        event="invoice.paid",
        event_id=f"evt_{i:020d}",
        occurred_at="2026-01-01T00:00:00Z",
        occurred_ts=1767225600.0,
        resource_key=f"invoice:{i}",
        data={"id": str(i), "blob": ""},
        failures=9,
        attempts=attempts,
    )
    rec = {**d.record(), "dlq_reason": "retries_exhausted", "dead_at": time.time()}
    rec["data"]["blob"] = "x" * max(0, size - len(orjson.dumps(rec)))
    return rec


def run(entries: int = 100_000, size: int = 10_240, bootstrap: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "entries": entries, "entry_bytes": size}
    with kafka(bootstrap) as bs:
        s = new_settings(bs)
        with BenchWorker(s, name="dlq-memory") as w:
            rss_empty = steady_rss(w.pid)
            started = time.monotonic()
            with Producer(s) as p:
                for i in range(entries):
                    rec = entry(i, size)
                    p.send("webhooks.dlq", rec["id"], rec)
                    if i % 5000 == 4999:
                        p.flush(120)
                p.flush(120)
            result["produce_s"] = round(time.monotonic() - started, 1)
            result["view_caught_up_s"] = wait_size(w, entries, timeout=900)
            rss_full = steady_rss(w.pid)
        with BenchWorker(s, name="dlq-memory-restart") as w:  # the whole DLQ read cold at start
            result["restart_caught_up_s"] = wait_size(w, entries, timeout=900)
            rss_restart = steady_rss(w.pid)
    result.update(
        {
            "rss_mib_empty": rss_empty,
            "rss_mib_full": rss_full,
            "rss_mib_after_restart": rss_restart,
            "growth_mib": round(rss_full - rss_empty, 1),
            "growth_mib_after_restart": round(rss_restart - rss_empty, 1),
            "claim_mib": CLAIM_MIB,
            "within_claim": max(rss_full, rss_restart) - rss_empty <= CLAIM_MIB,
        }
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.dlq_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=10_240, help="bytes per DLQ entry")
    args = ap.parse_args(argv)
    result = run(entries=args.entries, size=args.size)
    path = save("dlq_memory", result)
    print_result(
        "worker RSS: empty DLQ vs a full one (index in memory, payloads in Kafka)",
        result,
        [
            "entries", "entry_bytes", "rss_mib_empty", "rss_mib_full", "rss_mib_after_restart",
            "growth_mib", "growth_mib_after_restart", "within_claim", "produce_s", "view_caught_up_s",
            "restart_caught_up_s",
        ],
    )  # fmt: skip
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
