"""Async-mode throughput of ONE worker against a bare aiohttp client, same receiver, same run.

    .venv/bin/python -m bench.async_throughput [--events 20000] [--concurrency 64]

Two stages, each with its own worker started after its N records are waiting, and one async
endpoint:
- deliveries: N delivery records on `webhooks.deliveries`, as the fan-out writes them: how fast
  a worker drains the async queue (the delivery agent);
- events: N `invoice.updated` change events on `crm.events`: the whole pipeline, fan-out
  (Faust) and the second hop included.
A worker's rate is (N-1) / (last receipt - first receipt) at the receiver (a separate process).
The baseline posts the same bodies, each serialised and signed per request exactly as the worker
does (Delivery.body -> app.signing.dumps, build_headers), from a bare aiohttp client with the same
number of requests in flight, to the same receiver; it runs once before the first worker and once
after the last, and each ratio uses their mean.

`--stage events|deliveries` runs one stage only; `--loglevel` is the worker's.
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
from app.endpoints import Endpoint, create_endpoint
from app.events import build_event, parse_event
from app.producer import Producer
from app.signing import build_headers, verify
from bench.harness import (
    BenchWorker,
    CpuShare,
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


def _stage(
    s: Any,
    rx: ReceiverProcess,
    stage: str,
    events: int,
    concurrency: int,
    profile: str | None,
    spy: str | None,
    loglevel: str,
    timeout: float,
    endpoints: int = 1,
    mode: str = "async",
) -> dict[str, Any]:
    """One worker from start until the receiver has every delivery of this stage."""
    path = f"/worker-{stage}-{endpoints}"
    # Distinct filters: the deliveries stage's endpoint never matches the events the other stage
    # emits; each events stage has a prefix of its own (a later stage's endpoints never see an earlier
    # stage's events: its worker starts from the earliest offset of the same topic).
    if endpoints > 1:
        s = new_settings(s.bootstrap_servers)
    eps = [
        register(s, rx.url(path), "invoice.*" if stage == "events" else "invoice.created", mode)
        for _ in range(endpoints)
    ]
    ep = eps[0]
    with Producer(s) as p:
        for i in range(events):
            key, value = build_event(EVENT, i, invoice(i))
            raw = orjson.dumps(value)
            if stage == "events":
                p.send("crm.events", key, raw)
            else:  # what the fan-out would have written: measures the delivery agent alone
                d = Delivery.for_event(parse_event(key.encode(), raw), ep, "async")
                p.send("webhooks.deliveries", d.resource_key, d.encode())
    # The worker gets the same in-flight budget as the baseline: 64 globally and, since there is a
    # single endpoint here, 64 for it (the default per-endpoint cap is 8).
    env = {
        "WEBHOOKS_MAX_IN_FLIGHT": str(concurrency),
        "WEBHOOKS_MAX_IN_FLIGHT_PER_ENDPOINT": str(concurrency),
    }
    t0 = time.time()
    with BenchWorker(s, name=f"async-{stage}", profile=profile, loglevel=loglevel, **env) as w:
        started = time.time()
        wp = psutil.Process(w.pid)
        spying = w.spy(spy) if spy else None
        share = CpuShare(w.pid, rx.proc.pid if rx.proc else None)
        share.start()
        w0 = wp.cpu_times()
        rx.wait_for(events * endpoints, path, timeout=timeout)
        w1 = wp.cpu_times()
        cores = share.stop()
        if spying is not None:
            spying.send_signal(signal.SIGINT)
            spying.wait(60)
        busy = time.time() - started
        stats = rx.stats(path)
        sample = rx.sample(path)
    secrets = [e.secret for e in eps]
    # Real, signed deliveries (the sample may be older than the default 5 minutes on a loaded machine).
    verify(sample["body"].encode(), sample["headers"], secrets, tolerance=3600)
    cpu = _cpu(w0, w1)
    return {
        "mode": mode,
        "endpoints_per_event": endpoints,
        "worker_per_s": round(_rate(stats)),
        "worker_deliveries": stats["count"],
        "worker_unique_ids": stats["unique_delivery_ids"],
        "worker_start_s": round(started - t0, 1),
        # CPU of the whole worker process (every thread, librdkafka's included).
        "worker_cpu_ms_per_delivery": round(cpu * 1000 / (events * endpoints), 3),
        "worker_cpu_utilisation": round(cpu / busy, 2),
        "worker_cpu_sys_share": round((w1.system - w0.system) / max(1e-9, cpu), 2),
        # Cores used while it ran: the worker's main thread (event loop), librdkafka's threads, its
        # other threads; the receiver; the whole machine (2 = every core busy: it waited for a core).
        **cores,
    }


def _cpu(a: Any, b: Any) -> float:
    return float(b.user + b.system - a.user - a.system)


def run(
    events: int = 20000,
    concurrency: int = 64,
    bootstrap: str | None = None,
    profile: str | None = None,
    spy: str | None = None,
    loglevel: str = "info",
    stage: str = "both",
    timeout: float = 600.0,
    endpoints: tuple[int, ...] = (1,),
    mode: str = "async",
) -> dict[str, Any]:
    """`endpoints`: an events stage for each count of matching async endpoints per event, each with
    events/count events (the same number of deliveries); the first is named `events`, the others
    `events_x<count>`. `mode`: the events stages' endpoints' mode (immediate: the fan-out POSTs
    itself, no second hop), for deliveries/s per core per mode."""
    stages = ["deliveries", "events"] if stage == "both" else [stage]
    fan: dict[str, int] = {}
    if "events" in stages:
        stages.remove("events")
        for n in endpoints:
            name = "events" if n == endpoints[0] else f"events_x{n}"
            stages.append(name)
            fan[name] = n
    result: dict[str, Any] = {
        "machine": machine(),
        "events": events,
        "concurrency": concurrency,
        "loglevel": loglevel,
        "stages": stages,
    }
    with kafka(bootstrap) as bs, ReceiverProcess() as rx:
        s = new_settings(bs)
        me = psutil.Process()
        measured: dict[str, dict[str, Any]] = {}
        base_rates: list[float] = []
        base_cpu: list[float] = []
        # The baseline's bodies: the same deliveries, for an endpoint that is never registered.
        ep = create_endpoint(s, url=rx.url("/baseline"), events="invoice.*", mode="async")
        deliveries = []
        for i in range(events):
            key, value = build_event(EVENT, i, invoice(i))
            deliveries.append(Delivery.for_event(parse_event(key.encode(), orjson.dumps(value)), ep, "async"))

        def baseline(path: str) -> None:
            c0 = me.cpu_times()
            asyncio.run(_baseline(rx.url(path), deliveries, ep, concurrency))
            base_cpu.append(_cpu(c0, me.cpu_times()))
            base_rates.append(_rate(rx.stats(path)))

        baseline("/baseline-before")
        for name in stages:
            n = fan.get(name, 1)
            kind = "events" if name in fan else name
            m = mode if kind == "events" else "async"
            measured[name] = _stage(s, rx, kind, events // n, concurrency, profile, spy, loglevel, timeout, n, m)
        baseline("/baseline-after")

    base_mean = sum(base_rates) / len(base_rates)
    result["baseline_per_s"] = [round(x) for x in base_rates]
    result["baseline_cpu_ms_per_request"] = round(sum(base_cpu) * 1000 / (events * len(base_cpu)), 3)
    result["target_ratio"] = 0.5
    for name, row in measured.items():
        row["ratio"] = round(row["worker_per_s"] / base_mean, 3)
        # CPU per delivery as a multiple of the bare client's per request: what a slower or busier
        # host changes least (both sides slow down alike).
        row["cpu_x_bare"] = round(row["worker_cpu_ms_per_delivery"] / result["baseline_cpu_ms_per_request"], 2)
        result[f"{name}_stage"] = row
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
        choices=("both", "events", "deliveries"),
        default="both",
        help="pre-produce delivery records (the delivery agent: async queue drain), change events "
        "(the whole pipeline, fan-out included), or both, one worker each",
    )
    ap.add_argument("--py-spy", dest="spy", help="sample the worker with py-spy (all threads) into this file")
    ap.add_argument(
        "--endpoints",
        default="1",
        help="matching async endpoints per event, comma-separated (e.g. 1,5,20): one events stage "
        "each, with --events / count events so every stage makes the same number of deliveries",
    )
    ap.add_argument(
        "--mode",
        choices=("async", "immediate"),
        default="async",
        help="the events stages' endpoint mode (the deliveries stage is async by definition)",
    )
    args = ap.parse_args(argv)
    result = run(
        events=args.events,
        concurrency=args.concurrency,
        profile=args.profile,
        spy=args.spy,
        loglevel=args.loglevel,
        stage=args.stage,
        endpoints=tuple(int(x) for x in args.endpoints.split(",")),
        mode=args.mode,
    )
    path = save("async_throughput", result)
    flat = dict(result)
    for name in result["stages"]:
        for key, value in result[f"{name}_stage"].items():
            flat[f"{name}: {key}"] = value
    keys = ["events", "concurrency", "baseline_per_s", "baseline_cpu_ms_per_request"]
    for name in result["stages"]:
        keys += [
            f"{name}: {k}"
            for k in (
                "mode",
                "endpoints_per_event",
                "worker_per_s",
                "ratio",
                "worker_deliveries",
                "worker_unique_ids",
                "worker_cpu_ms_per_delivery",
                "cpu_x_bare",
                "worker_cpu_utilisation",
                "worker_main_cores",
                "worker_librdkafka_cores",
                "worker_other_threads_cores",
                "receiver_cores",
                "machine_busy_cores",
            )
        ]
    print_result("async throughput (1 worker vs bare aiohttp client)", flat, keys)
    print(f"   json: {path}")
    return result


if __name__ == "__main__":
    main()
