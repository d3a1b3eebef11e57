"""Offset bookkeeping for consumers that finish records out of order (many HTTP attempts at once).

A record's offset may be committed only when it and every record before it in its partition are
finished: committing past an unfinished record would skip it after a restart (faust #527/#606).
"""

from __future__ import annotations

from collections import deque


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
