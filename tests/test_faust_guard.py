"""The Faust guard: the workarounds in app/faust_guard.py are tied to one faust-streaming release.

A version bump has to revisit them (the pin test fails first), and a worker on a Faust they do not
fit refuses to start with one line instead of failing inside a rebalance later.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import faust
import pytest
from faust.transport.consumer import Consumer

from app import faust_guard
from app.faust_guard import WRITTEN_FOR, FaustGuardError

ROOT = Path(__file__).resolve().parent.parent


def _app() -> faust.App:
    # No broker is contacted: the consumer object exists before the worker starts it.
    return faust.App("guard-test", broker="kafka://127.0.0.1:1", store="memory://", autodiscover=False)


def test_the_pin_is_the_release_the_workarounds_were_written_for() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    faust_pins = [d for d in deps if d.replace(" ", "").startswith("faust-streaming")]
    # Changing this pin means revisiting every workaround in app/faust_guard.py, then WRITTEN_FOR.
    assert faust_pins == [f"faust-streaming=={WRITTEN_FOR}"]
    assert faust_guard.installed_version() == WRITTEN_FOR


def test_the_installed_faust_passes_the_check() -> None:
    faust_guard.check(_app())  # every private in PRIVATES exists


def test_a_missing_private_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Consumer, "_new_offset")  # as if upstream renamed it
    with pytest.raises(FaustGuardError) as info:
        faust_guard.check(_app())
    message = str(info.value)
    assert "faust.transport.consumer.Consumer._new_offset" in message and "\n" not in message


def test_a_worker_on_another_faust_refuses_to_start_with_one_line() -> None:
    code = (
        "import app.faust_guard as g; g.installed_version = lambda: '0.16.0'; "
        "from app.cli import main; main(['worker', '--no-apply-topics'])"
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "WEBHOOKS_ADMIN_INSECURE": "true",
        "WEBHOOKS_TOPIC_PREFIX": "guard-test.",
    }
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert res.returncode == 1, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert "faust-streaming 0.16.0 is installed" in lines[0] and WRITTEN_FOR in lines[0]


def test_a_slow_commit_is_no_dropped_head_but_a_dropped_record_is_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 11: while a commit hangs (a dead group coordinator), Faust has taken the commit's records
    out of its acked list and not yet recorded the new offset; the re-read must not take that for
    a dropped head record. A record really dropped after them is still read again."""
    import asyncio

    from faust.types import TP

    app = _app()
    faust_guard.install(app, {"crm.events"})
    consumer = app.consumer
    tp = TP("crm.events", 2)
    seeks: list[tuple[TP, int]] = []

    async def seek(partition: TP, offset: int) -> None:
        seeks.append((partition, offset))

    hung = asyncio.Event()

    async def flush() -> None:  # Faust flushes its producer first: hang there, as on a dead coordinator
        await hung.wait()

    monkeypatch.setattr(consumer, "assignment", lambda: {tp})
    monkeypatch.setattr(consumer, "seek", seek)
    monkeypatch.setattr(consumer, "_commit", lambda offsets: asyncio.sleep(0, True))
    monkeypatch.setattr(app.producer, "flush", flush)

    async def scenario() -> None:
        consumer._committed_offset[tp] = 10
        consumer._read_offset[tp] = 20
        consumer._acked[tp] = [15, 16]  # 10-14 went to the commit below; 15 and 16 acked since
        commit = asyncio.ensure_future(consumer._commit_offsets({tp: 15}))
        await asyncio.sleep(0)
        stalled: dict = {}
        for _ in range(3):  # three ticks while the commit hangs: nothing was dropped
            faust_guard._reread_dropped_heads(app, {"crm.events"}, stalled)
            await asyncio.sleep(0)  # a seek would run now
        assert seeks == []
        consumer._acked[tp] = [16, 17]  # now 15 is neither acked nor anywhere: dropped
        for _ in range(2):
            faust_guard._reread_dropped_heads(app, {"crm.events"}, stalled)
            await asyncio.sleep(0)
        assert seeks == [(tp, 15)]
        hung.set()
        await commit
        assert consumer._committed_offset[tp] == 15 and faust_guard.head_offset(consumer, tp) == 15

    asyncio.run(scenario())


def test_the_agent_takes_a_partition_in_offset_order_when_faust_drops_a_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 18: Faust dropped a record in a rebalance's hand-over and the re-read brought it after
    the records behind it, so one resource's events were fanned out as 2, 3, 4, 1. The agent's guard
    leaves a record whose predecessor never came, seeks back once, and takes them again in order;
    a gap no re-read fills (deleted offsets) is passed once reading has started over."""
    import asyncio
    from types import SimpleNamespace

    from faust.types import TP

    app = _app()
    in_order = faust_guard.install(app, {"crm.events"})
    consumer = app.consumer
    tp = TP("crm.events", 3)
    seeks: list[int] = []

    async def seek(partition: TP, offset: int) -> None:
        assert partition == tp
        seeks.append(offset)

    monkeypatch.setattr(consumer, "seek", seek)
    handled: list[int] = []

    async def agent(*offsets: int) -> None:  # the fan-out agent's loop (app/worker.py)
        for offset in offsets:
            msg = SimpleNamespace(tp=tp, offset=offset)
            if in_order.accept(msg) or await in_order.after_gap(msg):
                handled.append(offset)

    async def scenario() -> None:
        await agent(10, 11, 13, 14)  # 12 dropped while handed over; 14 was buffered already
        assert handled == [10, 11] and seeks == [12]
        await agent(12, 13, 14, 15)  # read again from 12 after the seek back
        assert handled == [10, 11, 12, 13, 14, 15] and seeks == [12]
        await agent(14, 15, 16)  # read again by another repair (a seek further back): handled again
        assert handled[-3:] == [14, 15, 16]

        await agent(20, 21)  # 17..19 do not exist (deleted): sought back once ...
        assert seeks == [12, 17] and handled[-1] == 16
        await agent(20, 21)  # ... reading started over at 20: the gap is passed
        assert handled[-2:] == [20, 21] and seeks == [12, 17]

        # Revoked and assigned again: reading starts at the committed offset, and the first record
        # after the assignment sets what comes next (another worker handled 22..29 meanwhile).
        in_order.forget({tp})
        await agent(30, 31, 33)
        assert handled[-2:] == [30, 31] and seeks == [12, 17, 32]

    asyncio.run(scenario())


def test_records_read_again_after_a_seek_back_pass_fausts_check_on_old_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust's fetch loop drops a record below the partition's read offset and sets that offset to
    each record it passes. Records fetched before a seek back are still being passed after it and
    set it past the seek's offset; without the rewind, the records read again were dropped as old
    (tests/test_scale.py saw 36..50 never come after a seek back to 36)."""
    import asyncio

    from faust.types import TP

    app = _app()
    faust_guard.install(app, {"crm.events"})
    consumer = app.consumer
    tp = TP("crm.events", 5)
    monkeypatch.setattr(consumer, "seek", lambda partition, offset: asyncio.sleep(0))
    get_read_offset = consumer._read_offset.__getitem__  # bound once, as Faust's loop does
    set_read_offset = consumer._read_offset.__setitem__
    passed: list[int] = []

    def fetch_loop(*offsets: int) -> None:  # the check in Consumer._drain_messages
        for offset in offsets:
            r_offset = get_read_offset(tp)
            if r_offset is None or offset >= r_offset:
                passed.append(offset)
                set_read_offset(tp, offset)

    fetch_loop(30, 31, 32, 33, 34, 35)
    asyncio.run(faust_guard.seek_back(consumer, tp, 32))  # 32..35 were dropped after they passed
    fetch_loop(36, 37)  # fetched before the seek
    fetch_loop(32, 33, 34, 35, 36, 37, 38)  # read again
    assert passed == [30, 31, 32, 33, 34, 35, 36, 37, 32, 33, 34, 35, 36, 37, 38]
    # Once the agent has the record sought back to, old records are dropped as before.
    consumer._read_offset.reached(tp, 32)
    fetch_loop(33)
    assert passed[-1] == 38
    assert consumer._read_offset.get(tp) == 38 and consumer._read_offset.get(TP("crm.events", 9)) is None


def test_the_fetch_loops_hand_over_is_interrupted_by_stop_flow_as_before() -> None:
    """`_hand_over_without_tasks`: Faust's fetch loop calls `wait_first(callback(message),
    suspend_flow.wait())` per record. The callback's result comes back as before without mode's four
    tasks; a hand-over still waiting when a rebalance calls `stop_flow` is cancelled and the call
    returns (the record is dropped, as when the flow event won the race); any other call, or one
    made while the flow is stopped, goes to mode's `wait_first` (not run here: it needs the service's
    own loop)."""
    import asyncio

    app = _app()
    faust_guard.install(app, {"crm.events"})
    consumer = app.consumer

    async def scenario() -> None:
        async def handed_over() -> str:
            return "queued"

        done = await consumer.wait_first(handed_over(), consumer.suspend_flow.wait())
        assert (done.done, done.results, done.stopped) == ([done.done[0]], ["queued"], False)

        full = asyncio.Event()
        cancelled: list[bool] = []

        async def blocked_on_a_full_queue() -> None:
            try:
                await full.wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        step = asyncio.ensure_future(consumer.wait_first(blocked_on_a_full_queue(), consumer.suspend_flow.wait()))
        await asyncio.sleep(0.01)
        assert not step.done()
        consumer.stop_flow()  # a rebalance starts
        result = await asyncio.wait_for(step, 2)
        assert cancelled == [True] and result.results == [] and not result.stopped
        assert consumer.suspend_flow.is_set()
        assert not step.cancelled()  # the fetch loop's task goes on: only the hand-over was cancelled
        # The flow resumes: hand-overs go on as before.
        consumer.resume_flow()
        done = await consumer.wait_first(handed_over(), consumer.suspend_flow.wait())
        assert done.results == ["queued"]

    asyncio.run(scenario())


def test_a_table_recovery_without_progress_is_logged_then_fails_the_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A recovery that reads no changelog record leaves the stream partitions paused for good: the
    watch logs what the fetch loop does, then fails the worker so that it is restarted."""
    from faust.types import TP

    app = _app()
    failures: list[tuple[str, str]] = []
    monkeypatch.setattr("app.health.HEALTH", type("Probe", (), {"fail": lambda _s, c, r: failures.append((c, r))})())
    now = [1000.0]
    watch = faust_guard.RecoveryWatch(app, clock=lambda: now[0])
    recovery = app.tables.recovery
    tp = TP("t.perfex-webhooks-smart-pending-changelog", 2)
    recovery.active_highwaters[tp] = 37
    recovery.active_offsets[tp] = 20

    watch.check()  # not recovering: nothing to watch
    recovery.in_recovery = True
    watch.check()
    now[0] += faust_guard.RECOVERY_STALL_LOG - 1
    recovery.active_offsets[tp] = 30  # progress: the stall clock starts again
    watch.check()
    now[0] += faust_guard.RECOVERY_STALL_LOG - 1
    watch.check()
    assert "no progress" not in caplog.text and failures == []

    now[0] += 2  # past the log threshold without progress
    with caplog.at_level("WARNING", logger="perfex_webhooks"):
        watch.check()
        watch.check()
    warnings = [r.getMessage() for r in caplog.records if "no progress" in r.getMessage()]
    assert len(warnings) == 1  # once per stall
    assert f"{tp.topic}:2 7" in warnings[0] and "fetch loop: not running" in warnings[0]
    assert failures == []

    now[0] = watch.since + faust_guard.RECOVERY_STALL_FAIL
    watch.check()
    assert failures and failures[0][0] == "Faust table recovery" and "1 partitions behind" in failures[0][1]

    recovery.in_recovery = False  # recovered (or restarted): the watch forgets the stall
    watch.check()
    assert watch.progress is None
