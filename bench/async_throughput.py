"""Async-mode throughput of ONE worker against a bare aiohttp client, same receiver, same run.

    .venv/bin/python -m bench.async_throughput [--events 20000] [--concurrency 64]

N `invoice.updated` events are produced to `crm.events` before the worker starts; one async
endpoint subscribes to them. The worker's rate is (N-1) / (last receipt - first receipt) at the
receiver (a separate process). The baseline posts the same bodies, each serialised and signed
per request exactly as the worker does (Delivery.body -> app.signing.dumps, build_headers), from a
bare aiohttp client with the same number of requests in flight, to the same receiver; it runs
once before and once after the worker, and the ratio uses their mean.

`--stage deliveries` produces the delivery records the fan-out would write straight to
`webhooks.deliveries` instead, to measure the delivery agent alone; `--loglevel` is the worker's.
`--profile FILE` (pyinstrument, or cProfile for .prof) and `--py-spy FILE` show where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

import aiohttp
import orjson
import psutil

from app.delivery import Delivery
from app.endpoints import Endpoint
from app.events import build_event, parse_event
from app.producer import Producer
from app.signing import build_headers, verify
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

EVENT = "invoice.updated"


def _rate(stats: dict[str, Any]) -> float:
    arrivals = sorted(stats["arrivals"])
    span = arrivals[-1] - arrivals[0]
    return (len(arrivals) - 1) / span if span > 0 else float("nan")


async def _baseline(url: str, deliveries: list[Delivery], ep: Endpoint, concurrency: int) -> None:
    """Post every delivery once, signing each request as HttpSender.attempt does."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        it = iter(deliveries)

        async def lane() -> None:
            for d in it:
                ts = int(time.time())
                body = d.body(ts)
                headers = build_headers(
                    body,
                    delivery_id=d.id,
                    event=d.event,
                    timestamp=ts,
                    attempt=1,
                    secrets=ep.secrets_now(),
                )
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as r:
                    await r.content.read(4096)
                    if r.status != 200:
                        raise RuntimeError(f"baseline got HTTP {r.status}")

        await asyncio.gather(*(lane() for _ in range(concurrency)))


def run(
    events: int = 20000,
    concurrency: int = 64,
    bootstrap: str | None = None,
    profile: str | None = None,
    spy: str | None = None,
    loglevel: str = "info",
    stage: str = "events",
    timeout: float = 600.0,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": machine(),
        "events": events,
        "concurrency": concurrency,
        "loglevel": loglevel,
        "stage": stage,
    }
    with kafka(bootstrap) as bs, ReceiverProcess() as rx:
        s = new_settings(bs)
        ep = register(s, rx.url("/worker"), "invoice.*", "async")
        deliveries = []
        with Producer(s) as p:
            for i in range(events):
                key, value = build_event(EVENT, i, invoice(i))
                raw = orjson.dumps(value)
                d = Delivery.for_event(parse_event(key.encode(), raw), ep, "async")
                deliveries.append(d)
                if stage == "events":
                    p.send("crm.events", key, raw)
                else:  # what the fan-out would have written: measures the delivery agent alone
                    p.send("webhooks.deliveries", d.resource_key, d.encode())
        # The worker gets the same in-flight budget as the baseline: 64 globally and, since
        # there is a single endpoint here, 64 for it (the default per-endpoint cap is 8).
        env = {
            "WEBHOOKS_MAX_IN_FLIGHT": str(concurrency),
            "WEBHOOKS_MAX_IN_FLIGHT_PER_ENDPOINT": str(concurrency),
        }

        me = psutil.Process()
        c0 = me.cpu_times()
        asyncio.run(_baseline(rx.url("/baseline-before"), deliveries, ep, concurrency))
        c1 = me.cpu_times()
        before = rx.stats("/baseline-before")

        t0 = time.time()
        with BenchWorker(s, name="async", profile=profile, loglevel=loglevel, **env) as w:
            started = time.time()
            wp = psutil.Process(w.pid)
            spying = w.spy(spy) if spy else None
            w0 = wp.cpu_times()
            rx.wait_for(events, "/worker", timeout=timeout)
            w1 = wp.cpu_times()
            if spying is not None:
                spying.send_signal(signal.SIGINT)
                spying.wait(60)
            busy = time.time() - started
            stats = rx.stats("/worker")
            sample = rx.sample("/worker")
        verify(sample["body"].encode(), sample["headers"], [ep.secret])  # real, signed deliveries

        asyncio.run(_baseline(rx.url("/baseline-after"), deliveries, ep, concurrency))
        after = rx.stats("/baseline-after")

    def cpu(a: Any, b: Any) -> float:
        return b.user + b.system - a.user - a.system

    worker_rate = _rate(stats)
    base_rates = [_rate(before), _rate(after)]
    base_mean = sum(base_rates) / 2
    result.update(
        {
            "worker_per_s": round(worker_rate),
            "worker_deliveries": stats["count"],
            "worker_unique_ids": stats["unique_delivery_ids"],
            "worker_start_s": round(started - t0, 1),
            "baseline_per_s": [round(x) for x in base_rates],
            "ratio": round(worker_rate / base_mean, 3),
            "target_ratio": 0.5,
            # CPU per delivery: the worker process (whole pipeline) vs the baseline client process.
            "worker_cpu_ms_per_delivery": round(cpu(w0, w1) * 1000 / events, 3),
            "worker_cpu_utilisation": round(cpu(w0, w1) / busy, 2),
            "worker_cpu_sys_share": round((w1.system - w0.system) / max(1e-9, cpu(w0, w1)), 2),
            "baseline_cpu_ms_per_request": round(cpu(c0, c1) * 1000 / events, 3),
        }
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.async_throughput", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--profile", help="run the worker under pyinstrument; write the report here (.txt/.html)")
    ap.add_argument("--loglevel", default="info", help="the worker's --loglevel")
    ap.add_argument(
        "--stage",
        choices=("events", "deliveries"),
        default="events",
        help="pre-produce change events (whole pipeline) or delivery records (delivery agent only)",
    )
    ap.add_argument("--py-spy", dest="spy", help="sample the worker with py-spy (all threads) into this file")
    args = ap.parse_args(argv)
    result = run(
        events=args.events,
        concurrency=args.concurrency,
        profile=args.profile,
        spy=args.spy,
        loglevel=args.loglevel,
        stage=args.stage,
    )
    path = save("async_throughput", result)
    print_result(
        "async throughput (1 worker vs bare aiohttp client)",
        result,
        [
            "events", "stage", "concurrency", "worker_per_s", "baseline_per_s", "ratio", "worker_deliveries",
            "worker_unique_ids", "worker_cpu_ms_per_delivery", "worker_cpu_utilisation",
            "baseline_cpu_ms_per_request",
        ],
    )  # fmt: skip
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
