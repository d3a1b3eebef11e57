"""Smart mode under a burst: R resources each saved K times give exactly R deliveries, collapsed=K.

    .venv/bin/python -m bench.smart_burst [--resources 10000] [--saves 5] [--window 2s]

One smart endpoint subscribes to `invoice.*`. The K saves of a resource are produced back to back
(resource after resource), so each resource's saves are well under the window apart, as in a
CRM form saved several times in a row. The bench waits for R deliveries, then for twice the window
plus a second more, so that any extra delivery would be counted, and checks every delivery:
one per resource, `collapsed` == K, carrying the last save's state. Time to drain is from the end
of the burst (last event acknowledged by Kafka) to the last delivery; it cannot be under one
window, since a resource is delivered `window` after its last save.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

import orjson

from app.config import parse_duration
from app.events import build_event
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


def run(
    resources: int = 10000,
    saves: int = 5,
    window: str = "2s",
    bootstrap: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    w = parse_duration(window)
    result: dict[str, Any] = {"machine": machine(), "resources": resources, "saves": saves, "window_s": w}
    with kafka(bootstrap) as bs, ReceiverProcess() as rx:
        s = new_settings(bs)
        register(s, rx.url("/smart"), "invoice.*", "smart")
        # Prepared before the clock starts: the burst is bounded by Kafka, not by JSON encoding.
        records = []
        for r in range(resources):
            for v in range(saves):
                key, value = build_event("invoice.updated", r, invoice(r, version=v))
                records.append((key, orjson.dumps(value)))
        with BenchWorker(s, name="smart", WEBHOOKS_SMART_WINDOW=window, WEBHOOKS_SMART_MAX_WAIT="60s"):
            t0 = time.time()
            with Producer(s) as p:
                for key, raw in records:
                    p.send("crm.events", key, raw)
            burst_end = time.time()
            rx.wait_for(resources, "/smart", timeout=timeout, quiet_after=2 * w + 1)
            stats = rx.stats("/smart")
    arrivals = sorted(stats["arrivals"])
    per_resource = Counter(stats["resources"])
    collapsed = Counter(stats["collapsed"])
    last_state = sum(v == str(saves - 1) for v in stats["versions"])
    result.update(
        {
            "events": resources * saves,
            "burst_s": round(burst_end - t0, 2),
            "deliveries": stats["count"],
            "distinct_resources": len(per_resource),
            "max_per_resource": max(per_resource.values()) if per_resource else 0,
            "collapsed_counts": {str(k): v for k, v in sorted(collapsed.items())},
            "carrying_last_state": last_state,
            "first_delivery_after_burst_s": round(arrivals[0] - burst_end, 2),
            "drain_s": round(arrivals[-1] - burst_end, 2),
            "exact": stats["count"] == resources
            and len(per_resource) == resources
            and collapsed == Counter({saves: resources})
            and last_state == resources,
        }
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.smart_burst", description=__doc__.split("\n\n")[0])
    ap.add_argument("--resources", type=int, default=10000)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--window", default="2s", help="WEBHOOKS_SMART_WINDOW for the worker")
    args = ap.parse_args(argv)
    result = run(resources=args.resources, saves=args.saves, window=args.window)
    path = save("smart_burst", result)
    print_result(
        "smart burst (debounce per resource)",
        result,
        [
            "events", "burst_s", "deliveries", "distinct_resources", "collapsed_counts",
            "carrying_last_state", "first_delivery_after_burst_s", "drain_s", "exact",
        ],
    )  # fmt: skip
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
