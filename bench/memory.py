"""Worker RSS with 10,000 endpoints and a 1k / 10k / 100k backlog waiting in a retry tier.

    .venv/bin/python -m bench.memory [--endpoints 10000] [--backlog 1000,10000,100000]

10,000 endpoints are written to the registry topic (Producer.send, as `endpoints add` does):
10 of them subscribe to `invoice.paid`, the rest to other events. After a warm-up (events
delivered to the 10 matching endpoints), delivery records are produced straight into the first
tier topic while the worker runs with WEBHOOKS_RETRY_SCHEDULE=1h, so none is due: the tier
consumer must read the head of each partition, seek back, pause, and hold nothing. RSS (psutil) is
read once it is steady after each step, then once more after a restart with the whole backlog
waiting. The flat line is the claim: RSS must not grow with the backlog.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import orjson
import psutil

from app import route
from app.delivery import Delivery
from app.events import build_event, parse_event
from app.producer import Producer
from bench.harness import (
    BenchWorker,
    ReceiverProcess,
    invoice,
    kafka,
    machine,
    new_settings,
    print_result,
    register,
    save,
)

MATCHING = 10
# Patterns of the endpoints that do not match invoice.paid (all valid catalog names or globs).
OTHER = ["lead.created", "lead.*", "task.*", "customer.updated", "ticket.*", "project.*", "contract.*"]


def steady_rss(pid: int, settle: float = 3.0, timeout: float = 60.0) -> float:
    """RSS in MiB once it moved less than 1 MiB over `settle` seconds (or at the timeout)."""
    proc = psutil.Process(pid)
    samples: list[float] = []
    deadline = time.monotonic() + timeout
    per = max(1, int(settle / 0.5))
    while time.monotonic() < deadline:
        samples.append(proc.memory_info().rss / 2**20)
        if len(samples) >= per and max(samples[-per:]) - min(samples[-per:]) < 1.0:
            break
        time.sleep(0.5)
    return round(samples[-1], 1)


def tier_lag(worker: BenchWorker, topic: str, want: int, timeout: float = 15.0) -> int | None:
    """The worker's own webhooks_consumer_lag for the tier topic, polled until it reports `want`:
    evidence that its tier consumer is assigned and positioned at the head of the backlog."""
    prefix = f'webhooks_consumer_lag{{topic="{topic}"}} '
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        for line in worker.metrics().splitlines():
            if line.startswith(prefix):
                seen = int(float(line[len(prefix) :]))
        if seen == want:
            break
        time.sleep(0.5)
    return seen


def run(
    endpoints: int = 10000,
    backlog: tuple[int, ...] = (1000, 10000, 100000),
    bootstrap: str | None = None,
    settle: float = 3.0,
) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "endpoints": endpoints, "backlog_steps": list(backlog)}
    with kafka(bootstrap) as bs, ReceiverProcess() as rx:
        s = new_settings(bs, WEBHOOKS_RETRY_SCHEDULE="1h")
        env = {"WEBHOOKS_RETRY_SCHEDULE": "1h"}
        matching = min(MATCHING, endpoints)
        with Producer(s) as p:
            eps = [register(s, rx.url("/mem"), "invoice.paid", "immediate", p) for _ in range(matching)]
            for i in range(endpoints - matching):
                register(s, rx.url("/other"), OTHER[i % len(OTHER)], "immediate", p)
        warm = 20
        rss: dict[str, float] = {}
        lag: dict[str, int | None] = {}
        tier = route.TIERS[0]
        produced = 0
        with BenchWorker(s, name="memory", **env) as w, Producer(s) as p:
            for i in range(warm):
                p.emit("invoice.paid", i, invoice(i), flush=False)
            p.flush()
            rx.wait_for(warm * matching, "/mem", timeout=120)
            rss["0"] = steady_rss(w.pid, settle)
            for target in backlog:
                while produced < target:
                    ep = eps[produced % len(eps)]
                    key, value = build_event("invoice.paid", produced, invoice(produced))
                    raw = orjson.dumps(value)
                    d = Delivery.for_event(parse_event(key.encode(), raw), ep, "async")
                    d.failures = 1
                    p.send(tier, d.resource_key, d.encode())
                    produced += 1
                p.flush(60)
                lag[str(target)] = tier_lag(w, tier, target)
                rss[str(target)] = steady_rss(w.pid, settle)
            delivered_early = rx.count("/mem") - warm * matching
        # A restart with the whole backlog waiting: the cold read must stay flat too.
        with BenchWorker(s, name="memory-restart", **env) as w:
            lag["restart"] = tier_lag(w, tier, produced)
            rss_restart = steady_rss(w.pid, settle)
            delivered_early += rx.count("/mem") - warm * matching
    values = list(rss.values())
    result.update(
        {
            "rss_mib": rss,
            "rss_mib_after_restart_with_backlog": rss_restart,
            "growth_mib_first_to_last_step": round(values[-1] - values[1], 1) if len(values) > 2 else None,
            "tier_lag_reported": lag,
            "record_bytes": len(d.encode()),
            "delivered_before_due": delivered_early,
        }
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoints", type=int, default=10000)
    ap.add_argument("--backlog", default="1000,10000,100000", help="cumulative tier backlog steps")
    args = ap.parse_args(argv)
    steps = tuple(int(x) for x in args.backlog.split(","))
    result = run(endpoints=args.endpoints, backlog=steps)
    path = save("memory", result)
    print_result(
        "worker RSS (10k endpoints, backlog waiting in a tier)",
        result,
        [
            "endpoints", "rss_mib", "rss_mib_after_restart_with_backlog",
            "growth_mib_first_to_last_step", "tier_lag_reported", "record_bytes", "delivered_before_due",
        ],
    )  # fmt: skip
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
