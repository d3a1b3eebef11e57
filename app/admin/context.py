"""What every admin route shares: the worker's components, the attempt log, Kafka writes and the
freshness waits that give read-your-writes across workers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from app import route
from app.admin.http import ApiError
from app.attempt_log import AttemptLog
from app.config import Settings
from app.endpoints import Endpoint, StaleWrite, update_endpoint
from app.outbox import PublishError

log = logging.getLogger("app.admin")

KAFKA_TIMEOUT = 15.0  # seconds to wait for Kafka to acknowledge an admin write


class AdminContext:
    def __init__(self, settings: Settings, components: Any) -> None:
        self.settings = settings
        self.components = components
        # Followed from the first API request on, not from start: reading back every attempt record
        # costs a worker CPU per delivery, and most workers never serve the admin API.
        self.attempts = AttemptLog(settings)
        self._attempts_lock = asyncio.Lock()
        self._attempts_started = False
        self.write_lock = asyncio.Lock()  # one registry read-modify-write at a time per worker
        self.insecure = not settings.admin_token and settings.admin_insecure

    async def stop(self) -> None:
        try:
            await self.attempts.stop()
        except Exception:
            log.exception("stopping the attempt log")

    @property
    def dlq(self) -> Any:
        """The worker's one DLQ view (app/observe.py), shared with the dispatcher."""
        return self.components.dlq_view

    @property
    def registry(self) -> Any:
        return self.components.registry

    async def follow_attempts(self, timeout: float = 10.0) -> None:
        """Start following webhooks.attempts if this is the first API request; wait until the view
        holds what was written before it (the latest records per partition), within `timeout`."""
        if not self._attempts_started:
            async with self._attempts_lock:
                if not self._attempts_started:
                    try:
                        await self.attempts.start()
                    except Exception as exc:  # Kafka unreachable: answer without attempts, retry later
                        log.warning("attempt log not available: %s", exc)
                        return
                    self._attempts_started = True
        if not self.attempts.ready.is_set():
            try:
                await asyncio.wait_for(self.attempts.ready.wait(), timeout)
            except TimeoutError:
                log.info("attempt log still catching up; answering from what it has")

    # ---- Kafka ------------------------------------------------------------------------------------
    async def acked(self, topic: str, key: str, value: Any) -> None:
        """Write one record through the worker's prompt producer (no linger: the caller is waiting)
        and wait for Kafka's acknowledgement."""
        try:
            # One deadline, no task per wait (asyncio.wait_for makes one: 2 per single-event POST).
            async with asyncio.timeout(KAFKA_TIMEOUT):
                await (await self.components.prompt_outbox.send(topic, key, value))
        except (TimeoutError, OSError) as exc:
            raise ApiError(503, "Kafka did not acknowledge the write; try again") from exc
        except PublishError as exc:
            raise ApiError(503, f"Kafka refused the write: {exc}") from exc

    async def registry_fresh(self) -> None:
        """Include every registry write acknowledged before this request (e.g. by the CLI)."""
        try:
            await asyncio.wait_for(self.registry.table.caught_up(5), 6)
        except Exception as exc:  # Kafka unreachable: answer from the view we have
            log.info("registry view not confirmed fresh: %s", exc)

    async def dlq_view(self) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self.dlq.ready.wait(), 15)
        except TimeoutError as exc:
            raise ApiError(503, "the DLQ view is still loading; try again") from exc
        return self.dlq.data  # type: ignore[no-any-return]

    async def dlq_entries(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Whole DLQ entries (data, history) read from Kafka: the view keeps only an index."""
        await self.dlq_view()  # loaded (or 503)
        try:
            return await asyncio.wait_for(self.dlq.fetch(ids), KAFKA_TIMEOUT * 2)  # type: ignore[no-any-return]
        except TimeoutError as exc:
            raise ApiError(503, "Kafka did not answer reading the DLQ; try again") from exc

    async def dlq_fresh(self) -> None:
        try:
            await asyncio.wait_for(self.dlq.caught_up(5), 6)
        except Exception as exc:
            log.info("DLQ view not confirmed fresh: %s", exc)

    # ---- endpoints ----------------------------------------------------------------------------------
    def endpoint(self, ep_id: str) -> Endpoint:
        ep = self.registry.get(ep_id)
        if ep is None:
            raise ApiError(404, f"no endpoint {ep_id[:80]}")
        return ep  # type: ignore[no-any-return]

    def endpoint_view(self, ep: Endpoint, parked: dict[str, int] | None = None) -> dict[str, Any]:
        """An endpoint as the API shows it; `parked` (replayable DLQ entries per endpoint id, see
        `parked_counts`) saves a scan of the DLQ view per endpoint in a listing."""
        view = ep.public()
        view["failure_streak"] = self.attempts.streak(ep.id)
        view["last_attempt"] = self.attempts.last(ep.id)
        view["last_hour"] = self.attempts.stats(ep.id, time.time())
        view["breaker"] = self.components.dispatcher.health.breakers.view(ep.id)  # this worker's
        view["parked"] = (self.parked_counts() if parked is None else parked).get(ep.id, 0)
        return view

    def parked_counts(self) -> dict[str, int]:
        """Replayable DLQ entries per endpoint, from the DLQ index (empty while it loads)."""
        from collections import Counter

        view = getattr(self.dlq, "data", None) or {}
        return Counter(e.endpoint_id for e in list(view.values()) if e.replayable and e.endpoint_id)

    async def change(self, ep: Endpoint, changes: dict[str, Any]) -> Endpoint:
        """Apply `changes` to `ep` (validated: 400 naming the field) and store it; both APIs'
        updates. Call under `write_lock`, with `ep` read fresh."""
        try:
            new = await asyncio.to_thread(update_endpoint, self.settings, ep, changes)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        if changes.get("enabled") is False:
            new = new.changed(disabled_reason="disabled by operator")
        return await self.store(new.id, new) or new

    async def store(self, ep_id: str, ep: Endpoint | None) -> Endpoint | None:
        """Write `ep` (None: delete) and read it back: 409 if a write based on the same version
        came first (from another worker, the CLI or a 410), 503 if the outcome is not confirmed.
        Returns the endpoint as written (its new version)."""

        async def send(value: Any) -> None:
            await self.acked(route.ENDPOINTS, ep_id, value)

        try:
            return await self.registry.write(ep_id, ep, send)  # type: ignore[no-any-return]
        except StaleWrite as exc:
            raise ApiError(409, str(exc)) from exc
        except TimeoutError as exc:
            raise ApiError(503, "the write was sent but this worker could not read it back; check") from exc
