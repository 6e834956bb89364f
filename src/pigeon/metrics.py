"""Prometheus metrics: what a node counts and times, and the `/metrics` endpoint.

Why this module exists: operators need to see a node's load and latencies, but the core
(domain and services) must not depend on a metrics library. So instrumentation lives at the
edges and is wired by the composition root (app.py):

- the gateway counts commands by type and reply code, live WebSockets, sync durations and blob
  bytes (it is handed a `Metrics`);
- thin wrappers around the ports time every call: `TimedStore` (each sub-store method is one
  named operation) and `TimedBus` (publishes);
- two plain hooks of the core report what only it sees: `Fanout(on_delivered=...)` (commit to
  frames published) and `PushWorker.observe` (push outcomes);
- gauges of the store's state are read apart from the scrape: the push queue's depth at each
  scrape, the inboxes' depth by a task of their own every `metrics.inbox_interval` seconds
  (`InboxGauges`: it counts rows, which a scrape should not wait for).

`ProcessMetrics` is what any process working on the store reports (a `pigeon push-worker`
serves only these); `Metrics` adds a serving node's.

Hot-path cost. prometheus-client's `Histogram.observe` takes a lock (~2 µs here), and ~5 µs in
multiprocess mode, where every value is a write into a memory-mapped file; a delivered message
makes about a dozen observations. So the hot path writes to plain accumulators (`Timing`, `Tally`:
a bisect and two additions on the event-loop thread, no lock, ~0.3 µs) that are folded into
prometheus-client's metrics when `/metrics` is read and, with `--workers` (where a scrape reads
the files of every worker), every `FLUSH_INTERVAL` seconds by each worker. The folding uses the
`_buckets` and `_sum` values of a histogram child, which prometheus-client has kept for years;
the multiprocess test would notice if that changed.

Several processes: `pigeon serve --workers N` sets `PROMETHEUS_MULTIPROC_DIR` (supervisor.py);
then values go to files there and a scrape, answered by any worker, aggregates them with
`MultiProcessCollector`. Without it, one process keeps its own registry. Gauges of the store's
state are read by every worker alike, so they are exported as the most recent reading of a
live worker (`livemostrecent`), not summed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Collection, Iterable
from time import perf_counter
from typing import Any, TypeVar, cast, get_args

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pigeon.gateway import protocol as p
from pigeon.ports import (
    AccountStore,
    AttachmentStore,
    Bus,
    BusHandler,
    ChatStore,
    Clock,
    InboxDepth,
    KeyStore,
    MessageStore,
    PushJob,
    PushQueue,
    PushQueueStats,
    PushStore,
    Store,
    Subscription,
    port_operations,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Set (to a directory) in every process of `pigeon serve --workers N`: multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds between two foldings of a worker's accumulators into its files (multiprocess mode:
#: how stale a scrape answered by another worker may be).
FLUSH_INTERVAL = 1.0
#: Latencies of calls that usually take well under a millisecond (store, bus, a send).
FAST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
#: An inbox sync: from nothing to thousands of entries.
SYNC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Reply code of an undecodable frame's command label (its type is unknown).
INVALID = "invalid"
PUSH_RESULTS = ("sent", "skipped", "retried", "dead", "gone")
#: What a scrape waits at most for the push queue's depth (a store that hangs).
_DEPTH_TIMEOUT = 2.0
#: What a reading of the inboxes' depth may take at most (it counts rows).
_INBOX_TIMEOUT = 10.0


class Timing:
    """One histogram child, accumulated without a lock on the event-loop thread; `flush` adds
    what was observed since the last flush to the prometheus-client child. With `labels`, the
    child is made at the first flush that has something: an operation never called exports
    no series."""

    __slots__ = ("_bounds", "_child", "_counts", "_labels", "_metric", "_sum")

    def __init__(self, metric: Histogram, labels: tuple[str, ...] = ()) -> None:
        self._metric = metric
        self._labels = labels
        self._child: Histogram | None = None if labels else metric
        self._bounds = tuple(metric._upper_bounds)  # the histogram's own, +Inf last
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation (`le` buckets: a value equal to a bound falls into it)."""
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        self._counts = [0] * len(counts)
        total, self._sum = self._sum, 0.0
        child = self._child
        if child is None:
            child = self._child = self._metric.labels(*self._labels)
        buckets = child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        child._sum.inc(total)


class Tally:
    """One counter child, accumulated without a lock; `flush` adds it to the child."""

    __slots__ = ("_child", "n")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.n = 0

    def inc(self, amount: int = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        if self.n:
            n, self.n = self.n, 0
            self._child.inc(n)


class ProcessMetrics:
    """The metrics of any process that works on the store: its store operations, push outcomes
    and push queue, and their exposition. A `pigeon push-worker` reports these alone (a
    serving node's connections and commands would only be zeros there).

    One per process (per app in tests), each with its own registry, so several servers in one
    test process count apart. Everything is called on the event-loop thread."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # `_created` series: not in multiprocess mode, and half the lines of a scrape otherwise
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self._parts: list[Timing | Tally] = []
        self._store = Histogram(
            "pigeon_store_operation_seconds",
            "Store calls by operation (a sub-store method; group-commit waits included).",
            ["op"],
            registry=r,
            buckets=FAST_BUCKETS,
        )
        push = Counter(
            "pigeon_push_outcomes",
            "Push jobs answered by this node's worker, by result.",
            ["result"],
            registry=r,
        )
        self._push = {result: push.labels(result) for result in PUSH_RESULTS}
        self._push_counter = push
        self._queue: PushQueue | None = None
        self._clock: Clock | None = None
        self._flusher: asyncio.Task[None] | None = None

    def _timing(self, metric: Histogram, labels: tuple[str, ...] = ()) -> Timing:
        timing = Timing(metric, labels)
        self._parts.append(timing)
        return timing

    def _tally(self, child: Counter) -> Tally:
        tally = Tally(child)
        self._parts.append(tally)
        return tally

    def push_outcome(self, result: str, job: PushJob) -> None:
        """`PushWorker.observe` callback (a few per push: not the hot path)."""
        child = self._push.get(result)
        (child or self._push_counter.labels(result)).inc()

    # -- wrappers of ports -----------------------------------------------------------------

    def timed(self, inner: T, port: type[Any], prefix: str = "") -> T:
        """`inner` with every coroutine method of the protocol `port` timed as the store
        operation `prefix + name`; anything else is `inner`'s own."""
        methods: dict[str, Callable[..., Awaitable[Any]]] = {}
        for name in port_operations(port):
            timing = self._timing(self._store, (prefix + name,))
            methods[name] = _timed_call(getattr(inner, name), timing)
        return cast(T, _Timed(inner, methods))

    def watch_push_queue(self, queue: PushQueue | None, clock: Clock) -> None:
        """Report the depth and lag of `queue` on each scrape, if it can tell them
        (`PushQueueStats`; a queue without `depth` is skipped)."""
        self._queue, self._clock = queue, clock

    # -- exposition ------------------------------------------------------------------------

    def flush(self) -> None:
        """Fold the accumulators into prometheus-client's values."""
        for part in self._parts:
            part.flush()

    async def render(self) -> bytes:
        """The text exposition of this node (of every worker's, in multiprocess mode)."""
        self.flush()
        scraped = await self._scrape_push_queue()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            body = await asyncio.to_thread(generate_latest, registry)  # reads files: off the loop
        else:
            body = generate_latest(self.registry)
        if scraped:
            extra = CollectorRegistry(auto_describe=False)
            extra.register(_Fixed(scraped))
            body += generate_latest(extra)
        return body

    async def _scrape_push_queue(self) -> list[Metric]:
        depth = getattr(self._queue, "depth", None)
        if depth is None or self._clock is None:
            return []
        stats = cast(PushQueueStats, self._queue)
        now = self._clock.now_ms()
        try:
            async with asyncio.timeout(_DEPTH_TIMEOUT):
                d = await stats.depth(now)
        except Exception as exc:  # the store is down: the gauges are left out of this scrape
            log.warning("push queue depth not read: %s", exc)
            return []
        lag = 0.0 if d.oldest_due_at is None else max(0.0, (now - d.oldest_due_at) / 1000)
        return [
            GaugeMetricFamily(
                "pigeon_push_queue_jobs", "Push jobs pending (leased ones included).", d.pending
            ),
            GaugeMetricFamily(
                "pigeon_push_queue_due_jobs", "Pending push jobs that may be claimed now.", d.due
            ),
            GaugeMetricFamily(
                "pigeon_push_queue_lag_seconds",
                "Age of the oldest claimable push job since it became due (0: none waits).",
                lag,
            ),
        ]

    async def start(self) -> None:
        """In multiprocess mode, fold the accumulators into this worker's files regularly."""
        if self.multiprocess and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_forever(), name="metrics-flush"
            )

    async def aclose(self) -> None:
        """Stop flushing, after a last flush (a graceful stop loses no count)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)  # a period, not synchronisation
            self.flush()


class Metrics(ProcessMetrics):
    """The metrics of one serving node (`pigeon serve`, one process): `ProcessMetrics`, plus
    what the gateway counts (connections, commands, sends, syncs, blob bytes), the bus's
    publishes and the inboxes' depth."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.connections = Gauge(
            "pigeon_connections",
            "Live WebSocket connections (from the upgrade until closed).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._commands = Counter(
            "pigeon_commands",
            "WebSocket commands answered, by type and reply code (ok or the error code).",
            ["command", "code"],
            registry=r,
        )
        kinds: list[type[p.Command]] = list(get_args(p.AnyCommand))
        self._names: dict[type[p.Command] | None, str] = {
            kind: str(kind.__struct_config__.tag) for kind in kinds
        }
        self._names[None] = INVALID
        self._ok = {
            kind: self._tally(self._commands.labels(self._names[kind], "ok")) for kind in kinds
        }
        self._errors: dict[tuple[type[p.Command] | None, str], Tally] = {}
        self._send_commit = self._timing(
            Histogram(
                "pigeon_send_commit_seconds",
                "From a send command's arrival to its reply, sent after the store commit.",
                registry=r,
                buckets=FAST_BUCKETS,
            ),
        )
        self.send_delivery = self._timing(
            Histogram(
                "pigeon_send_delivery_seconds",
                "From a message's commit to its frames published to the recipients' "
                "connections (in-process bus: queued on them; Redis: accepted by Redis).",
                registry=r,
                buckets=FAST_BUCKETS,
            ),
        )
        self.sync = self._timing(
            Histogram(
                "pigeon_sync_seconds",
                "Inbox syncs (on connect, on `sync` and after a bus outage): start to live.",
                registry=r,
                buckets=SYNC_BUCKETS,
            ),
        )
        self.bus_publish = self._timing(
            Histogram(
                "pigeon_bus_publish_seconds",
                "Bus publish calls (one call may carry the frames of a whole fan-out).",
                registry=r,
                buckets=FAST_BUCKETS,
            ),
        )
        self.bus_frames = self._tally(
            Counter("pigeon_bus_published_frames", "Frames published on the bus.", registry=r)
        )
        self.blob_in = Counter(
            "pigeon_blob_received_bytes",
            "Attachment bytes received by pigeon's own blob endpoint (local blob store).",
            registry=r,
        )
        self.blob_out = Counter(
            "pigeon_blob_sent_bytes",
            "Attachment bytes sent by pigeon's own blob endpoint (local blob store).",
            registry=r,
        )
        self.inbox = InboxGauges(r)

    # -- what the gateway reports ----------------------------------------------------------

    def command(self, kind: type[p.Command] | None, code: str, arrived: float) -> None:
        """A command was answered with `code` (`ok` or an error code); `arrived` is the
        `perf_counter()` of its frame's arrival. None: a frame that did not decode."""
        if code == "ok" and kind is not None:
            self._ok[kind].n += 1
            if kind is p.Send:
                self._send_commit.observe(perf_counter() - arrived)
            return
        tally = self._errors.get((kind, code))
        if tally is None:  # first time for this pair (error codes are a small, fixed set)
            tally = self._tally(self._commands.labels(self._names[kind], code))
            self._errors[(kind, code)] = tally
        tally.n += 1

    def watch_inbox(
        self, read: Callable[[], Awaitable[InboxDepth]], clock: Clock, interval: float
    ) -> None:
        """Read the inboxes' depth with `read` every `interval` seconds once started (0: never;
        the gauges then stay out of the scrapes)."""
        self.inbox.watch(read, clock, interval)

    async def start(self) -> None:
        await super().start()
        self.inbox.start()

    async def aclose(self) -> None:
        await self.inbox.aclose()
        await super().aclose()


class InboxGauges:
    """`pigeon_inbox_entries` and `pigeon_inbox_oldest_entry_age_seconds`: how much waits in
    every device's inbox, store-wide, read by a task of its own every few seconds.

    Why a task and not the scrape: the reading counts the inbox's rows, which may take a while
    on a big store, and a scrape must answer at once (and, with `--workers`, the worker that
    answers cannot read for the others). Every worker reads the same store-wide figures, so
    the gauges are exported as the most recent reading among the live workers
    (`livemostrecent`): a sum would count the inboxes N times, a maximum would keep a stale
    high value until every worker read again. The gauges exist from the first reading on (not
    at all if reading is off: a zero would say "empty"); a reading that fails (the store is
    down) leaves the last values and says so in the log."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._gauges: tuple[Gauge, Gauge] | None = None
        self._read: Callable[[], Awaitable[InboxDepth]] | None = None
        self._clock: Clock | None = None
        self._interval = 0.0
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        #: Waiters of `next_reading`: those of the reading under way, and of the one after.
        self._current: list[asyncio.Future[InboxDepth]] = []
        self._next: list[asyncio.Future[InboxDepth]] = []

    def watch(
        self, read: Callable[[], Awaitable[InboxDepth]], clock: Clock, interval: float
    ) -> None:
        """What `start` will read, by which clock the age is taken, and how often."""
        self._read, self._clock, self._interval = read, clock, interval

    def start(self) -> None:
        """Read now, then every `interval` seconds, until `aclose`."""
        if self._read is not None and self._interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metrics-inbox")

    async def aclose(self) -> None:
        """Stop reading (the store is about to close); the gauges keep their last values."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for waiter in self._current + self._next:
            waiter.cancel()
        self._current, self._next = [], []

    def _make_gauges(self) -> tuple[Gauge, Gauge]:
        self._gauges = (
            Gauge(
                "pigeon_inbox_entries",
                "Inbox entries waiting for their device's ack, over every device (store-wide; "
                "read every metrics.inbox_interval seconds).",
                registry=self._registry,
                multiprocess_mode="livemostrecent",
            ),
            Gauge(
                "pigeon_inbox_oldest_entry_age_seconds",
                "Age of the oldest inbox entry still waiting for its device's ack, when last "
                "read (0: every inbox is empty).",
                registry=self._registry,
                multiprocess_mode="livemostrecent",
            ),
        )
        return self._gauges

    async def next_reading(self) -> InboxDepth:
        """The first reading that starts after this call (tests: what the gauges say about a
        state the caller has just made)."""
        waiter: asyncio.Future[InboxDepth] = asyncio.get_running_loop().create_future()
        self._next.append(waiter)
        return await waiter

    async def _run(self) -> None:
        while True:
            await self._refresh()
            await asyncio.sleep(self._interval)  # a period, not synchronisation

    async def _refresh(self) -> None:
        assert self._read is not None and self._clock is not None
        self._current, self._next = self._next, []
        try:
            async with asyncio.timeout(_INBOX_TIMEOUT):
                depth = await self._read()
        except Exception as exc:  # the store is down: the last values stay
            if not self._failing:
                log.warning("inbox depth not read (the gauges keep their last values): %s", exc)
            self._failing = True
            self._next = self._current + self._next  # their reading is still to come
            self._current = []
            return
        if self._failing:
            log.info("inbox depth read again")
            self._failing = False
        now = self._clock.now_ms()
        age = 0.0 if depth.oldest_at is None else max(0.0, (now - depth.oldest_at) / 1000)
        entries, oldest_age = self._gauges or self._make_gauges()
        entries.set(depth.entries)
        oldest_age.set(age)
        for waiter in self._current:
            if not waiter.done():
                waiter.set_result(depth)
        self._current = []


class _Fixed(Collector):
    """Metric families computed for one scrape (the push queue's gauges)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class _Timed:
    """A port adapter whose listed coroutine methods are timed (instance attributes: a call
    costs one dict lookup more than calling the adapter, no `__getattr__`)."""

    def __init__(self, inner: object, methods: dict[str, Callable[..., Awaitable[Any]]]) -> None:
        self._inner = inner
        self.__dict__.update(methods)

    def __getattr__(self, name: str) -> Any:  # only for what is not timed
        return getattr(self._inner, name)


def _timed_call(method: Callable[..., Awaitable[T]], timing: Timing) -> Callable[..., Awaitable[T]]:
    observe = timing.observe

    async def call(*args: Any, **kwargs: Any) -> T:
        start = perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            observe(perf_counter() - start)

    return call


class TimedStore:
    """The Store the services use: the adapter's, each sub-store call timed as one operation
    (`op` label: the method name; attachment and push calls are prefixed `attachment_`,
    `push_`). Opening and closing stay the adapter's."""

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self._inner = inner
        self.accounts: AccountStore = metrics.timed(inner.accounts, AccountStore)
        self.chats: ChatStore = metrics.timed(inner.chats, ChatStore)
        self.messages: MessageStore = metrics.timed(inner.messages, MessageStore)
        self.attachments: AttachmentStore = metrics.timed(
            inner.attachments, AttachmentStore, "attachment_"
        )
        self.push: PushStore = metrics.timed(inner.push, PushStore, "push_")
        self.keys: KeyStore = metrics.timed(inner.keys, KeyStore, "keys_")

    async def open(self) -> None:
        await self._inner.open()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def ping(self) -> None:
        await self._inner.ping()


class TimedBus:
    """The Bus the node uses: the adapter's, with its publishes timed and their frames
    counted; subscriptions are the adapter's own."""

    def __init__(self, inner: Bus, metrics: Metrics) -> None:
        self._inner = inner
        self._timing = metrics.bus_publish
        self._frames = metrics.bus_frames

    async def publish(self, channel: str, frame: bytes) -> None:
        start = perf_counter()
        try:
            await self._inner.publish(channel, frame)
        finally:
            self._timing.observe(perf_counter() - start)
        self._frames.n += 1

    async def publish_many(
        self, items: list[tuple[str, bytes]], *, local_first: bool = False
    ) -> None:
        start = perf_counter()
        try:
            await self._inner.publish_many(items, local_first=local_first)
        finally:
            self._timing.observe(perf_counter() - start)
        self._frames.n += len(items)

    async def subscribe(self, channel: str, handler: BusHandler) -> Subscription:
        return await self._inner.subscribe(channel, handler)

    def on_recovered(self, callback: Callable[[Collection[str]], None]) -> None:
        self._inner.on_recovered(callback)

    async def open(self) -> None:
        await self._inner.open()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def ping(self) -> None:
        await self._inner.ping()


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format."""
    return await _exposition(request.app[METRICS])


async def _exposition(metrics: ProcessMetrics) -> web.Response:
    return web.Response(body=await metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(metrics: ProcessMetrics) -> web.Application:
    """An app serving only `GET /metrics` (a `pigeon push-worker`, which has no other HTTP):
    every other path is 404."""

    async def handler(request: web.Request) -> web.Response:
        return await _exposition(metrics)

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


_check_store: type[Store] = TimedStore
_check_bus: type[Bus] = TimedBus
