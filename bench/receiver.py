"""A fast webhook receiver for the benchmarks, run as its own process so that it never shares the
worker's (or the baseline client's) event loop and CPU time slice.

    python -m bench.receiver --port 8099

Every POST gets `200 ok`; the receiver keeps (arrival time, body) per path and parses nothing on
the hot path. `GET /_count?path=/x` answers the count so far; `GET /_stats?path=/x` parses the
bodies then and answers arrival times, end-to-end latencies (`occurred_at` to arrival, same
machine clock) and what smart deliveries carried; `GET /_sample?path=/x` answers one request's
headers and body so the bench can verify its signature.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

_records: dict[str, list[tuple[float, bytes]]] = {}
_sample: dict[str, tuple[dict[str, str], bytes]] = {}


def _occurred_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def stats(path: str) -> dict[str, Any]:
    recs = _records.get(path, [])
    arrivals: list[float] = []
    latencies: list[float] = []
    collapsed: list[int] = []
    resources: list[str] = []
    versions: list[str | None] = []
    delivery_ids: set[str] = set()
    for at, body in recs:
        doc = orjson.loads(body)
        arrivals.append(at)
        latencies.append(at - _occurred_ts(doc["occurred_at"]))
        collapsed.append(int(doc.get("collapsed") or 1))
        resources.append(str(doc["payload"].get("id")))
        versions.append(doc["payload"].get("version"))
        delivery_ids.add(doc["id"])
    return {
        "count": len(recs),
        "unique_delivery_ids": len(delivery_ids),
        "arrivals": arrivals,
        "latencies": latencies,
        "collapsed": collapsed,
        "resources": resources,
        "versions": versions,
    }


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    path = request.path
    if request.method == "GET" and path.startswith("/_"):
        target = request.query.get("path", "/")
        if path == "/_count":
            return web.Response(text=str(len(_records.get(target, ()))))
        if path == "/_stats":
            return web.Response(body=orjson.dumps(stats(target)), content_type="application/json")
        if path == "/_sample":
            headers, body = _sample.get(target, ({}, b""))
            return web.Response(body=orjson.dumps({"headers": headers, "body": body.decode()}))
        if path == "/_reset":
            _records.pop(target, None)
            _sample.pop(target, None)
            return web.Response(text="ok")
        return web.Response(status=404)
    body = await request.read()
    at = time.time()
    bucket = _records.get(path)
    if bucket is None:
        bucket = _records[path] = []
        _sample[path] = ({str(k): v for k, v in request.headers.items()}, body)
    bucket.append((at, body))
    return web.Response(text="ok")


async def serve(port: int) -> None:
    # The low-level server: no router or middleware between the socket and `handle`.
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"receiver ready on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
