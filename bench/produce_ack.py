"""Produce -> broker ack, one record at a time: the first part of every latency floor, A/B over the
librdkafka settings that decide it.

    .venv/bin/python -m bench.produce_ack [--records 500]

For each variant a fresh producer (acks=all, idempotent, murmur2_random, as `app/producer.py` and
`app/outbox.py` configure theirs) sends `--records` small records to `crm.events`, each after the
previous one was acknowledged, and the time from `produce()` to its delivery report is recorded:

- `emit`: `produce()` then `flush()`, what `Producer.emit` does (flush sends at once, whatever the
  linger);
- `reported`: `produce()` then `poll()` until the report, what a caller of the worker's prompt
  outbox waits for (the outbox polls on the event loop; here a blocking poll, so no timer adds).

Variants: Nagle on (librdkafka's default) and off (`socket.nagle.disable`, what Kafka's Java
client always does), and `linger.ms` 0 / 5 / 20. The machine's other work moves these numbers:
compare variants of one run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from confluent_kafka import Producer

from bench.harness import kafka, machine, new_settings, percentile, print_result, save

VARIANTS: dict[str, dict[str, Any]] = {
    "nagle_on_linger_5": {"socket.nagle.disable": False, "linger.ms": 5},
    "nagle_off_linger_5": {"socket.nagle.disable": True, "linger.ms": 5},
    "nagle_on_linger_0": {"socket.nagle.disable": False, "linger.ms": 0},
    "nagle_off_linger_0": {"socket.nagle.disable": True, "linger.ms": 0},
    "nagle_off_linger_20": {"socket.nagle.disable": True, "linger.ms": 20},
}


def _quantiles(samples: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in samples]
    return {f"p{q}_ms": round(percentile(ms, q), 3) for q in (50, 90, 99)}


def _variant(bootstrap: str, topic: str, conf: dict[str, Any], records: int) -> dict[str, Any]:
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            **conf,
        }
    )
    for i in range(50):  # connections, the producer id, the partition's leader
        p.produce(topic, b"{}", f"warm{i}")
        p.flush(10)
    out: dict[str, Any] = {}
    flushed: list[float] = []
    for i in range(records):
        t0 = time.perf_counter()
        p.produce(topic, b"{}", f"r{i}")
        p.flush(10)
        flushed.append(time.perf_counter() - t0)
    out["emit"] = _quantiles(flushed)
    reported: list[float] = []
    done: list[Any] = []  # the delivery report's error (None: acked), one per record
    for i in range(records):
        t0 = time.perf_counter()
        p.produce(topic, b"{}", f"r{i}", on_delivery=lambda err, _msg: done.append(err))
        while len(done) <= i:
            p.poll(0.01)
        if done[i] is not None:
            raise RuntimeError(f"produce failed: {done[i]}")
        reported.append(time.perf_counter() - t0)
    out["reported"] = _quantiles(reported)
    p.flush(10)
    return out


def run(records: int = 500, bootstrap: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "records": records}
    with kafka(bootstrap) as bs:
        topic = new_settings(bs).topic("crm.events")
        result["variants"] = {name: _variant(bs, topic, conf, records) for name, conf in VARIANTS.items()}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.produce_ack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=500)
    args = ap.parse_args(argv)
    result = run(records=args.records)
    path = save("produce_ack", result)
    flat = {"records": result["records"], **result["variants"]}
    print_result("produce -> ack, one record at a time (librdkafka settings A/B)", {**result, **flat}, list(flat))
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
