"""What the delivery agent and the retry tiers share: one record in, one `Dispatcher.dispatch`.

A variant (the Kafka client differs: librdkafka, aiokafka) implements `start`, `stop`, `where` and
`deliver`; it calls `take` for each record it reads (which never waits), pauses its partitions while
`full` and resumes them once `has_room`, always polling; it commits `book.to_commit()` with its own
client, and on a revocation waits `book.until_finished` for the revoked partitions before it commits
and forgets them. A record is decoded and validated strictly before anything is attempted; what
cannot be decoded, validated or handled (3 tries) is parked as poison and finished.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any, Generic

from app.config import Settings
from app.delivery import Delivery, InvalidDelivery
from app.dispatch import Dispatcher
from app.offsets import K, OffsetBook, PartitionOffsets, lag
from app.route import TRIES

log = logging.getLogger(__name__)


class RecordConsumer(ABC, Generic[K]):
    name = "consumer"

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        *,
        max_records: int,
        tasks: set[asyncio.Future[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.book: OffsetBook[K] = OffsetBook()
        # Records taken and not finished. `take` never waits: the variant pauses its partitions when
        # `full` and resumes them when `has_room`, and keeps polling meanwhile, so a hung endpoint
        # holding every slot never blocks a consumer thread past max.poll.interval (issue 11).
        self.max_records = max_records
        self.held = 0
        # Work started for records not yet finished; the worker drains it before a graceful stop.
        self.tasks: set[asyncio.Future[Any]] = set() if tasks is None else tasks

    @property
    def full(self) -> bool:
        return self.held >= self.max_records

    @property
    def has_room(self) -> bool:
        """Below half the cap: resume (the gap keeps pause/resume from flapping on every record)."""
        return self.held <= self.max_records // 2

    def learn_successes(self) -> None:
        """Call when partitions are assigned, before reading them: they may come from a worker that
        died, whose uncommitted records are read again here. Learning what it had delivered lets the
        Dispatcher skip those (app/successes.py) instead of sending them twice. Blocking (from a
        consumer thread; on the event loop `await dispatcher.successes.catch_up_async()`)."""
        n = self.dispatcher.successes.catch_up()
        log.info("%s: %d successes learnt from the attempt log", self.name, n)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None:
        """Stop reading, let the started records finish, commit them, leave the group."""

    @abstractmethod
    async def deliver(self, partition: K, delivery: Delivery) -> None:
        """Dispatch one decoded delivery read from `partition`."""

    def take(self, partition: K, offset: int, key: bytes | None, value: bytes | None) -> bool:
        """Start one record as a task, at once (never waits); False if its partition is not ours
        (any more): its next owner reads it. The caller pauses its partitions while `full`."""
        book = self.book.get(partition)
        if book is None:
            return False
        self.held += 1
        book.start(offset)
        task = asyncio.get_running_loop().create_task(self._one(partition, book, offset, key, value))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _one(
        self, partition: K, book: PartitionOffsets, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        try:
            error = await self._handle(partition, offset, value)
            if error is not None:
                topic, number = self.where(partition)
                await self.dispatcher.park_poison(key, value, topic, number, offset, error)
            book.finish(offset)
        except asyncio.CancelledError:
            raise  # the worker is exiting: unfinished, so never committed; read again by the next owner
        except Exception:
            # Only a bug in the bookkeeping above gets here (park_poison retries until it lands).
            log.exception("%s: record at %s offset %s failed; left uncommitted", self.name, partition, offset)
        finally:
            self.held -= 1

    async def _handle(self, partition: K, offset: int, value: bytes | None) -> BaseException | None:
        """Decode, validate and deliver one record; the error that makes it poison, or None.

        Strict validation comes first, so a mistyped record is never POSTed. A valid record whose
        handling raises is tried `TRIES` times in all (each from its original bytes: a failed try may
        have changed the decoded delivery), then it is poison too: commits never wait on it."""
        error: BaseException | None = None
        for n in range(1, TRIES + 1):
            try:
                d = Delivery.decode(value or b"")
            except InvalidDelivery as exc:
                log.error("%s: record at %s offset %s is not a delivery: %s", self.name, partition, offset, exc)
                return exc
            try:
                await self.deliver(partition, d)
                return None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
                log.exception("%s: try %d of %d at %s offset %s failed", self.name, n, TRIES, partition, offset)
                if n < TRIES:
                    await asyncio.sleep(0.2 * n)
        return error

    @abstractmethod
    def where(self, partition: K) -> tuple[str, int]:
        """The full topic name and partition number of `partition`."""

    def lag_of(self, partition: K, end: int | None, position: int | None) -> int | None:
        return lag(end, self.book.committed(partition), position)
