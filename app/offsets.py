"""Offset bookkeeping for consumers that finish records out of order (many HTTP attempts at once),
and the one lag formula every consumer reports with.

A record's offset may be committed only when it and every record before it in its partition are
finished: committing past an unfinished record would skip it after a restart (faust #527/#606).
`OffsetBook` keeps that per partition for one consumer (app/consumers/); `lag` is also what the
Faust fan-out reports (app/observe.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Collection, Iterable
from typing import Generic, TypeVar

K = TypeVar("K")  # what names a partition for one consumer: a number, or a TopicPartition


class PartitionOffsets:
    """In-order bookkeeping of one partition's started and finished offsets."""

    __slots__ = ("committed", "done", "finished", "started")

    def __init__(self) -> None:
        self.started: deque[int] = deque()
        self.done: set[int] = set()
        self.finished: int | None = None  # one past the finished prefix seen so far
        self.committed: int | None = None  # what the last commit (believed to succeed) stored

    def start(self, offset: int) -> None:
        self.started.append(offset)

    def finish(self, offset: int) -> None:
        self.done.add(offset)

    def committable(self) -> int | None:
        """One past the longest finished prefix, if it grew since the last call; None otherwise."""
        last = None
        while self.started and self.started[0] in self.done:
            last = self.started.popleft()
            self.done.discard(last)
        if last is None:
            return None
        self.finished = last + 1
        return self.finished

    @property
    def unfinished(self) -> int:
        """Started and not finished yet (finished records wait in `started` until committable())."""
        return len(self.started) - len(self.done)


class OffsetBook(Generic[K]):
    """One consumer's `PartitionOffsets`, per assigned partition.

    A revocation drops a partition's entry, so a record that finishes after its partition moved
    marks an orphan instead of the next assignment's bookkeeping.
    """

    def __init__(self) -> None:
        self.partitions: dict[K, PartitionOffsets] = {}

    def assign(self, keys: Iterable[K]) -> None:
        for k in keys:
            self.partitions[k] = PartitionOffsets()

    def forget(self, keys: Iterable[K]) -> None:
        for k in keys:
            self.partitions.pop(k, None)

    def get(self, key: K) -> PartitionOffsets | None:
        return self.partitions.get(key)

    def committed(self, key: K) -> int | None:
        book = self.partitions.get(key)
        return None if book is None else book.committed

    def to_commit(self, keys: Collection[K] | None = None) -> dict[K, int]:
        """The offsets to commit now (one past each finished prefix that moved since the last
        commit), already marked committed: call `failed` with them if the commit fails."""
        out: dict[K, int] = {}
        for k, book in list(self.partitions.items()):
            if keys is not None and k not in keys:
                continue
            book.committable()
            if book.finished is not None and book.finished != book.committed:
                out[k] = book.committed = book.finished
        return out

    def failed(self, offsets: Iterable[K]) -> None:
        """A commit of these partitions failed: offer them again next time."""
        for k in offsets:
            book = self.partitions.get(k)
            if book is not None:
                book.committed = None

    async def until_finished(self, keys: Collection[K], timeout: float) -> None:
        """Wait, at most `timeout` seconds, until no record of these partitions is unfinished (before
        they are committed and handed over). Looked up on every round: a partition may be dropped."""
        deadline = time.monotonic() + timeout
        while any((b := self.partitions.get(k)) is not None and b.unfinished for k in keys):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.02)


def lag(end: int | None, committed: int | None, position: int | None) -> int | None:
    """Records behind the end of one partition: its end offset minus the committed offset (the fetch
    position while this consumer has committed nothing there); None when either is unknown."""
    done = committed if committed is not None else position
    if end is None or done is None or end < 0 or done < 0:
        return None
    return max(0, int(end) - int(done))
