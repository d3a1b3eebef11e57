"""`perfex-webhooks worker`: the Faust app that runs fan-out, delivery, retry tiers, admin web, /metrics.

Faust runs the fan-out agent on `crm.events` and the changelogged smart table it shares partitions
with. The agent runs at concurrency=1 (Faust #606) and gets its parallelism from concurrent work
inside it, acking each record only when that work is safe; app/faust_guard.py holds the
workarounds of Faust's own bugs and refuses to start on a Faust they were not written for. The
delivery agent on `webhooks.deliveries` (the async hot path, librdkafka) and the retry tiers
(aiokafka, pause/seek/resume) are consumers of their own (app/consumers/); the endpoint registry
is a topic view every worker follows; the admin web is a plain aiohttp app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import faust
from mode import Service

from app import faust_guard, metrics, observe, route
from app.config import Settings
from app.consumers.deliveries import DeliveryAgent
from app.consumers.tiers import RetryTiers
from app.delivery import HttpSender
from app.dispatch import Dispatcher
from app.endpoints import Registry
from app.fanout import FanOut
from app.health import EXIT_FAILED, HEALTH, STOP_AFTER, exit_on_failure
from app.logfilter import quiet_repeats
from app.outbox import Outbox
from app.stop_budget import start_watchdog
from app.topics import largest_record_bytes, spec

log = logging.getLogger("perfex_webhooks")


class Components:
    """Everything a worker owns besides Faust's own agents and table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.outbox = Outbox(settings)
        self.prompt_outbox = Outbox(settings, prompt=True)  # what an HTTP caller waits on
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
        await self.prompt_outbox.start()
        await self.sender.start()
        await self.registry.start()
        await asyncio.wait_for(self.registry.ready.wait(), 60)
        # Before any consumer reads: what this group delivered lately is skipped if read again.
        n = await self.dispatcher.successes.catch_up_async()
        log.info("%d recent successes in the attempt log", n)
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
        for part in (self.web, self.tiers, self.registry, self.sender, self.outbox, self.prompt_outbox):
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
        # Commits follow acks closely: a crash re-reads (and the delivery agent then skips, see
        # app/successes.py) only what was acked in the last 0.2 s.
        broker_commit_interval=0.2,
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
    # Faust loses records around rebalances: the workarounds, checked against the installed Faust.
    in_order = faust_guard.install(app, {settings.topic(route.EVENTS)})

    events_topic = app.topic(
        settings.topic(route.EVENTS),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=events_spec.partitions,
    )
    pending = app.Table(
        route.SMART_TABLE,
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
            if not in_order.accept(msg) and not await in_order.after_gap(msg):
                continue  # a record before it was dropped by Faust: both come again, in order
            await fanout.handle(msg.key, msg.value, msg.headers, msg.partition, event.ack, msg.offset)

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

    @app.on_partitions_assigned.connect
    async def learn_successes(sender: Any, assigned: Any, **_: Any) -> None:
        # The fan-out's new partitions may come from a worker that died: learn what it delivered
        # before their uncommitted records are read again (Faust resumes them after this signal),
        # so the Dispatcher skips those immediate deliveries instead of sending them twice.
        if assigned:
            n = await comps.dispatcher.successes.catch_up_async()
            log.info("fan-out: %d successes learnt from the attempt log", n)
    observe.install(app, comps)  # DLQ view (comps.dlq_view), webhooks_dlq_size, Faust consumer lag
    comps.faust_app = app
    return app, comps


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
