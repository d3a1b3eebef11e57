"""The delivery hot path in one process, without Faust: Dispatcher -> HttpSender -> Outbox.

    .venv/bin/python -m bench.hotpath [--deliveries 10000] [--profile FILE.prof]

What async throughput cannot separate: how much CPU the product's own delivery code (attempt,
signing, attempt log, metrics) adds over a bare aiohttp POST. Deliveries are built in memory and
handed to `Dispatcher.dispatch` from 64 concurrent lanes, against a real broker (attempt log,
registry) and the receiver process; then the same bodies go through the bare client (the async
throughput baseline) in the same process. Both report CPU per delivery (this process only;
time.process_time, so waiting for a CPU under load does not count) and rate. `--profile` runs
the Dispatcher phase under cProfile and prints the top functions by own time. A third phase feeds
the same Dispatcher through the worker's delivery agent (records produced to `webhooks.deliveries`
first): what consuming adds, to compare with `async_throughput --stage deliveries` (the same agent
inside a whole worker), and how many records librdkafka fetched for them (`agent_fetched_records`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time
from typing import Any
from unittest import mock

import orjson
from confluent_kafka import Consumer

from app.consumers import deliveries
from app.consumers.deliveries import DeliveryAgent
from app.delivery import Delivery, HttpSender, delivery_id_for
from app.dispatch import Dispatcher
from app.endpoints import Registry
from app.events import build_event, parse_event
from app.outbox import Outbox
from app.producer import Producer
from bench.async_throughput import _baseline, _rate
from bench.harness import ReceiverProcess, invoice, kafka, machine, new_settings, print_result, register, save


async def _dispatch_all(dispatcher: Dispatcher, deliveries: list[Delivery], lanes: int) -> None:
    it = iter(deliveries)

    async def lane() -> None:
        for d in it:
            await dispatcher.dispatch(d)

    await asyncio.gather(*(lane() for _ in range(lanes)))


async def _run_dispatcher(settings: Any, deliveries: list[Delivery], lanes: int, prof: Any) -> float:
    outbox, sender = Outbox(settings), HttpSender(settings)
    registry = Registry(settings)
    await outbox.start()
    await sender.start()
    await registry.start()
    await asyncio.wait_for(registry.ready.wait(), 60)  # caught up: the endpoint was written before
    assert registry.get(deliveries[0].endpoint_id) is not None
    dispatcher = Dispatcher(settings, registry, sender, outbox)
    try:
        c0 = time.process_time()
        if prof is not None:
            prof.enable()
        await _dispatch_all(dispatcher, deliveries, lanes)
        await outbox.flush()
        if prof is not None:
            prof.disable()
        return time.process_time() - c0
    finally:
        await registry.stop()
        await sender.stop()
        await outbox.stop()


async def _run_agent(settings: Any, n: int, rx: ReceiverProcess, path: str, fetched: dict[str, int]) -> float:
    """The same Dispatcher fed by the worker's delivery agent (app/consumers/deliveries.py: librdkafka
    consumer, offset bookkeeping, commits), without Faust: CPU of this whole process, librdkafka's
    threads included, until the receiver has all `n`. `fetched` gets librdkafka's count of records
    (and bytes) it fetched meanwhile, from its statistics: `n` unless something made it fetch
    records again (a pause purges the prefetched ones: docs/performance.md 8)."""

    def counting_consumer(conf: dict[str, Any], **kw: Any) -> Consumer:
        def on_stats(raw: str) -> None:
            doc = orjson.loads(raw)
            fetched.update(records=doc["rxmsgs"], bytes=doc["rxmsg_bytes"])

        return Consumer({**conf, "statistics.interval.ms": 100, "stats_cb": on_stats}, **kw)

    outbox, sender = Outbox(settings), HttpSender(settings)
    registry = Registry(settings)
    await outbox.start()
    await sender.start()
    await registry.start()
    await asyncio.wait_for(registry.ready.wait(), 60)
    dispatcher = Dispatcher(settings, registry, sender, outbox)
    with mock.patch.object(deliveries, "Consumer", counting_consumer):
        agent = DeliveryAgent(settings, dispatcher)
        try:
            c0 = time.process_time()
            await agent.start()
            await asyncio.to_thread(rx.wait_for, n, path, 600)
            cpu = time.process_time() - c0
            await asyncio.sleep(0.5)  # the statistics after the last fetch
            return cpu
        finally:
            await agent.stop()
            await registry.stop()
            await sender.stop()
            await outbox.stop()


def run(
    deliveries: int = 10000, concurrency: int = 64, bootstrap: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "deliveries": deliveries, "concurrency": concurrency}
    with kafka(bootstrap) as bs, ReceiverProcess() as rx:
        s = new_settings(
            bs,
            WEBHOOKS_MAX_IN_FLIGHT=str(concurrency),
            WEBHOOKS_MAX_IN_FLIGHT_PER_ENDPOINT=str(concurrency),
        )
        ep = register(s, rx.url("/dispatcher"), "invoice.*", "async")
        items = []
        for i in range(deliveries):
            key, value = build_event("invoice.updated", i, invoice(i))
            items.append(Delivery.for_event(parse_event(key.encode(), orjson.dumps(value)), ep, "async"))
        prof = cProfile.Profile() if profile else None
        cpu_dispatch = asyncio.run(_run_dispatcher(s, items, concurrency, prof))
        d_stats = rx.stats("/dispatcher")
        c0 = time.process_time()
        asyncio.run(_baseline(rx.url("/bare"), items, ep, concurrency))
        cpu_bare = time.process_time() - c0
        b_stats = rx.stats("/bare")
        ep2 = register(s, rx.url("/consumer"), "invoice.*", "async")
        with Producer(s) as p:
            for d in items:
                # A new endpoint is a new delivery (its own id): the agent skips ids whose success
                # the attempt log already holds, as the dispatcher stage's are.
                d.endpoint_id, d.id = ep2.id, delivery_id_for(d.event_id, ep2.id, d.mode)
                p.send("webhooks.deliveries", d.resource_key, d.encode())
        fetched: dict[str, int] = {}
        cpu_agent = asyncio.run(_run_agent(s, deliveries, rx, "/consumer", fetched))
        c_stats = rx.stats("/consumer")
    result.update(
        {
            "dispatcher_per_s": round(_rate(d_stats)),
            "bare_per_s": round(_rate(b_stats)),
            "dispatcher_cpu_ms_per_delivery": round(cpu_dispatch * 1000 / deliveries, 3),
            "bare_cpu_ms_per_request": round(cpu_bare * 1000 / deliveries, 3),
            "cpu_ratio_dispatcher_over_bare": round(cpu_dispatch / cpu_bare, 2),
            "agent_per_s": round(_rate(c_stats)),
            "agent_cpu_ms_per_delivery": round(cpu_agent * 1000 / deliveries, 3),
            # What librdkafka fetched to deliver them (statistics `rxmsgs`, `rxmsg_bytes`).
            "agent_fetched_records": fetched.get("records"),
            "agent_fetched_bytes": fetched.get("bytes"),
        }
    )
    if prof is not None and profile:
        prof.dump_stats(profile)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        result["profile_top"] = buf.getvalue()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--deliveries", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--profile", help="cProfile the Dispatcher phase; stats written here (.prof)")
    args = ap.parse_args(argv)
    result = run(deliveries=args.deliveries, concurrency=args.concurrency, profile=args.profile)
    path = save("hotpath", result)
    print_result(
        "delivery hot path in-process (Dispatcher vs bare aiohttp)",
        result,
        [
            "deliveries", "dispatcher_per_s", "bare_per_s", "dispatcher_cpu_ms_per_delivery",
            "bare_cpu_ms_per_request", "cpu_ratio_dispatcher_over_bare", "agent_per_s",
            "agent_cpu_ms_per_delivery", "agent_fetched_records", "agent_fetched_bytes",
        ],
    )  # fmt: skip
    if "profile_top" in result:
        print(result["profile_top"])
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
