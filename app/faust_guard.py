"""Every workaround of a Faust bug, and the start-up check that they still fit the installed Faust.

The fan-out agent runs on faust-streaming, which loses input records around rebalances and commits
past records that are not done. tests/test_scale.py lost 1 to 14 events per scale-out to these
before the workarounds below. Each touches Faust internals, so each is written for exactly one
faust-streaming release (`WRITTEN_FOR`, pinned in pyproject.toml; tests/test_faust_guard.py fails
when the pin moves): `install` first checks that release and every private it uses (`PRIVATES`), and
refuses to start the worker otherwise, instead of raising inside Faust's rebalance later.

- `_commit_only_acked` (faust-streaming #606, "Wrong offset commit in case of gaps"):
  `Consumer._new_offset` tolerates exactly one missing record at the head of a partition: with the
  committed offset at N and N+1, N+2... acked it commits past N, though N was never acked (dropped,
  or still in flight in our concurrent agent: a rebalance commits while it waits for in-flight
  records). Patched process-wide: for our stream topics a commit stops at the first record not
  acked, and Faust's "gaps" (offsets it counts as acked because it never saw them) are discarded,
  our input topics being neither compacted nor transactional; a gap there is a dropped record.
- `_reseek_after_flow_resume` (faust-streaming #596, records dropped on rebalance): while a
  rebalance suspends the flow, Faust drops the records queued for the agents (flow control clears
  the queues) and one being handed over when the flow stops, though their read offsets are
  recorded. When the flow resumes, each stream partition is sought back to its first record that
  was still queued; a partition never committed gets its earliest offset as the head the commit
  guard must see acked first.
- `_reread_dropped_heads` (#596 again, the record being handed over): a stream partition whose head
  record is neither acked nor anywhere in the worker while later records are acked is read again
  from its head, after two 2-second ticks in that state. The head is the offset Faust committed,
  or the one a commit still on its way will store (`_track_commits`): Faust takes a commit's
  records out of its acked list before the commit and records the new offset only after it, so a
  commit that hangs (on a dead group coordinator for 10 s and more, in a rebalance, or the first
  commits of a new group) looks exactly like a dropped head. Re-reading then fanned the records
  since the last commit out again (issue 11: 6-8 partitions during a broker failover, and once on a
  quiet broker seconds after a worker started).

- `InOrder` (#596, at the agent: order, not loss): the repairs above read a dropped record again
  only after the records behind it went through the agent, so one resource's later events were
  fanned out before an earlier one (issue 18: an ordered endpoint got [2, 3, 4, 1]). The fan-out
  agent asks `InOrder.accept` for every record: a record whose predecessor in the partition never
  reached the agent is not handled; the partition is sought back to that predecessor, and what
  was read past it comes again, in order. Records read again after a seek back are handled again
  (at-least-once). A gap that a re-read cannot fill (offsets that do not exist: retention deleted
  them) is logged and passed. After each assignment the record expected first is the committed
  one (`_in_order_from_the_commit`, after Faust's own seek to it), so a seek forward by a repair
  is caught too.
- `ReadOffsets` (every seek back above): Faust's fetch loop drops a record below the partition's
  read offset, which the records fetched before a seek still move past the seek's offset: the
  records read again were dropped as old. A partition sought back keeps its read offset at the
  seek's offset until the agent has the record there.

- `_hand_over_without_tasks` (CPU, not records): Faust's fetch loop hands each record to the
  agents through mode's `Service.wait_first(callback, suspend_flow.wait())`, which makes four tasks
  and an `asyncio.wait` per record so that a rebalance's `stop_flow` can interrupt a hand-over that
  waits (a full agent queue). The hand-over is now awaited directly and `stop_flow` cancels it when
  it is under way: the same outcome (the record is dropped as before, and read again by the repairs
  above) without a task per record.
- `_lazy_commit_tables` (CPU, not records): `Consumer._commit_offsets` renders a terminal table of
  the offsets (terminaltables) on every commit, 5 a second, for a `dev`-level log line that is never
  printed: 45 % of the commits' CPU in docs/performance.md 5.1. The table is now rendered only if
  the line is.
- `RecoveryWatch` (a stall, not records): a table recovery that stops reading changelog records
  never ends, and the worker's stream partitions stay paused meanwhile (once in ~20 runs of
  tests/test_scale.py, cause not found). No progress for 15 s is logged with what the fetch loop is
  doing; for 90 s it fails the worker, which exits, is restarted and recovers anew.

Records read again are processed twice (at-least-once, same delivery ids). `committed_offset` reads
Faust's own record of its commits for the lag gauge: there is no public accessor.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Faust takes seconds to import: the CLI checks the version before it does
    import faust

log = logging.getLogger("perfex_webhooks")

WRITTEN_FOR = "0.15.3"  # the faust-streaming release these workarounds were written against
REREAD_INTERVAL = 2.0  # seconds between looks for a dropped head record
RECOVERY_STALL_LOG = 15.0  # a table recovery without progress this long: log what the fetch loop does
RECOVERY_STALL_FAIL = 90.0  # ... this long: the worker fails (it exits, is restarted, recovers anew)

# Per Faust consumer: the offsets a commit in progress will store (tp -> offset), see _track_commits.
_COMMITTING: weakref.WeakKeyDictionary[Any, dict[Any, int]] = weakref.WeakKeyDictionary()

# Every private the workarounds use, where it lives: (owner, attribute).
PRIVATES = (
    ("faust.transport.consumer.Consumer", "_new_offset"),
    ("faust.transport.consumer.Consumer", "_commit_offsets"),
    ("app.consumer", "_committed_offset"),
    ("app.consumer", "_gap"),
    ("app.consumer", "_acked"),
    ("app.consumer", "_unacked_messages"),
    ("app.consumer", "_read_offset"),  # replaced by a ReadOffsets (its fetch loop's check)
    ("app.consumer", "perform_seek"),  # its seek to the committed offsets, followed by InOrder
    ("app.consumer", "wait_first"),  # the fetch loop's hand-over (mode's Service.wait_first)
    ("app.consumer", "stop_flow"),
    ("app.consumer", "suspend_flow"),
    ("app.flow_control", "_queues"),
    ("app.flow_control", "resume"),
    ("asyncio.Queue()", "_queue"),  # FlowControlQueue's items
    ("app", "consumer_generation_id"),
    ("faust.types.tuples.Message", "generation_id"),
    ("faust.transport.consumer", "terminal"),  # the module's `terminal.logtable` in _commit_offsets
    ("app.tables.recovery", "in_recovery"),  # RecoveryWatch
    ("app.tables.recovery", "active_remaining"),
    ("app._fetcher", "_futures"),  # the fetch loop's task, whose stack a stall logs
)


class FaustGuardError(RuntimeError):
    """The installed Faust is not the one the workarounds were written for; the message says why."""


def installed_version() -> str:
    return version("faust-streaming")


def check_version() -> None:
    """Refuse (FaustGuardError, one line) unless the installed faust-streaming is WRITTEN_FOR."""
    found = installed_version()
    if found != WRITTEN_FOR:
        raise FaustGuardError(
            f"faust-streaming {found} is installed, but the Faust workarounds in app/faust_guard.py "
            f"were written for {WRITTEN_FOR}: install {WRITTEN_FOR}, or revisit them for {found}"
        )


def check(app: faust.App) -> None:
    """check_version, then refuse unless Faust has every private the workarounds use."""
    from faust.transport import consumer as consumer_module
    from faust.transport.consumer import Consumer
    from faust.types.tuples import Message

    check_version()
    found = installed_version()
    owners: dict[str, Callable[[], Any]] = {
        "faust.transport.consumer.Consumer": lambda: Consumer,
        "app.consumer": lambda: app.consumer,
        "app.flow_control": lambda: app.flow_control,
        "asyncio.Queue()": asyncio.Queue,
        "app": lambda: app,
        "faust.types.tuples.Message": lambda: Message,
        "faust.transport.consumer": lambda: consumer_module,
        "app.tables.recovery": lambda: app.tables.recovery,
        "app._fetcher": lambda: app._fetcher,
    }
    missing = [f"{owner}.{attr}" for owner, attr in PRIVATES if not hasattr(owners[owner](), attr)]
    if missing:
        raise FaustGuardError(
            f"faust-streaming {found} lacks {', '.join(missing)}, which the Faust workarounds in "
            "app/faust_guard.py rely on: revisit them before starting a worker"
        )


def install(app: faust.App, streams: set[str]) -> InOrder:
    """Check the installed Faust, then put every workaround in place for these stream topics; the
    returned guard is the agent's (`InOrder.accept` for each record it takes)."""
    check(app)
    read_offsets = ReadOffsets.install(app.consumer)
    in_order = InOrder(app, streams, read_offsets)
    _in_order_from_the_commit(app, in_order)
    _commit_only_acked(streams)
    _track_commits()
    _reseek_after_flow_resume(app, streams)
    _lazy_commit_tables()
    _hand_over_without_tasks(app.consumer)
    stalled: dict[Any, int] = {}

    @app.timer(REREAD_INTERVAL)
    async def reread_dropped_heads() -> None:
        try:
            _reread_dropped_heads(app, streams, stalled)
            await in_order.seek_again()
        except Exception:  # a safety net must not become a failure of its own
            log.exception("re-reading dropped records")

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: Any, **_: Any) -> None:
        in_order.forget(revoked)  # Faust's rebalances revoke every partition before assigning

    watch = RecoveryWatch(app)

    @app.timer(1.0)
    async def watch_recovery() -> None:
        try:
            watch.check()
        except Exception:  # a safety net must not become a failure of its own
            log.exception("watching the table recovery")

    return in_order


def committed_offset(consumer: Any, tp: Any) -> int | None:
    """The offset Faust last committed (or read as committed) for `tp`; None before either."""
    committed: int | None = consumer._committed_offset.get(tp)
    return committed


# ---- the workarounds ----------------------------------------------------------------------------
def _commit_only_acked(streams: set[str]) -> None:
    """faust-streaming #606: Faust's commit stops at the first record of a stream topic not acked."""
    from faust.transport.consumer import Consumer

    original = Consumer._new_offset
    if getattr(original, "only_acked", False):
        return

    def _new_offset(self: Any, tp: Any) -> int | None:
        if tp.topic in streams:
            self._gap.pop(tp, None)
            committed = self._committed_offset.get(tp)
            acked = self._acked.get(tp)
            if acked and committed is not None and min(acked) > committed:
                return None  # the record at `committed` is not done yet: nothing to commit
        return original(self, tp)  # type: ignore[no-any-return]

    _new_offset.only_acked = True  # type: ignore[attr-defined]
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]


def _track_commits() -> None:
    """Record, while a commit runs, the offsets it will store: its records are acked already (Faust
    took them out of its acked list), so `_reread_dropped_heads` looks for a dropped head after
    them, never at them while the commit is merely slow."""
    from faust.transport.consumer import Consumer

    original = Consumer._commit_offsets
    if getattr(original, "tracked", False):
        return

    async def _commit_offsets(
        self: Any, offsets: Mapping[Any, int], start_new_transaction: bool = True
    ) -> bool:
        committing = _COMMITTING.setdefault(self, {})
        committing.update(offsets)
        try:
            return await original(self, offsets, start_new_transaction=start_new_transaction)  # type: ignore[no-any-return]
        finally:  # stored, failed or cancelled: Faust's own committed offset is what counts again
            for tp, offset in offsets.items():
                if committing.get(tp) == offset:
                    del committing[tp]

    _commit_offsets.tracked = True  # type: ignore[attr-defined]
    Consumer._commit_offsets = _commit_offsets  # type: ignore[method-assign]


def head_offset(consumer: Any, tp: Any) -> int | None:
    """The first record of `tp` not yet committed, counting a commit in progress as done; None
    before Faust knows a committed offset."""
    committed: int | None = consumer._committed_offset.get(tp)
    committing = _COMMITTING.get(consumer, {}).get(tp)
    if committed is None or committing is None:
        return committed
    return max(committed, committing)


class _Rendered:
    """A log argument rendered only when the log line is formatted (i.e. printed)."""

    __slots__ = ("_render",)

    def __init__(self, render: Callable[[], str]) -> None:
        self._render = render

    def __str__(self) -> str:
        return self._render()


class _LazyTerminal:
    """faust.utils.terminal with `logtable` deferred; everything else passes through."""

    def __init__(self, terminal: Any) -> None:
        self._terminal = terminal

    def logtable(self, *args: Any, **kw: Any) -> _Rendered:
        return _Rendered(lambda: str(self._terminal.logtable(*args, **kw)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._terminal, name)


def _lazy_commit_tables() -> None:
    """CPU only: the commit's offsets table is rendered when its `dev` log line is printed, not before."""
    from faust.transport import consumer as consumer_module

    if not isinstance(consumer_module.terminal, _LazyTerminal):
        consumer_module.terminal = _LazyTerminal(consumer_module.terminal)  # type: ignore[assignment]


def _in_order_from_the_commit(app: faust.App, in_order: InOrder) -> None:
    """After Faust seeks its partitions to their committed offsets (once per assignment, after the
    flow resumed), the agent's next record is the committed one: `in_order` expects it, and the
    re-read passes Faust's check on old records though records fetched before the seek are still
    on their way (`ReadOffsets`)."""
    consumer = app.consumer
    perform_seek = consumer.perform_seek

    async def perform_seek_in_order() -> None:
        await perform_seek()
        in_order.expect_committed()

    consumer.perform_seek = perform_seek_in_order  # type: ignore[method-assign]


def _hand_over_without_tasks(consumer: Any) -> None:
    """CPU: the fetch loop's `wait_first(callback(message), suspend_flow.wait())` without a task per
    record. The callback is awaited in the fetch loop's own task; `stop_flow` cancels that await if
    it is under way (what `suspend_flow` winning the race did), and the call returns as it did then.
    Anything else (another caller, the flow already stopped) goes to mode's `wait_first`."""
    from mode.services import WaitResults

    wait_first, stop_flow = consumer.wait_first, consumer.stop_flow
    suspend_flow = consumer.suspend_flow
    event_wait = asyncio.Event.wait.__code__
    under_way: dict[str, asyncio.Task[Any] | None] = {"step": None, "stopped": None}

    def stop_flow_interrupting() -> None:
        stop_flow()
        task = under_way["step"]
        if task is not None and not task.done():
            under_way["stopped"] = task
            task.cancel()

    async def wait_first_inline(*coros: Any, timeout: Any = None) -> Any:
        if (
            len(coros) != 2
            or timeout is not None
            or suspend_flow.is_set()
            or under_way["step"] is not None
            or getattr(coros[1], "cr_code", None) is not event_wait
            or coros[1].cr_frame.f_locals.get("self") is not suspend_flow
        ):
            return await wait_first(*coros, timeout=timeout)
        work, suspended = coros
        suspended.close()  # never awaited: stop_flow interrupts instead
        task = asyncio.current_task()
        under_way["step"] = task
        try:
            result = await work
        except asyncio.CancelledError:
            if under_way["stopped"] is not task:
                raise  # the fetcher itself is being stopped or cancelled
            under_way["stopped"] = None
            if task is not None:
                task.uncancel()
            return WaitResults([], [], False)  # the flow stopped first: the record is dropped
        finally:
            under_way["step"] = None
        if under_way["stopped"] is task and task is not None:  # the callback swallowed the cancel
            under_way["stopped"] = None
            task.uncancel()
        return WaitResults([work], [result], False)

    consumer.stop_flow = stop_flow_interrupting
    consumer.wait_first = wait_first_inline


def _reseek_after_flow_resume(app: faust.App, streams: set[str]) -> None:
    """faust-streaming #596: re-read the records a flow-control queue clear dropped (one dropped
    while handed over, before them, is caught by `InOrder`)."""
    flow = app.flow_control
    resume = flow.resume
    tasks: set[asyncio.Task[None]] = set()

    async def reseek(queued: dict[Any, int]) -> None:
        consumer = app.consumer
        for tp in list(consumer.assignment()):
            if tp.topic in streams and consumer._committed_offset.get(tp) is None:
                # Never committed (a new group): reading started at the earliest offset, so that
                # is the head the commit guard must see acked first.
                try:
                    earliest = await consumer.earliest_offsets(tp)
                    # Only if still unset: a commit made while we awaited is newer, and setting it
                    # back would stall commits on tp (lag stuck, and the head re-read later).
                    if consumer._committed_offset.get(tp) is None:  # (a defaultdict: no setdefault)
                        consumer._committed_offset[tp] = earliest[tp]
                except Exception as exc:
                    log.info("earliest offset of %s unknown: %r", tp, exc)
        for tp, offset in queued.items():
            try:
                if tp in consumer.assignment():
                    await seek_back(consumer, tp, offset)
                    consumer._gap.pop(tp, None)
            except Exception as exc:  # revoked meanwhile: its next owner starts at the commit
                log.info("re-seek of %s to %s skipped: %r", tp, offset, exc)
        if queued:
            log.info(
                "re-reading records a queue clear dropped: %s",
                {f"{tp.topic}:{tp.partition}": o for tp, o in queued.items()},
            )

    def resume_without_losing() -> None:
        queued: dict[Any, int] = {}
        generation = app.consumer_generation_id
        for queue in list(flow._queues):
            for item in list(queue._queue):  # type: ignore[attr-defined]
                msg = getattr(item, "message", None)
                if msg is None or msg.topic not in streams or msg.generation_id != generation:
                    continue
                queued[msg.tp] = min(queued.get(msg.tp, msg.offset), msg.offset)
        resume()
        task = asyncio.ensure_future(reseek(queued))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    flow.resume = resume_without_losing  # type: ignore[method-assign]


def _reread_dropped_heads(app: faust.App, streams: set[str], stalled: dict[Any, int]) -> None:
    """faust-streaming #596, timer body: seek back to a head record that was dropped in a hand-over
    (read past, neither acked nor in the worker while later records are acked, two ticks running).
    The head counts a commit in progress as done (`head_offset`): a slow commit is no drop."""
    consumer = app.consumer
    in_flight = {(m.tp, m.offset) for m in list(consumer._unacked_messages)}
    seen: set[Any] = set()
    for tp in list(consumer.assignment()):
        if tp.topic not in streams:
            continue
        head = head_offset(consumer, tp)  # past the records of a commit still on its way
        acked = consumer._acked.get(tp)
        if head is None or not acked or min(acked) <= head or (tp, head) in in_flight:
            continue
        read = consumer._read_offset.get(tp)
        if read is None or read <= head:
            continue  # not read past the head yet (a seek back is being read again): not dropped
        seen.add(tp)
        if stalled.get(tp) != head:
            stalled[tp] = head  # first sighting: it may still be on its way to the agent
            continue
        task = asyncio.ensure_future(seek_back(consumer, tp, head))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        log.info("re-reading %s:%s from %s: its head record was dropped", tp.topic, tp.partition, head)
        del stalled[tp]
    for tp in set(stalled) - seen:
        del stalled[tp]


class RecoveryWatch:
    """A table recovery that stops making progress never ends: Faust waits for the changelog
    records up to each partition's highwater, and the worker's stream partitions stay paused
    meanwhile (seen once in ~20 runs of tests/test_scale.py: the worker taking over every partition
    restored nothing for 30 s, with nothing logged). Progress is the changelog records still to
    read; after `RECOVERY_STALL_LOG` seconds without any, what the fetch loop and the flow are doing
    is logged once, and after `RECOVERY_STALL_FAIL` the worker fails (app/health.py): it exits, is
    restarted, and its partitions are recovered anew, instead of staying paused for good."""

    def __init__(self, app: Any, clock: Callable[[], float] | None = None) -> None:
        self.app = app
        self.clock = clock or time.monotonic
        self.progress: tuple[Any, ...] | None = None
        self.since = 0.0
        self.logged = False

    def check(self) -> None:
        recovery = self.app.tables.recovery
        now = self.clock()
        if not recovery.in_recovery:
            self.progress, self.logged = None, False
            return
        remaining = {tp: n for tp, n in recovery.active_remaining().items() if n > 0}
        progress = tuple(sorted((tp.topic, tp.partition, n) for tp, n in remaining.items()))
        if progress != self.progress:
            self.progress, self.since, self.logged = progress, now, False
            return
        stalled = now - self.since
        if stalled >= RECOVERY_STALL_LOG and not self.logged:
            self.logged = True
            log.warning("table recovery: no progress for %.0f s; %s", stalled, self.describe(remaining))
        if stalled >= RECOVERY_STALL_FAIL:
            from app.health import HEALTH

            HEALTH.fail("Faust table recovery", f"no changelog record read for {stalled:.0f} s, {len(remaining)} partitions behind")

    def describe(self, remaining: Mapping[Any, int]) -> str:
        app, consumer = self.app, self.app.consumer
        behind = ", ".join(f"{tp.topic}:{tp.partition} {n}" for tp, n in sorted(remaining.items())[:12])
        stacks = []
        for fut in list(getattr(app._fetcher, "_futures", ())):
            frames = fut.get_stack(limit=12) if isinstance(fut, asyncio.Task) else []
            stacks.append(" <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames)) or "(no frames)")
        return (
            f"records behind: {behind or 'none'}; flow stopped: {consumer.suspend_flow.is_set()}; "
            f"flow control active: {app.flow_control.is_active()}; fetch loop: {' | '.join(stacks) or 'not running'}"
        )


class ReadOffsets(dict):  # type: ignore[type-arg]
    """Faust's per-partition read offsets (`Consumer._read_offset`), with rewinds.

    Faust's fetch loop passes a record only if its offset is at least the partition's read offset,
    and sets that to each record it passes. A seek sets it to the seek's offset, but records fetched
    before the seek are still being passed and set it past that again, so the records read again
    after the seek were dropped as old (seen in tests/test_scale.py: a seek back to 36 while 37..51
    were still on their way, 36..50 never came). A rewound partition's read offset is at most the
    seek's offset until the agent has taken the record there (`reached`), so the re-read passes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rewound: dict[Any, int] = {}

    @classmethod
    def install(cls, consumer: Any) -> ReadOffsets:
        current = consumer._read_offset
        if isinstance(current, cls):
            return current
        # Faust's is a defaultdict(lambda: None); its fetch loop binds __getitem__ when it starts,
        # after this (the worker has not started).
        consumer._read_offset = made = cls(current)
        return made

    def __missing__(self, tp: Any) -> None:
        return None

    def __getitem__(self, tp: Any) -> int | None:
        value: int | None = super().__getitem__(tp)
        if self.rewound:
            floor = self.rewound.get(tp)
            if floor is not None and (value is None or value > floor):
                return floor
        return value

    def get(self, tp: Any, default: Any = None) -> Any:
        return self[tp] if tp in self else default

    def rewind(self, tp: Any, offset: int) -> None:
        self.rewound[tp] = offset

    def reached(self, tp: Any, offset: int) -> None:
        floor = self.rewound.get(tp)
        if floor is not None and offset <= floor:
            del self.rewound[tp]


async def seek_back(consumer: Any, tp: Any, offset: int) -> None:
    """Seek a stream partition back to `offset` so that what follows is read again, past Faust's
    check on old records (`ReadOffsets`). A partition revoked meanwhile is left to its next owner."""
    read_offsets = consumer._read_offset
    if isinstance(read_offsets, ReadOffsets):
        read_offsets.rewind(tp, offset)
    try:
        await consumer.seek(tp, offset)
    except Exception as exc:
        log.info("seek of %s to %s failed: %r", tp, offset, exc)


class InOrder:
    """faust-streaming #596, at the fan-out agent: a stream partition's records are handled in
    offset order, none after a record the agent never had.

    `expected[tp]` is the offset of the next record the agent needs: one past the last it handled,
    or the committed offset once Faust has sought there after an assignment (`expect_committed`;
    before that, the first record sets it). A record past it means
    Faust dropped the ones between (a rebalance's hand-over or queue clear): it is not handled, the
    partition is sought back to `expected`, and the records read past it come again in order. A
    record at or below it is handled (the next one, or one read again after a seek back).
    Records already buffered when the seek was made keep arriving past `expected` and are left
    too; when reading starts over (an offset at or below one seen since the seek) and still lies
    past `expected`, the offsets between do not exist (deleted by retention): logged, passed.
    """

    RESEEK_AFTER = 5.0  # seconds: a seek back whose records have not come by then is made again

    def __init__(self, app: faust.App, streams: set[str], read_offsets: ReadOffsets) -> None:
        self.app = app
        self.streams = streams
        self.read_offsets = read_offsets
        self.expected: dict[Any, int] = {}
        # tp -> (offset sought back to, highest offset seen since the seek, when it was made)
        self._sought: dict[Any, tuple[int, int, float]] = {}

    def expect_committed(self) -> None:
        """Faust has just sought every assigned partition to its committed offset."""
        consumer = self.app.consumer
        for tp in list(consumer.assignment()):
            if tp.topic not in self.streams:
                continue
            committed = consumer._committed_offset.get(tp)
            if committed is None:  # never committed (Faust's None for 0): the first record sets it
                continue
            self.expected[tp] = committed
            self._sought.pop(tp, None)
            self.read_offsets.rewind(tp, committed)

    async def seek_again(self) -> None:
        """Timer: a partition sought back whose records have not come (none came after it to ask
        again) is sought back once more."""
        now = asyncio.get_running_loop().time()
        for tp, (offset, _, at) in list(self._sought.items()):
            if now - at >= self.RESEEK_AFTER and self.expected.get(tp) == offset:
                log.info("fan-out: %s:%s read again from %d (not come yet)", tp.topic, tp.partition, offset)
                await self._seek_back(tp, offset, offset, now)

    def forget(self, tps: Any) -> None:
        for tp in tps:
            self.expected.pop(tp, None)
            self._sought.pop(tp, None)
            self.read_offsets.rewound.pop(tp, None)

    def accept(self, message: Any) -> bool:
        """True: handle this record. False: ask `after_gap` (a record before it never came)."""
        tp, offset = message.tp, message.offset
        expected = self.expected.get(tp)
        if expected is None or offset <= expected:
            self.expected[tp] = offset + 1
            if self._sought:
                self._sought.pop(tp, None)
            if self.read_offsets.rewound:
                self.read_offsets.reached(tp, offset)
            return True
        return False

    async def after_gap(self, message: Any) -> bool:
        """A record `accept` refused: True if it is handled after all (the records before it do not
        exist); False: leave it, it is read again in order (the partition is sought back)."""
        tp, offset = message.tp, message.offset
        expected = self.expected.get(tp)
        if expected is None:  # forgotten meanwhile (revoked): nothing to keep it from
            return self.accept(message)
        loop = asyncio.get_running_loop()
        sought = self._sought.get(tp)
        if sought is not None and sought[0] == expected:
            _, highest, at = sought
            if offset <= highest:
                # Reading started over after the seek and still starts past `expected`.
                log.warning(
                    "fan-out: %s:%s offsets %d..%d cannot be read (deleted?); going on from %d",
                    tp.topic, tp.partition, expected, offset - 1, offset,
                )
                self.expected[tp] = offset + 1
                del self._sought[tp]
                return True
            if loop.time() - at < self.RESEEK_AFTER:
                self._sought[tp] = (expected, offset, at)  # buffered before the seek: left too
                return False
        log.info(
            "fan-out: %s:%s record %d came before %d..%d (dropped by Faust in a rebalance): "
            "reading again from %d",
            tp.topic, tp.partition, offset, expected, offset - 1, expected,
        )
        await self._seek_back(tp, expected, offset, loop.time())
        return False

    async def _seek_back(self, tp: Any, offset: int, highest: int, now: float) -> None:
        self._sought[tp] = (offset, highest, now)
        await seek_back(self.app.consumer, tp, offset)
