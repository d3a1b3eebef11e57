"""`perfex-webhooks worker`: the Faust app that runs fan-out, delivery, retry tiers, admin web, /metrics.

Faust runs the fan-out agent on `crm.events` and the changelogged smart table it shares partitions
with. The agent runs at concurrency=1 (Faust #606) and gets its parallelism from concurrent work
inside it, acking each record only when that work is safe. The delivery agent on
`webhooks.deliveries` (the async hot path) is a librdkafka consumer of its own (app/delivery_agent.py);
the retry tiers use their own aiokafka consumer (pause/seek/resume); the endpoint registry is a topic
view every worker follows; the admin web is a plain aiohttp app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import faust
from mode import Service

from app import metrics, observe, route
from app.config import Settings
from app.delivery import HttpSender
from app.delivery_agent import DeliveryAgent
from app.dispatch import Dispatcher
from app.endpoints import Registry
from app.fanout import FanOut
from app.health import EXIT_FAILED, HEALTH, STOP_AFTER, exit_on_failure
from app.logfilter import quiet_repeats
from app.outbox import Outbox
from app.retry import RetryTiers
from app.stop_budget import start_watchdog
from app.topics import largest_record_bytes, spec

log = logging.getLogger("perfex_webhooks")


class Components:
    """Everything a worker owns besides Faust's own agents and table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.outbox = Outbox(settings)
        self.sender = HttpSender(settings)
        self.registry = Registry(settings, on_change=self._count_endpoints)
        self.dispatcher = Dispatcher(settings, self.registry, self.sender, self.outbox)
        self.registry.on_delete.append(self.dispatcher.forget_endpoint)
        self.tiers = RetryTiers(settings, self.dispatcher)
        self.web: Any = None
        self.faust_app: Any = None
        self._watch: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.inflight: set[asyncio.Future[Any]] = set()  # work the agents started, drained on stop
        self.agent = DeliveryAgent(settings, self.dispatcher, tasks=self.inflight)

    def _count_endpoints(self) -> None:
        eps = self.registry.all()
        metrics.ENDPOINTS.labels(state="enabled").set(sum(e.enabled for e in eps))
        metrics.ENDPOINTS.labels(state="disabled").set(sum(not e.enabled for e in eps))

    async def start(self) -> None:
        await self.outbox.start()
        await self.sender.start()
        await self.registry.start()
        await asyncio.wait_for(self.registry.ready.wait(), 60)
        await self.tiers.start()
        await self.agent.start()
        from app.web import WebServer

        self.web = WebServer(self.settings, self)
        await self.web.start()
        self._watch = asyncio.create_task(self._watch_faust(), name="watch-faust")
        self.ready.set()
        log.info("worker components ready (%d endpoints)", len(self.registry.all()))

    async def _watch_faust(self) -> None:
        """Faust's own services (the fetcher above all) record a crash and go quiet; the process
        stays up and delivers nothing. Turn such a crash into a worker failure (app/health.py)."""
        while True:  # mode offers no event for a crash: look every second
            if self._faust_crashed():
                return
            await asyncio.sleep(1.0)

    def _faust_crashed(self) -> bool:
        app = self.faust_app
        if app is None:
            return False
        for name, svc in (("Faust fetcher", app._fetcher), ("Faust consumer", app.consumer)):
            reason = getattr(svc, "crash_reason", None)
            # A rebalance "crashes" the fetcher with CancelledError and restarts it: not a failure.
            if svc._crashed.is_set() and reason is not None and not isinstance(reason, asyncio.CancelledError):
                HEALTH.fail(name, reason)
                return True
        return False

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        # A Faust crash may stop the worker before the watcher's next look: record it now, so /ready
        # and the exit status say why. A stopping worker is not ready either way.
        self._faust_crashed()
        self.ready.clear()
        if not HEALTH.ok:
            await asyncio.sleep(STOP_AFTER)  # let probes see the 503 before the port closes
        # Faust stops this service before its agents: let the work they started finish while the
        # producer and HTTP session still exist, so a graceful stop acks it instead of leaving it to
        # the next owner as duplicates. Bounded: an attempt never outlives the delivery timeout.
        try:
            await self.agent.stop()  # stops taking records, finishes and commits its own
        except Exception:
            log.exception("stopping the delivery agent")
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=self.settings.delivery_timeout + 2)
        for part in (self.web, self.tiers, self.registry, self.sender, self.outbox):
            if part is None:
                continue
            try:
                await part.stop()
            except Exception:
                log.exception("stopping %s", type(part).__name__)


def create_app(settings: Settings) -> tuple[faust.App, Components]:
    events_spec = spec(route.EVENTS)
    app = faust.App(
        settings.group_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",
        autodiscover=False,
        web_enabled=False,  # the admin web is our own aiohttp app (app/web.py)
        # `perfex-webhooks worker` resolves the default (min(3, brokers)) before this.
        topic_replication_factor=settings.replication_factor or 1,
        topic_partitions=events_spec.partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        producer_acks=-1,
        # The smart table's changelog holds an event's last state: as large as the event.
        producer_max_request_size=largest_record_bytes(settings),
        stream_buffer_maxsize=4096,
        datadir=os.path.join(settings.data_dir, settings.group_id),
        table_standby_replicas=0,
        # Rebalances wait for in-flight records; those finish within the delivery timeout.
        broker_rebalance_timeout=max(60.0, settings.delivery_timeout * 4),
        # A SIGKILLed worker's partitions move after this long (Faust's default is 60 s).
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
    )
    comps = Components(settings)
    os.makedirs(app.conf.datadir, exist_ok=True)
    streams = {settings.topic(route.EVENTS)}
    _reseek_after_flow_resume(app, streams)
    stalled_heads: dict[Any, int] = {}

    @app.timer(2.0)
    async def reread_dropped_heads() -> None:
        try:
            _reread_dropped_heads(app, streams, stalled_heads)
        except Exception:  # a safety net must not become a failure of its own
            log.exception("re-reading dropped records")

    events_topic = app.topic(
        settings.topic(route.EVENTS),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=events_spec.partitions,
    )
    pending = app.Table(
        "smart-pending",
        default=None,
        partitions=events_spec.partitions,
        schema=faust.Schema(key_serializer="json", value_serializer="json"),
    )
    fanout = FanOut(settings, comps.registry, comps.dispatcher, comps.outbox, pending, tasks=comps.inflight)

    @app.agent(events_topic, concurrency=1)
    async def fan_out(stream: faust.StreamT) -> None:
        await comps.ready.wait()
        async for event in stream.noack().events():
            msg = event.message
            await fanout.handle(msg.key, msg.value, msg.headers, msg.partition, event.ack)

    smart_tick = max(0.02, min(0.25, settings.smart_window / 10))

    @app.timer(smart_tick)
    async def smart_markers() -> None:
        if not comps.ready.is_set():
            return
        try:
            active = {
                tp.partition
                for tp in app.assignor.assigned_actives()
                if tp.topic == events_topic.get_topic_name()
            }
            await fanout.send_due_markers(active)
        except Exception:
            log.exception("smart timer")

    class ComponentsService(Service):
        async def on_start(self) -> None:
            await comps.start()

        async def on_stop(self) -> None:
            await comps.stop()

    app.service(ComponentsService)
    observe.install(app, comps)  # DLQ view (comps.dlq_view), webhooks_dlq_size, Faust consumer lag
    comps.faust_app = app
    return app, comps


def _reseek_after_flow_resume(app: faust.App, streams: set[str]) -> None:
    """Work around Faust races that lose input records on rebalances (faust-streaming #596).

    1. While a rebalance suspends the flow, Faust drops records it fetches (those in the agents'
       queues when flow control clears them, and one being handed over when the flow stops),
       although their read offsets are recorded; the next record is then taken for a gap whose
       offsets count as acked. 2. Faust's commit (`Consumer._new_offset`) tolerates exactly one
       missing record at the head: with the committed offset at N and N+1, N+2... acked, it commits
       past N though N was never acked (dropped, or still in flight in our concurrent agent: a
       rebalance commits while it waits for in-flight records). tests/test_scale.py lost 1 to 14
       events per scale-out to these. So: commits never move past a record that was not acked
       (`_commit_only_acked`; for a partition never committed, the head is its earliest offset;
       Faust's gaps are discarded, our input topics being neither compacted nor transactional);
       when flow control has cleared the queues, each stream partition is sought back to its first
       record that was still queued; and a head record that is nowhere in the worker while later
       ones are acked is read again (`_reread_dropped_heads`, every 2 s). Records read again are
       processed twice (at-least-once, same delivery ids).
    """
    _commit_only_acked(streams)
    flow = app.flow_control
    resume = flow.resume
    tasks: set[asyncio.Task[None]] = set()

    async def seek_back(queued: dict[Any, int]) -> None:
        consumer = app.consumer
        for tp in list(consumer.assignment()):
            if tp.topic in streams and consumer._committed_offset.get(tp) is None:
                # Never committed (a new group): reading started at the earliest offset, so that
                # is the head the commit guard below must see acked first.
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
                    await consumer.seek(tp, offset)
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
        task = asyncio.ensure_future(seek_back(queued))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    flow.resume = resume_without_losing  # type: ignore[method-assign]


def _commit_only_acked(streams: set[str]) -> None:
    """Make Faust's commit stop at the first record not acked (see _reseek_after_flow_resume).

    For our stream topics Faust's "gaps" (offset ranges it counts as acked because it never saw
    them) are never real: they are neither compacted nor transactional, so a gap only comes from a
    record Faust dropped. They are discarded instead of committed past.
    """
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


def _reread_dropped_heads(app: faust.App, streams: set[str], stalled: dict[Any, int]) -> None:
    """Timer body: a stream partition whose head record (the committed offset) is neither acked nor
    anywhere in the worker while later records are acked was dropped by Faust; after two ticks in
    that state, seek back to it so it is read again (the records after it are read twice)."""
    consumer = app.consumer
    in_flight = {(m.tp, m.offset) for m in list(consumer._unacked_messages)}
    seen: set[Any] = set()
    for tp in list(consumer.assignment()):
        if tp.topic not in streams:
            continue
        committed = consumer._committed_offset.get(tp)
        acked = consumer._acked.get(tp)
        if committed is None or not acked or min(acked) <= committed or (tp, committed) in in_flight:
            continue
        seen.add(tp)
        if stalled.get(tp) != committed:
            stalled[tp] = committed  # first sighting: it may still be on its way to the agent
            continue
        task = asyncio.ensure_future(consumer.seek(tp, committed))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        log.info("re-reading %s:%s from %s: its head record was dropped", tp.topic, tp.partition, committed)
        del stalled[tp]
    for tp in set(stalled) - seen:
        del stalled[tp]


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    from faust.worker import Worker

    try:  # uvloop: 15-20 % less CPU per delivery than asyncio's loop (docs/performance.md)
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # not built for this platform: asyncio's loop works, only slower
        pass
    quiet_repeats(  # a broker outage must not flood the log (app/logfilter.py)
        "aiokafka",
        "aiokafka.conn",
        "aiokafka.cluster",
        "aiokafka.consumer.fetcher",
        "aiokafka.consumer.group_coordinator",
        "perfex_webhooks.librdkafka",
        "app.observe",
    )
    app, comps = create_app(settings)

    class BoundedStopWorker(Worker):
        def _schedule_shutdown(self, sig: Any) -> None:
            if not self._signal_stop_time:  # the first SIGTERM/SIGINT: the stop gets a budget
                start_watchdog(comps)
            super()._schedule_shutdown(sig)

    # A component that stopped for good stops the worker the way SIGTERM does, and the exit status
    # says so (app/health.py): an orchestrator restarts it instead of keeping a process that
    # delivers nothing.
    worker = BoundedStopWorker(app, loglevel=loglevel, quiet=True)

    def stop() -> None:
        if not (worker.should_stop or worker._crashed.is_set()):  # a Faust crash stops it already
            os.kill(os.getpid(), signal.SIGTERM)

    exit_on_failure(HEALTH, stop)
    # Faust keeps a terminal spinner at --loglevel warning and above, and for it sets the root logger
    # to DEBUG: every library debug() call (aiokafka logs each send) then builds a LogRecord that no
    # handler prints. Without the spinner the root logger stays at `loglevel` (docs/performance.md).
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit:
        if not HEALTH.ok:
            log.critical("worker stopped after a failure: %s", HEALTH.failure)
            raise SystemExit(EXIT_FAILED) from None
        raise
