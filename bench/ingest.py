"""HTTP ingest: `POST /api/events` of ONE worker, single events and the batch form, against the
Kafka produce path in the same run.

    .venv/bin/python -m bench.ingest [--events 10000] [--concurrency 32] [--batch 100]

- produce path (the baseline): the same events built and produced straight to `crm.events` with
  `app.producer.Producer` (librdkafka, acks=all), then flushed: what a Perfex install writing to
  Kafka itself would pay, and the ceiling of an HTTP route in front of it;
- single: N requests of one event each, `--concurrency` in flight, each answered 202 only once
  Kafka acknowledged its event;
- batch: the same N events as arrays of `--batch`, 4 requests in flight, one result per item;
- sequential: `--sequential` single-event requests one at a time (one client, as the Perfex
  module or an n8n flow sends), each request's latency (p50/p90/p99) and the worker's CPU each.
Rates are events acknowledged per second of wall time, measured at the client; CPU per event is
the worker process's (every thread). The client runs in this process on the same cores, and the
worker also fans each event out (no endpoint matches: Faust reads it and acks it), so on a shared
2-core machine the rates are lower bounds. Target (issue 16): batch >= 5,000 events/s per worker,
single ahead of Svix's API (~2,100/s on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
import orjson
import psutil

from app.events import build_event
from app.producer import Producer
from bench.harness import (
    ADMIN_TOKEN,
    BenchWorker,
    invoice,
    kafka,
    machine,
    new_settings,
    percentile,
    print_result,
    save,
)

EVENT = "invoice.updated"
HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


def _item(i: int) -> dict[str, Any]:
    return {"event": EVENT, "resource_id": i, "data": invoice(i)}


def _produce_path(s: Any, events: int) -> tuple[float, float]:
    """(events/s, this process's CPU ms per event) producing the events straight to Kafka."""
    me = psutil.Process()
    with Producer(s) as p:  # warm-up: connections, metadata, the topic's leaders
        for i in range(min(200, events)):
            key, value = build_event(EVENT, i, invoice(i))
            p.send("crm.events", key, orjson.dumps(value))
    c0, t0 = me.cpu_times(), time.perf_counter()
    with Producer(s) as p:
        for i in range(events):
            key, value = build_event(EVENT, i, invoice(i))
            p.send("crm.events", key, orjson.dumps(value))
    elapsed, c1 = time.perf_counter() - t0, me.cpu_times()
    return events / elapsed, (c1.user + c1.system - c0.user - c0.system) * 1000 / events


async def _post_all(url: str, bodies: list[bytes], concurrency: int, expect: int) -> int:
    """POST every body, `concurrency` in flight; returns the number of events accepted."""
    accepted = 0
    it = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def lane() -> None:
            nonlocal accepted
            for body in it:
                async with session.post(url, data=body, headers=HEADERS) as r:
                    doc = await r.json(loads=orjson.loads)
                    if r.status != expect:
                        raise RuntimeError(f"ingest answered HTTP {r.status}: {doc}")
                    if isinstance(doc, dict) and "results" in doc:
                        accepted += sum(x["status"] == 202 for x in doc["results"])
                    else:
                        accepted += 1

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return accepted


async def _one_at_a_time(url: str, bodies: list[bytes]) -> list[float]:
    """POST each body after the previous one was answered; each request's seconds."""
    took: list[float] = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=HEADERS) as r:
                await r.read()
                if r.status != 202:
                    raise RuntimeError(f"ingest answered HTTP {r.status}")
            took.append(time.perf_counter() - t0)
    return took


def _sequential(w: BenchWorker, bodies: list[bytes]) -> dict[str, Any]:
    wp = psutil.Process(w.pid)
    c0 = wp.cpu_times()
    took = [s * 1000 for s in asyncio.run(_one_at_a_time(f"http://127.0.0.1:{w.port}/api/events", bodies))]
    c1 = wp.cpu_times()
    return {
        "requests": len(took),
        **{f"p{q}_ms": round(percentile(took, q), 2) for q in (50, 90, 99)},
        "worker_cpu_ms_per_event": round((c1.user + c1.system - c0.user - c0.system) * 1000 / len(took), 3),
    }


def _measure(w: BenchWorker, bodies: list[bytes], concurrency: int, expect: int, events: int) -> dict[str, Any]:
    wp = psutil.Process(w.pid)
    url = f"http://127.0.0.1:{w.port}/api/events"
    c0, t0 = wp.cpu_times(), time.perf_counter()
    accepted = asyncio.run(_post_all(url, bodies, concurrency, expect))
    elapsed, c1 = time.perf_counter() - t0, wp.cpu_times()
    if accepted != events:
        raise RuntimeError(f"{accepted} of {events} events accepted")
    return {
        "events_per_s": round(events / elapsed),
        "worker_cpu_ms_per_event": round((c1.user + c1.system - c0.user - c0.system) * 1000 / events, 3),
    }


def run(
    events: int = 10000,
    concurrency: int = 32,
    batch: int = 100,
    bootstrap: str | None = None,
    sequential: int = 500,
) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "events": events, "concurrency": concurrency, "batch": batch}
    single = [orjson.dumps(_item(i)) for i in range(events)]
    batches = [orjson.dumps([_item(i) for i in range(j, min(events, j + batch))]) for j in range(0, events, batch)]
    with kafka(bootstrap) as bs:
        s = new_settings(bs)
        rate, cpu = _produce_path(s, events)
        result["produce_path"] = {"events_per_s": round(rate), "cpu_ms_per_event": round(cpu, 3)}
        # The per-token rate limit (WEBHOOKS_INGEST_RATE, 200/s by default) would be what is measured.
        env = {"WEBHOOKS_INGEST_RATE": "1000000", "WEBHOOKS_INGEST_BURST": "1000000"}
        with BenchWorker(s, name="ingest", loglevel="warning", **env) as w:
            asyncio.run(_post_all(f"http://127.0.0.1:{w.port}/api/events", single[:200], 8, 202))  # warm-up
            result["single"] = _measure(w, single, concurrency, 202, events)
            result["batch_form"] = _measure(w, batches, 4, 200, events)
            if sequential:
                result["sequential"] = _sequential(w, single[:sequential])
    base = result["produce_path"]["events_per_s"]
    for k in ("single", "batch_form"):
        result[k]["share_of_produce_path"] = round(result[k]["events_per_s"] / base, 3)
    result["targets"] = {"batch_events_per_s": 5000, "single_events_per_s": 2100}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=32, help="single-event requests in flight")
    ap.add_argument("--batch", type=int, default=100, help="events per batch request")
    ap.add_argument("--sequential", type=int, default=500, help="single-event requests one at a time (0: none)")
    args = ap.parse_args(argv)
    result = run(events=args.events, concurrency=args.concurrency, batch=args.batch, sequential=args.sequential)
    path = save("ingest", result)
    print_result(
        "HTTP ingest (POST /api/events, 1 worker) vs the Kafka produce path",
        result,
        ["events", "concurrency", "batch", "produce_path", "single", "batch_form", "sequential", "targets"],
    )
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
