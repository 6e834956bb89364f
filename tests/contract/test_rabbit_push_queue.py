"""Contract of `RabbitPushQueue` (pigeon.adapters.push.rabbitmq) on the real broker, over the
outbox of each store (`store` fixture: SQLite and PostgreSQL).

Jobs go from the outbox through a relay onto the RabbitMQ work queue; consumers claim what was
delivered and answer, and the outbox's lease stays the truth throughout. Each test uses a queue
prefix of its own (tests/contract/rabbit_support.py). Nothing here sleeps to synchronise: a test
waits for a delivery (`wait_due`) with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiormq.exceptions
import pytest

from pigeon.adapters.push.rabbitmq import RabbitPushQueue, bucket_of
from pigeon.ports import PushJob, PushQueue, Store
from pigeon.services.clock import SystemClock
from tests.contract.rabbit_support import RABBITMQ_URL, rabbit_topology, ready_in
from tests.contract.test_push_store import (
    T1,
    VIS,
    WINDOW,
    iseq_of,
    job_rows,
    pair,
    pair_and_chats,
    queue_of,
    send,
)

#: The relay's lease (s): long enough for every test, so that nothing is handed over twice.
LEASE = 120.0
LEASE_MS = int(LEASE * 1000)


def now_ms() -> int:
    return SystemClock().now_ms()


class Rabbits:
    """RabbitPushQueues over one outbox, sharing this test's prefix (closed after the test)."""

    def __init__(self, outbox: PushQueue, prefix: str) -> None:
        self.outbox = outbox
        self.prefix = prefix
        self.made: list[RabbitPushQueue] = []

    async def make(self, url: str = RABBITMQ_URL, **kw: Any) -> RabbitPushQueue:
        """A queue with its relay and consumer running (like a worker process's)."""
        kw = {"relay_lease": LEASE, "poll_interval": 0.02, **kw}
        queue = RabbitPushQueue(self.outbox, url, self.prefix, **kw)
        await queue.start(SystemClock(), connect=True)
        self.made.append(queue)
        return queue


@pytest.fixture
async def rabbits(store: Store) -> AsyncIterator[Rabbits]:
    outbox = queue_of(store)
    await outbox.configure(0.0, WINDOW)
    async with rabbit_topology() as prefix:
        made = Rabbits(outbox, prefix)
        yield made
        for queue in made.made:
            await queue.aclose()


async def delivered(
    queues: list[RabbitPushQueue], now: int | None = None, timeout: float = 10.0
) -> tuple[RabbitPushQueue, PushJob]:
    """The first job one of `queues` delivers, and which one it was."""
    async with asyncio.timeout(timeout):
        while True:
            for queue in queues:
                jobs = await queue.claim(now or now_ms(), 10, VIS)
                if jobs:
                    assert len(jobs) == 1, jobs
                    return queue, jobs[0]
            waits = [asyncio.ensure_future(q.wait_due(timeout)) for q in queues]
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()


async def test_a_due_job_goes_through_the_relay_to_exactly_one_of_two_consumers(
    store: Store, rabbits: Rabbits
) -> None:
    a, b = await rabbits.make(), await rabbits.make()
    _, _, da, db, c = await pair(store)
    before = now_ms()
    sent = await send(store, c, da)
    got, job = await delivered([a, b])
    assert (job.device, job.chat, job.last_iseq, job.invite_iseq, job.attempts) == (
        db.id,
        c.id,
        iseq_of(sent, db),
        0,
        1,
    )
    (row,) = await job_rows(store)
    assert row[2] == 1 and row[7] == job.lease  # leased in the outbox while RabbitMQ has it
    assert before + LEASE_MS <= job.lease <= now_ms() + LEASE_MS

    await got.done(job, now_ms(), pushed=True)
    (row,) = await job_rows(store)
    assert (row[2], row[6], row[7]) == (0, 0, 0)  # idle
    assert a.relayed + b.relayed == 1  # handed over once, taken by one consumer, acked
    other = b if got is a else a
    assert await other.claim(now_ms(), 10, VIS) == []
    assert await ready_in(rabbits.prefix) == 0


async def test_entries_that_came_meanwhile_keep_the_job_pending_and_it_comes_again(
    store: Store, rabbits: Rabbits
) -> None:
    a = await rabbits.make()
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    _, job = await delivered([a])
    meanwhile = await send(store, c, da, T1 + 5)
    await a.done(job, now_ms(), pushed=False)  # no push: no window
    _, again = await delivered([a])  # the relay hands the pending job over again
    assert (again.device, again.chat, again.attempts) == (db.id, c.id, 1)
    assert again.last_iseq == iseq_of(meanwhile, db) > job.last_iseq
    await a.done(again, now_ms(), pushed=True)
    (row,) = await job_rows(store)
    assert row[2] == 0


async def test_a_retry_comes_back_after_its_delay_and_not_before(
    store: Store, rabbits: Rabbits
) -> None:
    a, b = await rabbits.make(), await rabbits.make()
    _, _, da, _, c = await pair(store)
    await send(store, c, da)
    got, job = await delivered([a, b])
    start, due = time.monotonic(), now_ms() + 1_500
    await got.retry(job, due, "HTTP 503")
    (row,) = await job_rows(store)
    # leased past the delay and the longest wait in its delay queue: no relay takes it
    assert (row[2], row[6]) == (1, 2)
    assert row[7] == row[5] >= due + LEASE_MS
    assert bucket_of(1_500) == 2

    holder, back = await delivered([a, b])
    waited = time.monotonic() - start
    assert 1.49 <= waited < 3.0, waited  # its delay, not before (RabbitMQ counts in ms)
    assert (back.device, back.chat, back.last_iseq) == (job.device, job.chat, job.last_iseq)
    assert (back.attempts, back.lease) == (2, row[7])

    # a gateway's "gone" for a replaced target retries at once: straight to the work queue
    start = time.monotonic()
    await holder.retry(back, now_ms(), "gone, but another target")
    holder, third = await delivered([a, b])
    assert time.monotonic() - start < 1.0
    assert third.attempts == 3
    # a late answer of an earlier attempt: not its lease, nothing is published or changed
    await got.retry(job, now_ms(), "late")
    await got.done(job, now_ms(), pushed=True)
    (row,) = await job_rows(store)
    assert (row[2], row[6], row[7]) == (1, 3, third.lease)
    await holder.done(third, now_ms(), pushed=True)
    assert await ready_in(rabbits.prefix) == 0


async def test_dead_goes_to_the_stores_dead_letters_and_retry_dead_relays_it_again(
    store: Store, rabbits: Rabbits
) -> None:
    a = await rabbits.make()
    _, _, da, db, c = await pair(store)
    await send(store, c, da)
    _, job = await delivered([a])
    await a.dead(job, "gateway says 500", now_ms())
    (letter,) = await a.dead_letters(10)
    assert (letter.device, letter.chat, letter.attempts, letter.error) == (
        db.id,
        c.id,
        1,
        "gateway says 500",
    )
    (row,) = await job_rows(store)
    assert row[2] == 0
    assert await a.retry_dead([letter.id], now_ms()) == 1
    _, again = await delivered([a])
    assert (again.device, again.chat, again.attempts) == (db.id, c.id, 1)
    await a.done(again, now_ms(), pushed=True)
    assert await a.dead_letters(10) == []
    assert await a.drop_dead(None) == 0


async def test_a_consumer_that_closes_without_acking_hands_the_job_to_another(
    store: Store, rabbits: Rabbits
) -> None:
    a, b = await rabbits.make(), await rabbits.make()
    _, _, da, _, c = await pair(store)
    await send(store, c, da)
    got, job = await delivered([a, b])
    other = b if got is a else a
    await got.aclose()  # a worker process that dies: its channel closes, unacked
    taker, again = await delivered([other])
    assert taker is other
    assert (again.device, again.chat, again.last_iseq, again.attempts) == (
        job.device,
        job.chat,
        job.last_iseq,
        job.attempts,
    )
    assert again.lease >= job.lease  # redelivered: its lease was checked (and renewed)
    (row,) = await job_rows(store)
    assert row[7] == again.lease
    await other.done(again, now_ms(), pushed=True)
    (row,) = await job_rows(store)
    assert (row[2], row[7]) == (0, 0)


async def test_a_redelivered_job_whose_answer_was_committed_is_dropped(
    store: Store, rabbits: Rabbits
) -> None:
    a, b = await rabbits.make(), await rabbits.make()
    _, _, da, _, c = await pair(store)
    await send(store, c, da)
    got, job = await delivered([a, b])
    other = b if got is a else a
    await rabbits.outbox.done(job, now_ms(), pushed=True)  # committed; then the process died
    await got.aclose()
    await other.wait_due(10)
    assert await other.claim(now_ms(), 10, VIS) == []  # checked against the outbox: dropped
    await other.aclose()  # had it not been acked, closing would make it ready again
    assert await ready_in(rabbits.prefix) == 0
    (row,) = await job_rows(store)
    assert (row[2], row[7]) == (0, 0)


async def test_a_delivery_whose_lease_ran_out_is_renewed_or_dropped(
    store: Store, rabbits: Rabbits
) -> None:
    a = await rabbits.make()
    (_, _, da, _, c), (other,) = await pair_and_chats(store, extra=1)
    await send(store, c, da)
    await a.wait_due(10)
    later = now_ms() + LEASE_MS + 5_000  # the relay's lease has run out by then
    (renewed,) = await a.claim(later, 10, VIS)  # nobody took it meanwhile: leased afresh
    assert renewed.lease == later + LEASE_MS
    (row,) = await job_rows(store)
    assert row[7] == renewed.lease
    await a.done(renewed, later, pushed=False)

    await send(store, other, da)
    await a.wait_due(10)
    # another relay handed the job over again once the lease ran out: this copy is stale
    (reclaimed,) = await rabbits.outbox.claim(later + 10_000, 10, VIS)
    assert reclaimed.chat == other.id
    assert await a.claim(later + 10_000, 10, VIS) == []
    rows = {r[1]: r for r in await job_rows(store)}
    assert rows[other.id][7] == reclaimed.lease  # untouched
    assert await ready_in(rabbits.prefix) == 0


async def test_the_relay_leaves_jobs_in_the_outbox_while_the_work_queue_is_full(
    store: Store, rabbits: Rabbits
) -> None:
    # one delivery in flight (prefetch 1), one ready message at most, one job per claim
    a = await rabbits.make(prefetch=1, max_ready=1, relay_batch=1)
    (_, _, da, _, c), others = await pair_and_chats(store, extra=2)
    for each in (c, *others):
        await send(store, each, da)
    _, first = await delivered([a])
    async with asyncio.timeout(10):  # the second waits ready in RabbitMQ, the third is held
        while a.relayed < 2 or await ready_in(rabbits.prefix) < 1:
            await a.wait_due(0.02)
    leased = [r for r in await job_rows(store) if r[7] != 0]
    assert len(leased) == 2  # the third job is pending in the outbox, not leased
    await a.done(first, now_ms(), pushed=True)
    for _ in range(2):  # room again: the rest comes through
        _, job = await delivered([a])
        await a.done(job, now_ms(), pushed=True)
    async with asyncio.timeout(10):  # counted once its publish is confirmed, which may come
        while a.relayed < 3:  # after the consumer already got it (failed once under load)
            await a.wait_due(0.02)
    assert a.relayed == 3
    assert [r[2] for r in await job_rows(store)] == [0, 0, 0]


class Cuttable:
    """A TCP proxy to the broker that a test can cut (connections dropped, new ones refused)
    and restore on the same port: RabbitMQ going away and coming back, for one client."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._to = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._parts = parts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        netloc = self._parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{self.port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._to)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        if writer.is_closing():  # cut meanwhile
            up_writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        down = self._down(up_reader, writer) if self.failing > 0 else pipe(up_reader, writer)
        self.failing -= 1
        await asyncio.gather(pipe(reader, up_writer), down)
        self._writers -= {writer, up_writer}

    #: Connections (from the next one on) that the "broker" closes with an internal error.
    failing = 0

    async def _down(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """The broker's frames, up to its Connection.OpenOk; then a Connection.Close with
        541 INTERNAL_ERROR, as RabbitMQ sends when one of its channel processes fails."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                head = await src.readexactly(7)
                kind, _, size = struct.unpack("!BHI", head)
                body = await src.readexactly(size + 1)
                dst.write(head + body)
                if kind == 1 and body[:4] == struct.pack("!HH", 10, 41):  # Connection.OpenOk
                    text = b"INTERNAL_ERROR"
                    args = struct.pack("!HB", 541, len(text)) + text + struct.pack("!HH", 0, 0)
                    method = struct.pack("!HH", 10, 50) + args  # Connection.Close
                    dst.write(struct.pack("!BHI", 1, 0, len(method)) + method + b"\xce")
                    await dst.drain()
                    break
        dst.close()


async def test_a_lost_connection_loses_no_job(store: Store, rabbits: Rabbits) -> None:
    proxy = Cuttable(RABBITMQ_URL)
    await proxy.open()
    try:
        a = await rabbits.make(url=proxy.url)
        (_, _, da, _, c), (later,) = await pair_and_chats(store, extra=1)
        await send(store, c, da)
        _, job = await delivered([a])
        # RabbitMQ goes away with the job delivered and not acked (and its publish's confirm
        # perhaps not yet received: the relay then publishes it again, marked to be checked)
        await proxy.cut()
        async with asyncio.timeout(10):
            while a.connected:
                await a.wait_due(0.02)
        await a.done(job, now_ms(), pushed=True)  # the outbox has the answer; the ack is lost
        await send(store, later, da)  # due while RabbitMQ is away: waits in the outbox
        (row,) = [r for r in await job_rows(store) if r[1] == later.id]
        assert row[2] == 1
        await proxy.open()  # back: the consumer reconnects, the relay hands the job over
        _, next_job = await delivered([a], timeout=15)
        assert next_job.chat == later.id  # and the redelivered answered one was dropped
        await a.done(next_job, now_ms(), pushed=True)
        assert [r[2] for r in await job_rows(store)] == [0, 0]
        assert await ready_in(rabbits.prefix) == 0
        await a.aclose()
    finally:
        if proxy.serving:
            await proxy.cut()


async def test_a_process_starting_tries_again_when_the_broker_fails_internally(
    rabbits: Rabbits,
) -> None:
    proxy = Cuttable(RABBITMQ_URL)
    await proxy.open()
    try:
        proxy.failing = 1  # RabbitMQ 541s the first connection (as it did in CI to a worker
        queue = await rabbits.make(url=proxy.url)  # that consumed a queue just created)
        assert queue.connected and proxy.failing == -1  # the second connection was its own
        proxy.failing = 3  # every attempt fails: the process gives up with the broker's error
        with pytest.raises(aiormq.exceptions.ConnectionInternalError):
            await rabbits.make(url=proxy.url)
        assert proxy.failing == 0
    finally:
        await proxy.cut()


async def test_the_queue_reports_the_depth_of_its_outbox_when_the_outbox_does(
    rabbits: Rabbits,
) -> None:
    queue = RabbitPushQueue(rabbits.outbox, RABBITMQ_URL, rabbits.prefix, relay_lease=LEASE)
    assert hasattr(queue, "depth") == hasattr(rabbits.outbox, "depth")  # the metrics' gauges
    if hasattr(queue, "depth"):
        assert (await queue.depth(now_ms())).pending == 0
