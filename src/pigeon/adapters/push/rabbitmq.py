"""RabbitMQ as the push work queue of a cluster, fed from the store's outbox by a relay.

Why it exists: on PostgreSQL the outbox table could be the queue of every node's worker (and was,
first), but then every worker polls the database every send waits on, and every lease, retry
and answer churns a table in it (docs/architecture.md, "Push"). Here the outbox stays what it
must be, the record committed with the message, and RabbitMQ does the work-queue part: it
delivers jobs to consumers with a prefetch, redelivers a dead consumer's jobs, and holds
retries until they are due, while workers scale by adding processes.

Topology (declared idempotently; durable quorum queues on the default exchange):

- `<prefix>`: the work queue, consumed with a prefetch of the worker's concurrency.
- `<prefix>.delay.<N>s` for N = 1, 2, 4, ... 131072: a retry due in at most N seconds (and more
  than N/2) waits there with a per-message TTL (`expiration`), and is dead-lettered back to the
  work queue when it expires. A message expires only at the head of its queue, so one behind a
  longer-lived one waits for it: with delays within a factor of two of each other in one queue,
  a retry waits at most twice its delay (as the jitter of the backoff already allows). One queue
  per attempt number would mix a gateway's `Retry-After` of an hour with a backoff of a second.

The relay (one per `RabbitPushQueue`, so one per worker process; any number of them is safe)
claims due jobs from the outbox with the outbox's own lease (`relay_lease`), publishes each
with publisher confirms, and leaves it leased there while RabbitMQ holds it: a relay that dies
between its claim and the confirm, or a message RabbitMQ lost, is handed over again once that
lease runs out. The lease is the truth: every answer (`done`, `retry`, `dead`) goes to the
outbox with the lease the job carries, and a delivery whose lease is no longer its own (a
redelivery after its answer was committed, a copy that waited past its lease) is dropped
unanswered. A retry extends the lease past its delay before it is published (`extend`).

RabbitMQ unreachable: the relay and the consumer wait, reconnecting with backoff; jobs wait in
the outbox, and the message path never talks to RabbitMQ. A push may go twice (a worker killed
between the gateway's answer and the outbox's commit), never zero times.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import PublishError
from aiormq.exceptions import ConnectionInternalError

from pigeon.ports import (
    Clock,
    DeadLetter,
    PushJob,
    PushQueue,
    PushQueueDepth,
    PushQueueFeed,
    PushQueueStats,
)

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the delay queues' delays; a longer delay uses the last one.
DELAY_BUCKETS: tuple[int, ...] = tuple(2**k for k in range(18))  # 1 s .. 36 h
#: Deliveries of one message (redeliveries included) before the work queue drops it: a job
#: that kills its worker every time must not kill them all forever. A dropped job comes back
#: from the outbox when its lease runs out.
DELIVERY_LIMIT = 20
#: Seconds to connect (and set up the topology and the consumer), to wait for one publish's
#: confirm or one ack, and to close: a broker that stops answering never hangs a worker.
_CONNECT_TIMEOUT = 10.0
_PUBLISH_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 5.0
#: Attempts at the first connection of a process that connects at start (`pigeon push-worker`)
#: when the broker answers with an internal error (541: a channel process of its own failed).
#: Processes starting together do that: a consumer on a quorum queue another connection created
#: a moment before, whose Ra server is not running yet, crashes its channel in RabbitMQ 3.10
#: (`{badmatch,{error,noproc}}`; 18 of 120 connections when four declare and consume a fresh
#: queue at once, here). The broker's trouble, not the operator's, and gone a moment later, so
#: it is tried again before the process gives up. Other failures (unreachable, refused
#: credentials, too old a broker) are reported at once.
_START_ATTEMPTS = 3
#: Longest pause between reconnection attempts, or after a failed relay round (seconds).
_MAX_BACKOFF = 30.0
#: A header on a job published again (its first copy may exist): check it when delivered.
_CHECK = "x-pigeon-check"
_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(PushJob).decode


class _Reported(logging.Filter):
    """aiormq logs each failed connection attempt as an error with its traceback; this module
    reports it itself (a warning per attempt, or the one-line failure of `pigeon push-worker`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_Reported())


def delay_queue(prefix: str, seconds: int) -> str:
    """The name of the delay queue of delays up to `seconds`."""
    return f"{prefix}.delay.{seconds}s"


def queue_names(prefix: str) -> list[str]:
    """Every queue the topology of `prefix` may hold (the work queue first)."""
    return [prefix, *(delay_queue(prefix, s) for s in DELAY_BUCKETS)]


def bucket_of(delay_ms: int) -> int | None:
    """The delay queue (its bound in seconds) for a retry due in `delay_ms`; None: due now."""
    if delay_ms <= 0:
        return None
    for seconds in DELAY_BUCKETS:
        if delay_ms <= seconds * 1000:
            return seconds
    return DELAY_BUCKETS[-1]


def masked(url: str) -> str:
    """`url` without its password (for logs)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


@dataclass(slots=True)
class _Delivery:
    """A job RabbitMQ delivered, with what acks it (valid on the connection it came on)."""

    job: PushJob
    message: AbstractIncomingMessage
    link: int


class RabbitPushQueue:
    """A `PushQueue` whose jobs travel through RabbitMQ: the relay feeds it from `outbox`, a
    consumer takes deliveries, answers go to the outbox and then ack the delivery. The dead
    letters stay the outbox's (`pigeon push dlq`).

    `start` connects (in the background, reconnecting as needed) and runs the relay; without it
    only the dead-letter calls and `configure` work (they are the outbox's).
    """

    #: The outbox's depth (`PushQueueStats`), when it tells it: its due jobs are those not yet
    #: relayed. Absent otherwise (the metrics skip a queue without it).
    depth: Callable[[int], Awaitable[PushQueueDepth]]

    def __init__(
        self,
        outbox: PushQueue,
        url: str,
        prefix: str,
        *,
        relay_lease: float,
        prefetch: int = 32,
        poll_interval: float = 0.25,
        relay_batch: int = 256,
        max_ready: int = 2_000,
    ) -> None:
        self._outbox = outbox
        self._url = url
        self._prefix = prefix
        self._lease_ms = int(relay_lease * 1000)
        self._prefetch = prefetch
        self._poll = poll_interval
        self._batch = relay_batch
        #: The relay claims nothing while the work queue holds this many ready messages: jobs
        #: wait in the outbox (unleased) rather than in RabbitMQ, past their leases.
        self._max_ready = max_ready
        self._clock: Clock | None = None
        self._connection: AbstractConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._work: AbstractQueue | None = None
        self._declared: set[str] = set()
        #: Which connection is the current one: deliveries of an older one cannot be acked.
        self._link = 0
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._arrived = asyncio.Event()
        self._ready: deque[_Delivery] = deque()
        self._held: dict[int, _Delivery] = {}
        #: Jobs the relay claimed and RabbitMQ has not confirmed yet.
        self._unsent: list[PushJob] = []
        self._tasks: list[asyncio.Task[None]] = []
        #: Jobs the relay handed to RabbitMQ (for tests, the bench and logs).
        self.relayed = 0
        if hasattr(outbox, "depth"):
            self.depth = cast(PushQueueStats, outbox).depth

    @property
    def outbox(self) -> PushQueue:
        """The store's queue this one is fed from (and answers to)."""
        return self._outbox

    @property
    def connected(self) -> bool:
        """Whether a connection to RabbitMQ is up (with its topology and consumer)."""
        return self._up.is_set()

    # -- running --------------------------------------------------------------------------

    async def start(self, clock: Clock, *, connect: bool = False) -> None:
        """Run the connection (reconnecting as needed), the consumer and the relay. With
        `connect`, the first connection is made here, and its failure raised (a process that
        does nothing else says so at once); else it is made in the background."""
        self._clock = clock
        if connect:
            await self._first_open()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_connected(), name="push-rabbitmq-link"),
            loop.create_task(self._relay(), name="push-relay"),
        ]

    async def aclose(self) -> None:
        """Stop the relay and the consumer: what was delivered and not acked goes back to the
        work queue (to another consumer), what the relay had claimed and not published stays
        leased in the outbox until `relay_lease` runs out."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._drop()

    async def _first_open(self) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                await self._open()
                return
            except ConnectionInternalError as exc:
                if attempt == _START_ATTEMPTS:
                    raise
                log.warning(
                    "push queue: RabbitMQ at %s failed internally (%s), trying again (%d of %d)",
                    masked(self._url),
                    exc,
                    attempt + 1,
                    _START_ATTEMPTS,
                )
                await asyncio.sleep(_backoff(attempt))

    async def _open(self) -> None:
        async with asyncio.timeout(3 * _CONNECT_TIMEOUT):
            await self._connect()
        self._up.set()
        log.info("push queue: connected to RabbitMQ at %s (%s)", masked(self._url), self._prefix)

    async def _connect(self) -> None:
        connection = await aio_pika.connect(self._url, timeout=_CONNECT_TIMEOUT)
        try:
            _check_version(connection)
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            consumer = await connection.channel(publisher_confirms=False)
            await consumer.set_qos(prefetch_count=self._prefetch)
            work = await consumer.declare_queue(
                self._prefix,
                durable=True,
                arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT},
            )
            self._link += 1
            self._lost.clear()
            link = self._link

            def on_close(*_: Any) -> None:
                if link == self._link:  # not an old connection's, closing late
                    self._lost.set()

            for closing in (connection, publisher, consumer):
                closing.close_callbacks.add(on_close)

            async def deliver(message: AbstractIncomingMessage) -> None:
                await self._on_message(message, link)

            await work.consume(deliver, no_ack=False)
        except BaseException:
            await _close(connection)
            raise
        self._connection, self._publisher, self._work = connection, publisher, work
        self._declared = set()

    async def _drop(self) -> None:
        """Forget the connection and what came on it (RabbitMQ redelivers it elsewhere)."""
        self._up.clear()
        self._link += 1
        self._ready.clear()
        self._held.clear()
        connection = self._connection
        self._connection, self._publisher, self._work = None, None, None
        if connection is not None:
            await _close(connection)

    async def _keep_connected(self) -> None:
        failures = 0
        while True:
            if self._connection is None:
                try:
                    await self._open()
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    log.warning(
                        "push queue: RabbitMQ at %s unreachable (%d in a row): %s",
                        masked(self._url),
                        failures,
                        exc or type(exc).__name__,
                    )
                    await asyncio.sleep(_backoff(failures))
                    continue
            await self._lost.wait()
            log.warning("push queue: RabbitMQ connection lost, reconnecting")
            await self._drop()

    async def _on_message(self, message: AbstractIncomingMessage, link: int) -> None:
        try:
            job = _decode(message.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("push queue: dropped a message that is no push job: %s", exc)
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)
            return
        self._ready.append(_Delivery(job, message, link))
        self._arrived.set()

    # -- the relay ------------------------------------------------------------------------

    async def _relay(self) -> None:
        failures = 0
        while True:
            try:
                await self._relay_round()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store or RabbitMQ failed: back off, jobs wait
                failures += 1
                log.warning("push relay round failed (%d in a row): %s", failures, exc)
                await asyncio.sleep(_backoff(failures))

    async def _relay_round(self) -> None:
        await self._up.wait()
        if self._unsent:  # claimed before RabbitMQ went away: still leased to this relay
            await self._publish_claimed(again=True)
            return
        clock = self._clock
        assert clock is not None
        due = await self._outbox.next_due()  # a read: an idle relay writes nothing
        now = clock.now_ms()
        if due is None or due > now:
            wait = self._poll if due is None else min(self._poll, (due - now) / 1000)
            await asyncio.sleep(wait)
            return
        if await self._backlog() >= self._max_ready:
            await asyncio.sleep(self._poll)  # the consumers are behind: jobs wait unleased
            return
        self._unsent = await self._outbox.claim(now, self._batch, self._lease_ms / 1000)
        if self._unsent:
            await self._publish_claimed()
        else:
            await asyncio.sleep(self._poll)  # another relay took them

    async def _backlog(self) -> int:
        work = self._work
        if work is None:
            raise ConnectionError("not connected to RabbitMQ")
        return int((await work.declare(timeout=_PUBLISH_TIMEOUT)).message_count or 0)

    async def _publish_claimed(self, *, again: bool = False) -> None:
        """Publish the jobs claimed. `again`: their first publish failed, but RabbitMQ may have
        stored some (a confirm lost with the connection): those the outbox no longer leases to
        them (answered meanwhile) are skipped, and the rest go out marked, to be checked
        against the outbox when they are delivered."""
        jobs = self._unsent
        if again:  # (if the store fails here, they stay unsent, for the next round)
            kept = [await self._outbox.extend(job, job.lease) for job in jobs]
            jobs = [job for job in kept if job is not None]
        self._unsent = []
        results = await asyncio.gather(
            *(self._publish(job, None, check=again) for job in jobs), return_exceptions=True
        )
        assert self._clock is not None
        now = self._clock.now_ms()
        failed: list[tuple[PushJob, BaseException]] = [
            (job, r) for job, r in zip(jobs, results, strict=True) if isinstance(r, BaseException)
        ]
        self.relayed += len(jobs) - len(failed)
        # kept while their leases last; after that the outbox hands them out again
        self._unsent = [job for job, _ in failed if job.lease > now + 1_000]
        if failed:
            error = failed[0][1]
            if isinstance(error, PublishError):
                self._lost.set()  # unroutable: the topology is gone; declare it again
            raise error

    async def _publish(self, job: PushJob, delay_ms: int | None, *, check: bool = False) -> None:
        """Publish `job` to the work queue, or (with a delay) to its delay queue, and wait for
        RabbitMQ's confirm. `check`: the consumer checks its lease before handing it out."""
        publisher = self._publisher
        if publisher is None or not self._up.is_set():
            raise ConnectionError("not connected to RabbitMQ")
        bucket = bucket_of(delay_ms or 0)
        target = self._prefix if bucket is None else await self._delay_queue(publisher, bucket)
        message = aio_pika.Message(
            _encode(job),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=None if bucket is None else datetime.timedelta(milliseconds=delay_ms or 0),
            headers={_CHECK: 1} if check else None,
        )
        await publisher.default_exchange.publish(
            message, routing_key=target, timeout=_PUBLISH_TIMEOUT
        )

    async def _delay_queue(self, channel: AbstractChannel, seconds: int) -> str:
        name = delay_queue(self._prefix, seconds)
        if name not in self._declared:
            await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self._prefix,
                    # expired messages move only once the work queue has them (3.10+)
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
            self._declared.add(name)
        return name

    # -- PushQueue ------------------------------------------------------------------------

    async def configure(self, grace: float, window: float) -> None:
        await self._outbox.configure(grace, window)

    async def claim(self, now: int, limit: int, visibility: float) -> list[PushJob]:
        """What RabbitMQ delivered (never waits). A redelivered job, one published again, or one
        whose lease would run out during its push, gets a fresh lease from the outbox first; one
        the outbox no longer leases to it (answered already, or handed over again) is acked and
        dropped."""
        jobs: list[PushJob] = []
        taken: list[_Delivery] = []
        try:
            while self._ready and len(jobs) < limit:
                d = self._ready.popleft()
                if d.link != self._link:
                    continue  # its connection is gone: RabbitMQ redelivers it
                taken.append(d)
                if (
                    d.message.redelivered
                    or d.job.lease < now + visibility * 1000
                    or (d.message.headers or {}).get(_CHECK)
                ):
                    renewed = await self._outbox.extend(d.job, now + self._lease_ms)
                    if renewed is None:
                        taken.pop()
                        await self._settle(d, ack=True)
                        continue
                    d.job = renewed
                jobs.append(d.job)
        except BaseException:
            self._ready.extendleft(reversed(taken))  # claimed again later, checked again
            raise
        for d in taken:
            self._held[id(d.job)] = d
        if not self._ready:
            self._arrived.clear()
        return jobs

    async def next_due(self) -> int | None:
        """Now if deliveries wait, else None (due jobs are the relay's business)."""
        if not self._ready:
            return None
        return self._clock.now_ms() if self._clock is not None else 0

    async def wait_due(self, timeout: float) -> None:
        if self._ready:
            return
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._arrived.wait()

    async def done(self, job: PushJob, now: int, pushed: bool) -> None:
        d = self._held.pop(id(job), None)
        try:
            await self._outbox.done(job, now, pushed)
        except BaseException:
            await self._settle(d, ack=False)
            raise
        await self._settle(d, ack=True)

    async def retry(self, job: PushJob, due_at: int, error: str) -> None:
        """Extend the job's lease in the outbox past its delay (and its longest wait in the
        delay queue), then publish its next attempt there; if RabbitMQ refuses, the outbox
        gets it back due at `due_at`, for the relay."""
        d = self._held.pop(id(job), None)
        assert self._clock is not None
        now = self._clock.now_ms()
        delay_ms = max(0, due_at - now)
        bucket = bucket_of(delay_ms)
        until = now + (bucket or 0) * 1000 + self._lease_ms
        try:
            nxt = msgspec.structs.replace(job, attempts=job.attempts + 1)
            renewed = await self._outbox.extend(nxt, until)
            if renewed is not None:  # else: not its lease any more, the holder answers
                try:
                    await self._publish(renewed, delay_ms)
                except Exception as exc:
                    log.warning("push retry of %s not published: %s", job.device, exc)
                    await self._outbox.retry(renewed, due_at, error)
        except BaseException:
            await self._settle(d, ack=False)
            raise
        await self._settle(d, ack=True)

    async def dead(self, job: PushJob, error: str, now: int) -> None:
        d = self._held.pop(id(job), None)
        try:
            await self._outbox.dead(job, error, now)
        except BaseException:
            await self._settle(d, ack=False)
            raise
        await self._settle(d, ack=True)

    async def extend(self, job: PushJob, until: int) -> PushJob | None:
        return await self._outbox.extend(job, until)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        return await self._outbox.dead_letters(limit)

    async def retry_dead(self, ids: list[int] | None, now: int) -> int:
        return await self._outbox.retry_dead(ids, now)

    async def drop_dead(self, ids: list[int] | None) -> int:
        return await self._outbox.drop_dead(ids)

    async def _settle(self, d: _Delivery | None, *, ack: bool) -> None:
        """Ack the delivery, or give it back to the work queue (its job comes again, and is
        checked against the outbox's lease). A delivery of a lost connection needs neither."""
        if d is None or d.link != self._link:
            return
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT):
                if ack:
                    await d.message.ack()
                else:
                    await d.message.nack(requeue=True)
        except Exception as exc:  # the channel is gone: RabbitMQ redelivers it, checked
            log.debug("push queue: delivery not settled: %s", exc)


async def _close(connection: AbstractConnection) -> None:
    """Close `connection`, waiting a bounded time for the broker (its deliveries go back to the
    queue either way once the socket is gone)."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await connection.close()
    except Exception as exc:
        log.debug("push queue: RabbitMQ connection not closed cleanly: %r", exc)


def _check_version(connection: AbstractConnection) -> None:
    """Quorum queues expire messages and dead-letter them at least once from RabbitMQ 3.10."""
    transport = getattr(connection, "transport", None)
    props = getattr(getattr(transport, "connection", None), "server_properties", None) or {}
    raw = props.get("version", b"")
    version = raw.decode() if isinstance(raw, bytes) else str(raw)
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if len(numbers) == 2 and numbers < (3, 10):
        raise RuntimeError(f"RabbitMQ {version} is too old for the push queue: 3.10 or later")


def _backoff(failures: int) -> float:
    ceiling = min(_MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
    return random.uniform(ceiling / 2, ceiling)


_check_queue: type[PushQueue] = RabbitPushQueue
_check_feed: type[PushQueueFeed] = RabbitPushQueue
