"""Whether this worker process can still do its job, and what happens when it cannot.

A component that stops for good (Faust's fetcher, a topic follower, the retry tiers' consumer, a
producer that cannot be recreated) must never leave a live process that delivers nothing: `fail`
records the first such failure, `/ready` answers 503 from then on, and the worker stops with a
non-zero exit status (`EXIT_FAILED`) so that an orchestrator restarts it. The stop is graceful
(in-flight work finishes) but bounded: a watchdog ends the process after `HARD_EXIT_AFTER` seconds.

Errors a retry can fix (a broker restart, a rebalance) are not failures: `is_fatal` tells them apart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("perfex_webhooks")

EXIT_FAILED = 70  # EX_SOFTWARE: "an internal software error"; systemd and Kubernetes restart on it
HARD_EXIT_AFTER = 45.0  # seconds a failed worker may spend stopping gracefully
STOP_AFTER = 2.0  # seconds a failed worker answers /ready with 503 before its port closes


class Health:
    def __init__(self) -> None:
        self.failure: str | None = None
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def ok(self) -> bool:
        return self.failure is None

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) once, when the first failure is recorded."""
        self._listeners.append(callback)

    def fail(self, component: str, reason: BaseException | str) -> None:
        """Record that `component` stopped for good; the first failure stops the worker."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = f"{component}: {reason!r}" if isinstance(reason, BaseException) else f"{component}: {reason}"
        log.critical("%s stopped working (%s); the worker exits so that it is restarted", component, reason)
        for callback in self._listeners:
            try:
                callback()
            except Exception:
                log.exception("health listener")


def is_fatal(exc: BaseException) -> bool:
    """True for an error of an aiokafka read (getmany) that reading again cannot fix: an
    unsupported codec, a corrupt batch, a missing authorization, or an error that is not Kafka's
    at all (a bug). False for what a broker restart or a rebalance explains."""
    from aiokafka import errors

    if isinstance(exc, errors.KafkaError):
        return isinstance(
            exc,
            (
                errors.UnsupportedCodecError,
                errors.CorruptRecordException,
                errors.RecordTooLargeError,
                errors.TopicAuthorizationFailedError,
                errors.GroupAuthorizationFailedError,
                errors.UnsupportedVersionError,
            ),
        )
    return not isinstance(exc, (OSError, TimeoutError, errors.ConsumerStoppedError))


def exit_on_failure(health: Health, stop: Callable[[], None]) -> None:
    """Wire a worker's stop to `health`: a failure starts a graceful stop, and a watchdog ends the
    process with EXIT_FAILED if that stop hangs."""

    def failed() -> None:
        watchdog = threading.Timer(HARD_EXIT_AFTER, lambda: os._exit(EXIT_FAILED))
        watchdog.daemon = True
        watchdog.start()
        stop()

    health.on_failure(failed)


HEALTH = Health()  # the process's one record: every component reports here
