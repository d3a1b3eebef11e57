"""Ordered delivery per resource: an endpoint with `ordering: resource` gets one resource's
deliveries in event order, and a failing one holds back that resource's later deliveries to that
endpoint only (docs/architecture.md, "Ordered delivery").

A sequence is one (endpoint, resource) pair. Its deliveries share the resource's Kafka key, so
they are read in order from one `webhooks.deliveries` partition by the one delivery agent that
owns it, and that agent is the sequence's only writer:

- **Lanes** (memory): the agent chains a sequence's records, each waits for the one before it to
  be finished (delivered, parked, or blocked). The agent's record cap bounds them.
- **Blocked** (`webhooks.ordering`, compacted, same partition number): a delivery that is not done
  after its attempt (it went to a retry tier) is the sequence's *head*; the sequence is blocked
  until the tiers finish the head (delivered or parked in the DLQ). The owner keeps its
  partitions' blocked sequences in a dict and loads them from this topic when it is assigned one.
- **Held** (`webhooks.ordering.held`, same partition number): a delivery of a blocked sequence is
  appended here instead of attempted, so nothing held waits in memory; the block records the
  offset of the first one.
- **Release**: the tier that finishes a head (marked `ordered`) sends a release marker into the
  head's `webhooks.deliveries` partition. The owner handles it in order with the partition: it
  attempts the held deliveries one by one from the recorded offset; the first one that is not done
  becomes the new head; when none is left the block is deleted. A long backlog is released in
  slices (`RELEASE_BATCH`, `RELEASE_SECONDS`) with a marker for the next slice, so a revocation
  never waits long for a release.

Immediate endpoints with ordering deliver through `webhooks.deliveries` (app/fanout.py), so every
mode's ordered deliveries meet in the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from app import metrics, route
from app.config import Settings
from app.delivery import Delivery, InvalidDelivery
from app.dispatch import Dispatcher
from app.endpoints import Endpoint

log = logging.getLogger(__name__)

RESOURCE = "resource"
# A release attempts at most this many held deliveries, or starts none after this many seconds,
# then hands the rest to a marker of its own: the marker's offset (and so the partition's commits)
# is held only that long, and a revocation's drain (delivery timeout + 2 s) is not outlasted.
RELEASE_BATCH = 200
RELEASE_SECONDS = 2.0
# A release marker's value starts with this (orjson keeps key order): told from a delivery, which
# starts with {"id", by a prefix, without parsing every record on the hot path.
_MARKER_KEY = "ordering_release"
_MARKER_PREFIX = b'{"' + _MARKER_KEY.encode() + b'"'


def is_ordered(ep: Endpoint | None) -> bool:
    return ep is not None and ep.ordering == RESOURCE


def sequence(d: Delivery) -> str:
    """A sequence's key: its records in `webhooks.ordering` and `webhooks.ordering.held`."""
    return f"{d.endpoint_id}|{d.resource_key}"


def marker(seq: str, head: str) -> bytes:
    return orjson.dumps({_MARKER_KEY: {"seq": seq, "head": head}})


def read_marker(value: bytes | None) -> tuple[str, str] | None:
    """(sequence, head) of a release marker; None for anything else (a delivery)."""
    if not value or not value.startswith(_MARKER_PREFIX):
        return None
    try:
        doc = orjson.loads(value)[_MARKER_KEY]
        return str(doc["seq"]), str(doc["head"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


async def release_after_tier(dispatcher: Dispatcher, d: Delivery, next_: route.Next) -> None:
    """The retry tiers finished an ordered head (delivered or parked): tell the owner of its
    sequence, through the head's own `webhooks.deliveries` partition (same key)."""
    if d.ordered and isinstance(next_, (route.Done, route.Dead)):
        await dispatcher.outbox.publish(route.DELIVERIES, d.resource_key, marker(sequence(d), d.id))
        log.debug("ordering: head %s of %s finished (%s): release marker sent", d.id, sequence(d), next_)


@dataclass(slots=True)
class Block:
    head: str  # the delivery id in the tiers (or a release token) this sequence waits for
    first: int | None = None  # offset in the held partition from which its held deliveries are read

    def record(self) -> dict[str, Any]:
        return {"head": self.head, "first": self.first, "at": time.time()}

    @classmethod
    def decode(cls, value: bytes) -> Block:
        """A stored block; ValueError for anything else (only this module writes the topic, but a
        record that is not a block must be skipped, never crash a load or a release)."""
        try:
            doc = orjson.loads(value)
            head, first = doc["head"], doc.get("first")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a block: {exc!r}") from None
        if not isinstance(head, str) or not head or not (
            first is None or (isinstance(first, int) and not isinstance(first, bool) and first >= 0)
        ):
            raise ValueError(f"not a block: head {head!r}, first {first!r}")
        return cls(head, first)


class Ordering:
    """The delivery agent's sequencer for its partitions (one per worker)."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.outbox = dispatcher.outbox
        self.blocked: dict[int, dict[str, Block]] = {}  # partition -> sequence -> block
        self._lanes: dict[str, asyncio.Future[None]] = {}  # sequence -> its last record's finish
        self._reader: AIOKafkaConsumer | None = None
        self._read_lock = asyncio.Lock()
        self.successes: Any = None  # app/successes.py RecentSuccesses (the agent's)
        # Partitions being revoked (set by the consumer thread before it drains them): a release in
        # progress stops at its next step and leaves the rest to a marker for the next owner.
        self.revoking: set[int] = set()

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._reader = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._reader.start()

    async def stop(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.stop()
            self._reader = None

    async def load(self, partitions: list[int]) -> None:
        """Read the blocked sequences of newly assigned partitions (before any of their records is
        taken): every block their previous owner wrote was acknowledged before it let them go."""
        assert self._reader is not None
        topic = self.settings.topic(route.ORDERING)
        tps = [TopicPartition(topic, p) for p in partitions]
        found: dict[int, dict[str, Block]] = {p: {} for p in partitions}
        async with self._read_lock:
            c = self._reader
            c.assign(tps)
            ends = await c.end_offsets(tps)
            todo = {tp for tp in tps if ends[tp] > 0}
            if todo:
                await c.seek_to_beginning(*todo)
            while todo:
                batches = await c.getmany(*todo, timeout_ms=500)
                for tp, recs in batches.items():
                    for rec in recs:
                        seq = (rec.key or b"").decode("utf-8", "replace")
                        if rec.value is None:  # a tombstone: released
                            found[tp.partition].pop(seq, None)
                            continue
                        try:
                            found[tp.partition][seq] = Block.decode(rec.value)
                        except ValueError as exc:  # the sequence keeps its last valid block
                            log.error("ordering: %s@%d (%s) is not a block; skipped: %s", tp, rec.offset, seq, exc)
                for tp in list(todo):
                    if await c.position(tp) >= ends[tp]:
                        todo.discard(tp)
        self.blocked.update(found)
        self._gauge()
        n = sum(len(v) for v in found.values())
        if n:
            log.info("ordering: %d blocked sequence(s) in partitions %s", n, sorted(partitions))
            for p, blocks in found.items():
                for seq, block in blocks.items():
                    log.debug("ordering: %s blocked behind %s (partition %d)", seq, block.head, p)

    def forget(self, partitions: list[int]) -> None:
        for p in partitions:
            self.blocked.pop(p, None)
            self.revoking.discard(p)
        self._gauge()

    def _gauge(self) -> None:
        metrics.ORDERING_BLOCKED.set(sum(len(v) for v in self.blocked.values()))

    # ---- the agent's entry points ------------------------------------------------------------------
    def applies(self, partition: int, d: Delivery) -> bool:
        """Ordered: the endpoint asks for it, or the sequence is still blocked (ordering was just
        switched off: what is held still goes first)."""
        return is_ordered(self.dispatcher.registry.get(d.endpoint_id)) or sequence(d) in self.blocked.get(
            partition, {}
        )

    async def deliver(self, partition: int, d: Delivery) -> None:
        async with self._lane(sequence(d)):
            await self._one(partition, d)

    async def release(self, partition: int, seq: str, head: str) -> None:
        async with self._lane(seq):
            block = self.blocked.get(partition, {}).get(seq)
            if block is None or block.head != head:
                # A duplicate or stale marker: that head was released already. (Never one that
                # overtook its head's block: the marker is read after the head's own record, in
                # the same partition, and waits in the lane until that record is finished, i.e.
                # until the block it caused is written.)
                log.debug("ordering: marker for %s head %s ignored (block %s)", seq, head, block)
                return
            log.debug("ordering: %s released by head %s (partition %d)", seq, head, partition)
            await self._release(partition, seq, block)

    @contextlib.asynccontextmanager
    async def _lane(self, seq: str) -> Any:
        """Run after the sequence's previous record (records are taken in partition order and
        each enters its lane before its first await, so lane order is offset order)."""
        before = self._lanes.get(seq)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lanes[seq] = mine
        try:
            if before is not None:
                await asyncio.shield(before)
            yield
        finally:
            mine.set_result(None)
            if self._lanes.get(seq) is mine:
                del self._lanes[seq]

    # ---- one delivery ------------------------------------------------------------------------------
    async def _one(self, partition: int, d: Delivery) -> None:
        seq = sequence(d)
        blocks = self.blocked.get(partition)
        if blocks is None:
            # Revoked or lost while this record waited in its lane (a drain that timed out): it was
            # not committed, so its next owner reads it again, with the sequence's block. Attempted
            # here it could overtake its sequence's head.
            log.debug("ordering: %s of %s left to the next owner of partition %d", d.id, seq, partition)
            return
        block = blocks.get(seq)
        if block is not None:
            if d.id == block.head:
                log.debug("ordering: head %s of %s read again: in the tiers already", d.id, seq)
                return  # the head read again (after a crash): it is in the tiers already
            await self._hold(partition, blocks, seq, block, d)
            return
        if self.successes is not None and d.id in self.successes:
            metrics.DUPLICATES_SKIPPED.inc()
            return
        if not await self._attempt(d):
            blocks[seq] = Block(d.id)
            await self._write(partition, blocks, seq, blocks[seq])

    def _ours(self, partition: int, blocks: dict[str, Block]) -> bool:
        """False once `partition` was revoked or lost (and maybe assigned again: a new dict) while a
        step awaited. A drain that timed out: the record is not committed, so its next owner goes on
        from the stored block and reads it again; a block written now could land after that owner
        loaded the blocks, unseen by it and stale for the one after."""
        return self.blocked.get(partition) is blocks

    async def _attempt(self, d: Delivery) -> bool:
        """Attempt `d`; True if it is finished (delivered or parked). Otherwise it is in a tier,
        marked so that the tier which finishes it releases its sequence."""
        d.ordered = True
        next_ = await self.dispatcher.dispatch(d)
        return isinstance(next_, (route.Done, route.Dead))

    async def _hold(self, partition: int, blocks: dict[str, Block], seq: str, block: Block, d: Delivery) -> None:
        offset = await self.outbox.publish(route.HELD, seq, d.encode(), partition=partition)
        metrics.child(metrics.ORDERING_HELD, d.endpoint_id).inc()
        if block.first is None:
            block.first = int(offset)
            await self._write(partition, blocks, seq, block)

    async def _write(self, partition: int, blocks: dict[str, Block], seq: str, block: Block | None) -> None:
        """Store the sequence's block (None: unblocked); acknowledged before the record that
        changed it is finished, so its next owner reads it. Not once the partition moved while
        the step awaited (`_ours`): what changed in `blocks` then dies with it."""
        if not self._ours(partition, blocks):
            return
        value = None if block is None else orjson.dumps(block.record())
        await self.outbox.publish(route.ORDERING, seq, value, partition=partition)
        log.debug("ordering: %s %s (partition %d)", seq, "unblocked" if block is None else f"blocked by {block}", partition)
        self._gauge()

    # ---- release -----------------------------------------------------------------------------------
    async def _release(self, partition: int, seq: str, block: Block) -> None:
        blocks = self.blocked.get(partition)
        if blocks is None:
            return
        started, n = time.monotonic(), 0
        pos = block.first
        while pos is not None:
            if not self._ours(partition, blocks):
                return  # lost meanwhile: the next owner goes on from the stored block and marker
            if (
                partition in self.revoking
                or n >= RELEASE_BATCH
                or time.monotonic() - started > RELEASE_SECONDS
            ):
                block.head, block.first = "release:" + secrets.token_hex(6), pos
                await self._write(partition, blocks, seq, block)
                await self.outbox.publish(
                    route.DELIVERIES, None, marker(seq, block.head), partition=partition
                )
                return
            found = await self._next_held(partition, seq, pos)
            if found is None:
                break
            offset, d = found
            pos, n = offset + 1, n + 1
            metrics.ORDERING_RELEASED.inc()
            if d is None or (self.successes is not None and d.id in self.successes):
                continue  # not a delivery (logged, skipped: only we write there), or held twice
            if not await self._attempt(d):
                block.head, block.first = d.id, pos
                await self._write(partition, blocks, seq, block)
                return
        blocks.pop(seq, None)
        await self._write(partition, blocks, seq, None)

    async def _next_held(self, partition: int, seq: str, pos: int) -> tuple[int, Delivery | None] | None:
        """The first held record of `seq` at or after `pos` in its partition; None at the end."""
        assert self._reader is not None
        tp = TopicPartition(self.settings.topic(route.HELD), partition)
        key = seq.encode()
        async with self._read_lock:
            c = self._reader
            c.assign([tp])
            end = (await c.end_offsets([tp]))[tp]
            if pos >= end:
                return None
            c.seek(tp, pos)
            while pos < end:
                recs = (await c.getmany(tp, timeout_ms=1000, max_records=500)).get(tp, [])
                for rec in recs:
                    pos = rec.offset + 1
                    if rec.key == key:
                        try:
                            return rec.offset, Delivery.decode(rec.value or b"")
                        except InvalidDelivery as exc:
                            log.error(
                                "ordering: held record %s@%d is not a delivery: %s", seq, rec.offset, exc
                            )
                            return rec.offset, None
        return None
