"""Dispatcher: one delivery through one attempt and on to wherever its outcome sends it.

Shared by immediate fan-out, the async/smart delivery agent and the retry tiers, so every path has
the same rules: concurrency caps (global, and per endpoint so one slow endpoint cannot take every
slot), the attempt log, metrics, 410 disabling the endpoint, Retry-After. Where a delivery goes
next is decided in app/route.py (`Done` / `Tier` / `Defer` / `Dead`); `follow` carries it out.
`dispatch` returns only when the delivery is safe: delivered, or its next record acknowledged
by Kafka. Callers commit their source offset after that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from app import metrics, route
from app.breaker import EndpointHealth
from app.config import Settings
from app.delivery import Attempt, Delivery, HttpSender
from app.endpoints import Registry, StaleWrite
from app.outbox import Outbox
from app.successes import RecentSuccesses
from app.throttle import Throttle

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, settings: Settings, registry: Registry, sender: HttpSender, outbox: Outbox) -> None:
        self.settings = settings
        self.registry = registry
        self.sender = sender
        self.outbox = outbox
        self._global = asyncio.Semaphore(settings.max_in_flight)
        self._per_endpoint: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, int] = {}
        self._slow: dict[str, bool] = {}
        # When an endpoint is slow (its last attempt timed out, failed to connect or took over a
        # second) and this many deliveries already queue for it, new ones wait in a retry tier
        # instead of in the worker: a hung endpoint must not stall the others or a rebalance.
        self.max_waiting_per_endpoint = settings.max_in_flight_per_endpoint * 2
        # The worker's view of webhooks.dlq (app/observe.py sets it): see park().
        self.dlq_view: Any = None
        # Delivery ids delivered lately (app/successes.py): each 2xx is added, and a delivery read or
        # fanned out again after a crash or rebalance whose id is here is skipped, whichever path
        # (immediate fan-out, delivery agent, retry tier) it comes by. The worker catches it up with
        # the attempt log at start and whenever a consumer is assigned partitions.
        self.successes = RecentSuccesses(settings)
        # Delivery ids being dispatched here now: a second copy (the fan-out re-published a delivery
        # the agent also re-reads) waits for the first to finish, then is skipped if it succeeded.
        # The event exists only once a copy waits (rare): none is made per delivery.
        self._active: dict[str, asyncio.Event | None] = {}
        # Requests in flight, read by the gauge at scrape time (no gauge lock twice per request).
        self.in_flight = 0
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)
        # Circuit breakers and auto-disable (app/breaker.py).
        self.health = EndpointHealth(settings, sender, self.disable_endpoint)
        self.throttle = Throttle()  # endpoints' max_rate (app/throttle.py); its share set by the delivery agent

    # ---- entry point -----------------------------------------------------------------------------
    async def dispatch(self, d: Delivery, tier: int | None = None) -> route.Next:
        """Attempt `d` (read from tier `tier`, or fresh) and send it where its outcome says; returns
        that outcome (app/ordering.py blocks a resource's sequence behind a delivery not done). A
        delivery whose success is already recorded (a crash or rebalance made someone read it
        again) is skipped: Done."""
        if self.successes.catching_up:  # partitions just assigned: learn what was delivered first
            await self.successes.settled()
        active = self._active
        while d.id in active:  # a copy of it is being attempted: wait for that one to finish
            waiter = active[d.id]
            if waiter is None:  # the first copy to wait makes the event (none per delivery otherwise)
                waiter = active[d.id] = asyncio.Event()
            await waiter.wait()
        if d.id in self.successes:
            metrics.DUPLICATES_SKIPPED.inc()
            return route.DONE
        active[d.id] = None
        try:
            return await self._dispatch(d, tier)
        finally:
            waiter = active.pop(d.id)
            if waiter is not None:
                waiter.set()

    async def _dispatch(self, d: Delivery, tier: int | None) -> route.Next:
        ep = self.registry.get(d.endpoint_id)
        instead = route.before_attempt(None if ep is None else ep.enabled, d.not_before, tier, time.time())
        if instead == route.Dead("endpoint_disabled") and d.replays:
            # A replay made on re-enable may reach a worker whose registry view lags that write.
            ep = await self._fresh_endpoint(d.endpoint_id)
            instead = route.before_attempt(None if ep is None else ep.enabled, d.not_before, tier, time.time())
        if instead is not None:
            await self.follow(d, instead)
            return instead
        assert ep is not None
        if ep.max_rate:
            slot, new = self.throttle.admit(ep.id, ep.max_rate, d.id, time.time())
            if slot is not None:  # over the rate: it waits in a tier, not here
                if new:
                    metrics.child(metrics.THROTTLED, ep.id).inc()
                next_ = route.throttled(tier)
                await self.follow(d, next_, at=slot)
                return next_
        gate = self.health.admit(ep)
        if gate is None:  # its circuit breaker is open: on to the next tier, no attempt
            metrics.child(metrics.DELIVERIES, ep.id, d.mode, "breaker_open").inc()
            d.failures += 1
            next_ = route.held(self.settings, d.failures)
            await self.follow(d, next_)
            await self.health.check(ep)
            return next_
        waiting = self._waiting.get(ep.id, 0)
        if waiting >= self.max_waiting_per_endpoint and self._slow.get(ep.id):
            metrics.child(metrics.DELIVERIES, ep.id, d.mode, "deferred").inc()
            return await self._follow_deferred(d, tier)
        sem = self._per_endpoint.get(ep.id)
        if sem is None:
            sem = self._per_endpoint[ep.id] = asyncio.Semaphore(self.settings.max_in_flight_per_endpoint)
        self._waiting[ep.id] = waiting + 1
        attempt = None
        try:
            async with sem:
                # The endpoint may have turned slow while this delivery queued for it: the queue
                # behind a hung endpoint then moves on to a tier at once instead of waiting out one
                # timeout after another and holding the consumer's records meanwhile.
                if not (self._slow.get(ep.id) and self._waiting[ep.id] > self.max_waiting_per_endpoint):
                    async with self._global:
                        self.in_flight += 1
                        try:
                            attempt = await self.sender.attempt(d, ep)
                        finally:
                            self.in_flight -= 1
        finally:
            self._waiting[ep.id] -= 1
        if attempt is None:
            self.health.breakers.release(ep.id, gate)
            metrics.child(metrics.DELIVERIES, ep.id, d.mode, "deferred").inc()
            return await self._follow_deferred(d, tier)
        self._slow[ep.id] = attempt.outcome in ("timeout", "connect_error") or attempt.latency_ms > 1000
        # The breaker counts the attempt before the delivery moves on: a breaker it opens is open
        # from before the retry's timestamp, so a probe is due when the retry is (cooldown = tier).
        await self.health.after(ep, attempt.ok, gate)
        next_ = await self._after(d, ep.id, attempt)
        if self.registry.get(ep.id) is None:  # deleted while this attempt ran
            self.forget_endpoint(ep.id)
        return next_

    async def _follow_deferred(self, d: Delivery, tier: int | None) -> route.Next:
        next_ = route.deferred(self.settings, d.failures, tier)
        await self.follow(d, next_)
        return next_

    def forget_endpoint(self, ep_id: str) -> None:
        """Drop what this worker keeps for a deleted endpoint: its caps and counters (endpoint ids
        are unbounded over time; a long-lived worker must not keep every one)."""
        if self._waiting.get(ep_id):
            return  # deliveries still in flight: the last one to finish forgets it
        self._waiting.pop(ep_id, None)
        self._per_endpoint.pop(ep_id, None)
        self._slow.pop(ep_id, None)  # (its metric series end at the next scrape: app/web.py)
        self.health.breakers.forget(ep_id)
        self.throttle.forget(ep_id)

    async def _fresh_endpoint(self, ep_id: str) -> Any:
        try:
            await self.registry.table.caught_up(5)
        except Exception as exc:  # Kafka slow: decide on the view we have
            log.info("registry view not confirmed fresh for a replay: %s", exc)
        return self.registry.get(ep_id)

    async def _after(self, d: Delivery, endpoint_id: str, a: Attempt) -> route.Next:
        record = a.record()
        d.attempts.append(record)
        metrics.child(metrics.DELIVERIES, endpoint_id, d.mode, a.outcome).inc()
        metrics.child(metrics.ATTEMPT_LATENCY, d.mode).observe(a.latency_ms / 1000)
        # The request as sent goes to the attempt log for failures only: successes are the hot path,
        # and a 2 kB body in every attempt record would multiply that topic's bytes (docs/admin.md).
        self._log_attempt(d, record, None if a.ok else a.request)
        if a.ok:
            metrics.child(metrics.END_TO_END, d.mode).observe(max(0.0, time.time() - d.occurred_ts))
            self.successes.add(d.id)
            return route.DONE
        d.failures += 1
        if a.retry_after:
            d.not_before = a.at + a.retry_after
        if a.outcome == "gone" and await self.disable_endpoint(endpoint_id, "410 Gone from the endpoint"):
            metrics.ENDPOINTS_DISABLED_BY_410.inc()
        next_ = route.after_failure(self.settings, d.failures, a.outcome)
        await self.follow(d, next_)
        return next_

    async def follow(self, d: Delivery, next_: route.Next, at: float | None = None) -> None:
        """Send `d` where the route says; returns once that record is acknowledged by Kafka.
        A retry is scheduled here: its due time (jittered, or `at` / its Retry-After exactly: route
        `retry_due`, `defer_due`) travels in the record's header for the tier consumer."""
        match next_:
            case route.Done():
                return
            case route.Tier():
                metrics.RETRIES_SCHEDULED.labels(tier=next_.label).inc()
                now = time.time()
                asked = d.not_before if d.not_before and d.not_before > now else None  # this failure's Retry-After
                due = route.retry_due(self.settings.retry_schedule[next_.index], now, asked)
                await self.outbox.publish(next_.topic, d.resource_key, d.encode(), headers=route.due_header(due))
            case route.Defer():
                wanted = at if at is not None else d.not_before
                due = route.defer_due(self.settings.retry_schedule[next_.index], time.time(), wanted)
                await self.outbox.publish(next_.topic, d.resource_key, d.encode(), headers=route.due_header(due))
            case route.Dead():
                await self.park(d, next_.reason)

    # ---- DLQ, attempt log, registry ------------------------------------------------------------
    async def park(self, d: Delivery, reason: str) -> None:
        if d.replays and self.dlq_view is not None:
            await self._wait_replay_tombstone(d)
        metrics.DLQ_ENTRIES.labels(reason=reason).inc()
        await self.outbox.publish(route.DLQ, d.id, orjson.dumps(route.dead_record(d.record(), reason)))

    async def _wait_replay_tombstone(self, d: Delivery, timeout: float = 10.0) -> None:
        """A replay publishes the delivery, then tombstones its old DLQ entry. A replayed delivery
        that fails at once (endpoint disabled, 410) can be parked before that tombstone is written,
        and the tombstone would then delete the new entry. Wait until the old entry (fewer replays)
        has left the view; if the replayer died before its tombstone, park after the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            old = self.dlq_view.data.get(d.id)
            if old is None or int(old.get("replays") or 0) >= d.replays:
                return
            await asyncio.sleep(0.02)

    async def park_poison(
        self, key: bytes | None, value: bytes | None, topic: str, partition: int, offset: int, error: BaseException
    ) -> None:
        """Park a record that cannot be decoded, validated or handled (`route.poison_record`) and
        return only once the DLQ has it: the caller then finishes its offset. A publish that fails
        is tried again (never given up on: the record must not be acked as done and lost)."""
        rec = orjson.dumps(route.poison_record(key, value, topic, partition, offset, error))
        dlq_key = route.poison_key(topic, partition, offset)
        backoff = 0.5
        while True:
            try:
                await self.outbox.publish(route.DLQ, dlq_key, rec)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("parking poison %s:%s@%s failed (%r); retrying", topic, partition, offset, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        logical = topic.removeprefix(self.settings.topic_prefix)
        metrics.POISON.labels(topic=logical, error=type(error).__name__[:40]).inc()
        metrics.DLQ_ENTRIES.labels(reason=route.POISON).inc()
        log.warning("parked poison %s:%s@%s in the DLQ: %s: %s", topic, partition, offset, type(error).__name__, error)

    async def attempt_once(self, d: Delivery) -> Attempt:
        """One attempt of a test delivery (the admin page's "send a test event"): logged like any
        attempt, never retried, parked or counted in the delivery metrics."""
        ep = self.registry.get(d.endpoint_id)
        if ep is None:
            raise KeyError(f"no endpoint {d.endpoint_id}")
        a = await self.sender.attempt(d, ep)
        self._log_attempt(d, a.record(), a.request)
        return a

    def _log_attempt(
        self, d: Delivery, attempt: dict[str, Any], request: dict[str, Any] | None = None
    ) -> None:
        rec: dict[str, Any] = {
            "delivery_id": d.id,
            "endpoint_id": d.endpoint_id,
            "event": d.event,
            "mode": d.mode,
            **attempt,
        }
        if request is not None:
            rec["request"] = request
        # The attempt log is observability: queue it, do not hold the delivery for its ack.
        self.outbox.send_untracked(route.ATTEMPTS, d.endpoint_id, orjson.dumps(rec))

    async def disable_endpoint(self, endpoint_id: str, reason: str, tries: int = 5) -> bool:
        """Disable after a 410 or by auto-disable (app/breaker.py); True if this call did. The write is based on the version this worker's view holds; if
        another write based on it came first (an update, a rotation), re-read and try again, so both
        survive (app/endpoints.py `RegistryState`)."""

        async def send(value: Any) -> None:
            raw = None if value is None else orjson.dumps(value)
            await self.outbox.publish(route.ENDPOINTS, endpoint_id, raw)

        for _ in range(tries):
            ep = self.registry.get(endpoint_id)
            if ep is None or not ep.enabled:
                return False
            try:
                await self.registry.write(endpoint_id, ep.changed(enabled=False, disabled_reason=reason), send)
            except StaleWrite as exc:
                log.info("disabling %s (%s): %s; re-reading", endpoint_id, reason, exc)
                continue
            except TimeoutError:
                log.warning("endpoint %s: disable (%s) sent, not yet read back", endpoint_id, reason)
            log.warning("endpoint %s disabled: %s", endpoint_id, reason)
            return True
        log.error("endpoint %s: not disabled (%s): %d concurrent writes came first", endpoint_id, reason, tries)
        return False
