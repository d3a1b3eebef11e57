"""Offset bookkeeping for consumers that finish records out of order (many HTTP attempts at once).

A record's offset may be committed only when it and every record before it in its partition are
finished: committing past an unfinished record would skip it after a restart (faust #527/#606).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Collection, Mapping
from typing import Any


class PartitionOffsets:
    """In-order bookkeeping of one partition's started and finished offsets."""

    __slots__ = ("committed", "done", "started")

    def __init__(self) -> None:
        self.started: deque[int] = deque()
        self.done: set[int] = set()
        self.committed: int | None = None

    def start(self, offset: int) -> None:
        self.started.append(offset)

    def finish(self, offset: int) -> None:
        self.done.add(offset)

    def committable(self) -> int | None:
        """Offset to commit: one past the longest finished prefix."""
        last = None
        while self.started and self.started[0] in self.done:
            last = self.started.popleft()
            self.done.discard(last)
        return None if last is None else last + 1

    @property
    def unfinished(self) -> int:
        """Started and not finished yet (finished records wait in `started` until committable())."""
        return len(self.started) - len(self.done)


async def until_finished(
    books: Mapping[Any, PartitionOffsets], keys: Collection[Any], timeout: float
) -> None:
    """Wait, at most `timeout` seconds, until no record of these partitions is unfinished (before
    they are committed and handed over). Looked up on every round: a book may be dropped meanwhile."""
    deadline = time.monotonic() + timeout
    while any((b := books.get(k)) is not None and b.unfinished for k in keys):
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)
