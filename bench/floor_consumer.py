"""The latency floor for bench.immediate_latency: a bare aiokafka consumer that posts each event.

    python -m bench.floor_consumer --bootstrap HOST:PORT --topic PREFIX.crm.events --url URL [--times FILE]

(the signing secret comes from BENCH_FLOOR_SECRET, so it never shows in a process list)

It reads `crm.events` from its end (no consumer group, no Faust), builds and signs the same delivery
body as the worker and POSTs it: Kafka's produce-to-fetch time plus one HTTP request, the least
any Kafka-fed deliverer can do on this machine. Run beside the worker on the same events, it gives
the bench a same-run reference. Prints `ready` once it is positioned at the end of every partition.
With `--times`, each record's resource id and the time.time() it was consumed go to FILE, one line
each: the bench splits the floor into produce-ack, ack-to-consume and consume-to-receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import TextIO

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.delivery import Delivery
from app.endpoints import Endpoint
from app.events import parse_event
from app.signing import build_headers


async def run(bootstrap: str, topic: str, url: str, secret: str, log: TextIO | None = None) -> None:
    ep = Endpoint(id="ep_floor", url=url, events=("*",), mode="immediate", secret=secret)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    session = aiohttp.ClientSession(auto_decompress=False)
    tasks: set[asyncio.Task[None]] = set()

    async def post(d: Delivery) -> None:
        ts = int(time.time())
        body = d.body(ts)
        headers = build_headers(
            body, delivery_id=d.id, event=d.event, timestamp=ts, attempt=1, secrets=[secret]
        )
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as r:
            await r.content.read(4096)

    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic)
        while not parts:
            await asyncio.sleep(0.1)
            await consumer._client.force_metadata_update()  # a fresh client may not know it yet
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        print("ready", flush=True)
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            consumed = time.time()
            for records in batches.values():
                for rec in records:
                    ev = parse_event(rec.key, rec.value)
                    if log is not None:
                        log.write(f"{ev.resource_id} {consumed:.6f}\n")
                    task = asyncio.create_task(post(Delivery.for_event(ev, ep, "immediate")))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
    finally:
        await session.close()
        await consumer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--times", help="append '<resource id> <consumed at>' per record to this file")
    args = ap.parse_args()
    log = open(args.times, "a", buffering=1, encoding="utf-8") if args.times else None
    try:
        asyncio.run(run(args.bootstrap, args.topic, args.url, os.environ["BENCH_FLOOR_SECRET"], log))
    except KeyboardInterrupt:
        pass
    finally:
        if log is not None:
            log.close()


if __name__ == "__main__":
    main()
