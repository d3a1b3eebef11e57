"""Recent delivery attempts, for the admin API and page: a bounded follower of `webhooks.attempts`.

`webhooks.attempts` is a plain (not compacted) log keyed by endpoint id, so it cannot be read whole
the way the registry and the DLQ are. Every worker instead reads the last `per_partition` records
of each partition at start and then follows the topic, keeping bounded deques: the newest attempts
overall, per endpoint and per delivery id. No consumer group: every worker sees every partition,
so any worker gives the same answers. One endpoint's attempts share a partition (the key), so its
failure streak is counted in the order the attempts happened.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

import orjson

from app import route
from app.config import Settings
from app.topic_tables import TopicFollower


class AttemptLog(TopicFollower):
    def __init__(
        self,
        settings: Settings,
        *,
        per_partition: int = 2000,
        per_endpoint: int = 200,
        deliveries: int = 10_000,
        per_delivery: int = 50,
        recent: int = 1000,
        requests: int = 1000,
    ) -> None:
        super().__init__(settings, route.ATTEMPTS)
        self.per_partition = per_partition
        self.per_endpoint = per_endpoint
        self.max_deliveries = deliveries
        self.per_delivery = per_delivery
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._by_endpoint: dict[str, deque[dict[str, Any]]] = {}
        self._by_delivery: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._streak: dict[str, int] = {}
        # The requests as sent (up to 2 kB of body each) are kept for the newest `requests` attempts
        # only, apart from the records, so the bounded lists above stay small.
        self.max_requests = requests
        self._requests: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    # ---- in-memory view ---------------------------------------------------------------------------
    def add(self, rec: dict[str, Any]) -> None:
        ep = str(rec.get("endpoint_id") or "")
        dlv = str(rec.get("delivery_id") or "")
        if not ep or not dlv:
            return
        request = rec.pop("request", None)
        if isinstance(request, dict):
            self._requests[(dlv, int(rec.get("n") or 0))] = request
            while len(self._requests) > self.max_requests:
                self._requests.popitem(last=False)
        self._recent.append(rec)
        per_ep = self._by_endpoint.get(ep)
        if per_ep is None:
            per_ep = self._by_endpoint[ep] = deque(maxlen=self.per_endpoint)
        per_ep.append(rec)
        per_dlv = self._by_delivery.get(dlv)
        if per_dlv is None:
            per_dlv = self._by_delivery[dlv] = deque(maxlen=self.per_delivery)
            while len(self._by_delivery) > self.max_deliveries:
                self._by_delivery.popitem(last=False)
        else:
            self._by_delivery.move_to_end(dlv)
        per_dlv.append(rec)
        self._streak[ep] = 0 if rec.get("outcome") == "success" else self._streak.get(ep, 0) + 1

    def recent(self, limit: int = 100, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        source = self._recent if endpoint is None else self._by_endpoint.get(endpoint, ())
        rows = sorted(source, key=lambda r: float(r.get("at") or 0), reverse=True)
        return rows[:limit]

    def for_delivery(self, delivery_id: str) -> list[dict[str, Any]]:
        """In the order they happened, each with the request as sent while this log still holds it."""
        rows = sorted(self._by_delivery.get(delivery_id, ()), key=lambda r: float(r.get("at") or 0))
        out = []
        for r in rows:
            request = self._requests.get((delivery_id, int(r.get("n") or 0)))
            out.append({**r, "request": request} if request is not None else r)
        return out

    def stats(self, endpoint_id: str, now: float, window: float = 3600.0) -> dict[str, Any]:
        """Success rate and p95 latency of the endpoint's attempts in the last `window` seconds, over
        the attempts this log holds for it (the newest `per_endpoint`); `complete` is False when
        older attempts of the window may have been dropped from that list."""
        rows = self._by_endpoint.get(endpoint_id, ())
        recent = [r for r in rows if float(r.get("at") or 0) >= now - window]
        complete = len(rows) < self.per_endpoint or len(recent) < len(rows)
        if not recent:
            return {"attempts": 0, "success_rate": None, "p95_latency_ms": None, "complete": complete}
        ok = sum(1 for r in recent if r.get("outcome") == "success")
        latencies = sorted(float(r.get("latency_ms") or 0) for r in recent)
        p95 = latencies[max(0, math.ceil(0.95 * len(latencies)) - 1)]  # nearest rank
        return {
            "attempts": len(recent),
            "success_rate": round(ok / len(recent), 4),
            "p95_latency_ms": round(p95, 2),
            "complete": complete,
        }

    def streak(self, endpoint_id: str) -> int:
        """Failed attempts in a row since the endpoint's last success (within what this log holds)."""
        return self._streak.get(endpoint_id, 0)

    def last(self, endpoint_id: str) -> dict[str, Any] | None:
        rows = self._by_endpoint.get(endpoint_id)
        return rows[-1] if rows else None

    def knows_endpoint(self, endpoint_id: str) -> bool:
        return endpoint_id in self._by_endpoint

    # ---- following the topic ----------------------------------------------------------------------
    async def _seek_start(self, tps: list[Any]) -> None:
        begins = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps)
        for tp in tps:
            self._consumer.seek(tp, max(begins[tp], ends[tp] - self.per_partition))

    def _apply(self, rec: Any) -> None:
        try:
            doc = orjson.loads(rec.value) if rec.value is not None else None
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict):
            self.add(doc)
