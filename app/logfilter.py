"""Log hygiene while Kafka is away: the same complaint once per interval, not hundreds a second.

With the broker down, aiokafka's clients (Faust's consumer, the retry tiers, the topic followers)
log every reconnect and metadata attempt at ERROR, ~150 lines a second per worker, and our lag
timer failed once a second. `RepeatFilter` lets the first record of each kind through, drops the
repeats for `interval` seconds, and then says how many it dropped.
"""

from __future__ import annotations

import logging
import time


class RepeatFilter(logging.Filter):
    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)  # the template: "Unable connect to node with id %s: %s"
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.msg = f"{record.msg} ({last[1]} more like this in the last {now - last[0]:.0f}s)"
        self._seen[key] = (now, 0)
        if len(self._seen) > 1000:  # bounded: templates are few, but never grow without limit
            self._seen.clear()
        return True


def quiet_repeats(*names: str, interval: float = 30.0) -> RepeatFilter:
    """Install one RepeatFilter on each named logger (records of its children pass through it)."""
    f = RepeatFilter(interval)
    for name in names:
        logging.getLogger(name).addFilter(f)
    return f
