"""Endpoint health: a circuit breaker per endpoint, auto-disable, and the operator's notification.

- **Breaker** (`Breakers`): closed, it lets every attempt through. It opens after
  `breaker_failures` consecutive failed attempts, or when more than `breaker_rate` of at least
  `breaker_min_attempts` attempts in the last `breaker_window` seconds failed. Open, it holds every
  delivery back: `route.held` sends it on to the next retry tier without an attempt (so it keeps
  its id and still ends in the DLQ after the last tier). After `breaker_cooldown` it is half-open:
  the next delivery is the one probe (one at a time); a success closes the breaker, a failure opens
  it for another cooldown. Any change to the endpoint (re-enabled, new URL) closes it.
- **Auto-disable**: an endpoint whose attempts have all failed for `auto_disable_after` (no success
  in between, counted from its first failure or its last change, whichever is later) is disabled
  through the registry's versioned write (`Dispatcher.disable_endpoint`, as a 410 does), with a log
  line, `webhooks_endpoints_auto_disabled_total`, and, if set, a signed POST to the operator webhook.
  Its deliveries are then parked in the DLQ (`endpoint_disabled`), never dropped, and re-enabling it
  offers to replay them (`POST /api/endpoints/{id}/enable?replay=true`, `endpoints enable --replay`).

**Across workers** the breaker is an approximation: each worker keeps its own, fed by the attempts
it makes (the deliveries of the partitions it owns). A dead endpoint opens every worker's breaker
after `breaker_failures` failures each, and then gets at most one probe per worker per cooldown.
Nothing is shared through Kafka, so a breaker costs no extra record per attempt; a restarted
worker starts closed (and restarts its auto-disable clock: the longest-running worker that keeps
seeing failures disables the endpoint). The admin API shows the breaker of the worker that answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app import metrics
from app.config import HealthSettings, Settings

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
_BUCKETS = 12  # the failure-rate window in this many slices: bounded memory per endpoint
PROBE = "probe"  # what `admit` answers for the one attempt of a half-open breaker
ATTEMPT = "attempt"


@dataclass(slots=True)
class EndpointBreaker:
    state: str = CLOSED
    streak: int = 0  # consecutive failed attempts
    failing_since: float | None = None  # first failure of the streak
    opened_at: float | None = None
    opened_because: str | None = None
    probe_since: float | None = None  # a probe is out since then
    last_success: float | None = None
    last_failure: float | None = None
    held: int = 0  # deliveries held back since it last opened
    # (slice start, ok, failed) for the failure rate, oldest first
    window: deque[list[float]] = field(default_factory=deque)

    def view(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self.streak,
            "failing_since": self.failing_since,
            "opened_at": self.opened_at,
            "opened_because": self.opened_because,
            "probe_in_flight": self.probe_since is not None,
            "held_since_opened": self.held,
            "last_success": self.last_success,
            "last_failure": self.last_failure,
        }


class Breakers:
    """Every endpoint's breaker in this worker (pure state: no I/O)."""

    def __init__(self, settings: HealthSettings, probe_timeout: float = 60.0) -> None:
        self.cfg = settings
        self.probe_timeout = probe_timeout  # a probe that never reported (cancelled) frees its slot
        self._by_id: dict[str, EndpointBreaker] = {}

    def _get(self, ep_id: str, changed_at: float) -> EndpointBreaker:
        b = self._by_id.get(ep_id)
        if b is None:
            b = self._by_id[ep_id] = EndpointBreaker()
        elif b.opened_at is not None and changed_at > b.opened_at:
            self._close(ep_id, b, "the endpoint was changed")  # re-enabled, new URL: start afresh
        return b

    def admit(self, ep_id: str, changed_at: float, now: float) -> str | None:
        """ATTEMPT, PROBE (the one attempt of a half-open breaker), or None: hold the delivery."""
        b = self._get(ep_id, changed_at)
        if b.state == CLOSED:
            return ATTEMPT
        if b.probe_since is not None and now - b.probe_since < self.probe_timeout:
            b.held += 1
            return None
        if b.state == OPEN and now - (b.opened_at or 0) < self.cfg.breaker_cooldown:
            b.held += 1
            return None
        self._set(ep_id, b, HALF_OPEN)
        b.probe_since = now
        return PROBE

    def release(self, ep_id: str, gate: str | None) -> None:
        """An admitted attempt was not made after all (its endpoint saturated): free the probe."""
        b = self._by_id.get(ep_id)
        if gate == PROBE and b is not None:
            b.probe_since = None

    def record(self, ep_id: str, ok: bool, gate: str | None, now: float) -> None:
        """The outcome of an attempt `admit` let through."""
        b = self._by_id.get(ep_id)
        if b is None:
            b = self._by_id[ep_id] = EndpointBreaker()
        if gate == PROBE:
            b.probe_since = None
        self._count(b, ok, now)
        if ok:
            b.streak, b.failing_since, b.last_success = 0, None, now
            if b.state != CLOSED:
                self._close(ep_id, b, "the probe succeeded" if gate == PROBE else "an attempt succeeded")
            return
        b.streak += 1
        b.last_failure = now
        if b.failing_since is None:
            b.failing_since = now
        if b.state == HALF_OPEN and gate == PROBE:
            self._open(ep_id, b, now, "the probe failed")
        elif b.state == CLOSED:
            why = self._trips(b, now)
            if why:
                self._open(ep_id, b, now, why)

    def overdue(self, ep_id: str, changed_at: float, now: float) -> float | None:
        """How long the endpoint has been failing if that reaches `auto_disable_after`, else None."""
        b = self._by_id.get(ep_id)
        after = self.cfg.auto_disable_after
        if after <= 0 or b is None or b.failing_since is None or not b.streak:
            return None
        failing = now - max(b.failing_since, changed_at)
        return failing if failing >= after else None

    def view(self, ep_id: str, now: float | None = None) -> dict[str, Any]:
        b = self._by_id.get(ep_id) or EndpointBreaker()
        return b.view(time.time() if now is None else now)

    def forget(self, ep_id: str) -> None:
        self._by_id.pop(ep_id, None)

    # ---- inside -----------------------------------------------------------------------------------
    def _trips(self, b: EndpointBreaker, now: float) -> str | None:
        cfg = self.cfg
        if cfg.breaker_failures and b.streak >= cfg.breaker_failures:
            return f"{b.streak} consecutive failures"
        if cfg.breaker_rate > 0:
            ok = sum(s[1] for s in b.window)
            failed = sum(s[2] for s in b.window)
            total = ok + failed
            if total >= cfg.breaker_min_attempts and failed / total > cfg.breaker_rate:
                return f"{failed} of {int(total)} attempts failed in {cfg.breaker_window:g}s"
        return None

    def _count(self, b: EndpointBreaker, ok: bool, now: float) -> None:
        size = self.cfg.breaker_window / _BUCKETS
        while b.window and b.window[0][0] <= now - self.cfg.breaker_window:
            b.window.popleft()
        if not b.window or now - b.window[-1][0] >= size:
            b.window.append([now, 0, 0])
        b.window[-1][1 if ok else 2] += 1

    def _open(self, ep_id: str, b: EndpointBreaker, now: float, why: str) -> None:
        first = b.state == CLOSED
        b.opened_at, b.opened_because = now, why
        if first:
            b.held = 0
            log.warning("endpoint %s: circuit breaker open (%s); deliveries wait in the retry tiers", ep_id, why)
        self._set(ep_id, b, OPEN)

    def _close(self, ep_id: str, b: EndpointBreaker, why: str) -> None:
        log.info("endpoint %s: circuit breaker closed (%s) after holding %d deliveries", ep_id, why, b.held)
        b.opened_at = b.opened_because = b.probe_since = None
        b.held = 0
        self._set(ep_id, b, CLOSED)

    @staticmethod
    def _set(ep_id: str, b: EndpointBreaker, state: str) -> None:
        b.state = state
        metrics.child(metrics.BREAKER_STATE, ep_id).set(_GAUGE[state])


class EndpointHealth:
    """The dispatcher's side of endpoint health: the breakers, and auto-disable with its notice.

    `disable(endpoint_id, reason) -> bool` is the registry's versioned disable (Dispatcher's);
    `sender` is the worker's HttpSender, which signs and sends the operator webhook through the
    same SSRF guard as any delivery.
    """

    def __init__(
        self, settings: Settings, sender: Any, disable: Callable[[str, str], Awaitable[bool]]
    ) -> None:
        self.settings = settings
        self.cfg = settings.health
        self.breakers = Breakers(self.cfg, probe_timeout=settings.delivery_timeout + 5)
        self.sender = sender
        self._disable = disable
        self._disabling: set[str] = set()
        self._notices: set[asyncio.Task[None]] = set()

    def admit(self, ep: Any) -> str | None:
        return self.breakers.admit(ep.id, ep.updated_at, time.time())

    async def after(self, ep: Any, ok: bool, gate: str | None) -> None:
        """Count an attempt's outcome; disable the endpoint if it has failed for too long."""
        now = time.time()
        self.breakers.record(ep.id, ok, gate, now)
        if not ok:
            await self.check(ep, now)

    async def check(self, ep: Any, now: float | None = None) -> None:
        """Disable `ep` if it has been failing for `auto_disable_after` (also asked on each hold,
        so an open breaker, which makes few attempts, still gets there)."""
        now = time.time() if now is None else now
        failing = self.breakers.overdue(ep.id, ep.updated_at, now)
        if failing is None or ep.id in self._disabling:
            return
        self._disabling.add(ep.id)
        try:
            reason = f"failing continuously for {_span(failing)} (auto-disabled)"
            if await self._disable(ep.id, reason):
                metrics.ENDPOINTS_AUTO_DISABLED.inc()
                log.error(
                    "endpoint %s (%s) auto-disabled: %s; its deliveries are parked in the DLQ until it is "
                    "re-enabled (with replay)", ep.id, ep.url, reason,
                )
                self._notify(ep, reason, failing, now)
        finally:
            self._disabling.discard(ep.id)

    def _notify(self, ep: Any, reason: str, failing: float, now: float) -> None:
        if not self.cfg.operator_webhook_url:
            return
        task = asyncio.create_task(self._send_notice(ep, reason, failing, now), name=f"notice-{ep.id}")
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _send_notice(self, ep: Any, reason: str, failing: float, now: float, tries: int = 5) -> None:
        """POST the operator webhook (signed like a delivery, with WEBHOOKS_OPERATOR_WEBHOOK_SECRET);
        tried a few times with backoff, then given up with an error line (the log line and the
        metric have already told)."""
        from app.delivery import Delivery
        from app.endpoints import Endpoint
        from app.events import now_rfc3339

        target = Endpoint(
            id="operator",
            url=str(self.cfg.operator_webhook_url),
            events=(),
            mode="immediate",
            secret=str(self.cfg.operator_webhook_secret),
        )
        notice = Delivery(
            id=f"ntc_{ep.id}_{int(now)}",
            endpoint_id=ep.id,
            event="endpoint.auto_disabled",
            event_id=f"{ep.id}:{int(now)}",
            occurred_at=now_rfc3339(now),
            occurred_ts=now,
            resource_key=f"endpoint:{ep.id}",
            data={
                "endpoint_id": ep.id,
                "url": ep.url,
                "description": ep.description,
                "reason": reason,
                "failing_seconds": round(failing, 1),
                "disabled_at": now,
                "replay": f"POST /api/endpoints/{ep.id}/enable?replay=true",
            },
            mode="immediate",
        )
        for n in range(1, tries + 1):
            a = await self.sender.attempt(notice, target)
            if a.ok:
                log.info("operator webhook told of %s's auto-disable", ep.id)
                return
            log.warning("operator webhook: try %d of %d failed: %s", n, tries, a.error)
            notice.attempts.append(a.record())
            await asyncio.sleep(min(2.0**n, 60.0))
        log.error("operator webhook: not told of %s's auto-disable after %d tries", ep.id, tries)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
