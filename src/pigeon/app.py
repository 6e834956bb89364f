"""Composition root: the only module that knows every adapter. Builds the aiohttp application
from `Settings`, opens adapters on start-up and closes them (in reverse) on shutdown."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from aiohttp import web
from argon2 import PasswordHasher

from pigeon.adapters.blobs.local import LocalBlobStore
from pigeon.adapters.bus.local import LocalBus
from pigeon.adapters.presence.local import LocalPresence
from pigeon.adapters.secret_files import load_or_create_secret
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.config import DynamoSettings, PostgresSettings, S3BlobSettings, Settings
from pigeon.domain.push import PushKind
from pigeon.gateway.blobs import add_blob_routes
from pigeon.gateway.http import READINESS, READY, Readiness, add_routes, error_middleware
from pigeon.gateway.hub import Hub, control_socket
from pigeon.gateway.keys import SERVICES, SETTINGS, Services
from pigeon.gateway.session import SessionServices
from pigeon.gateway.websocket import websocket_handler
from pigeon.metrics import (
    METRICS,
    Metrics,
    ProcessMetrics,
    TimedBus,
    TimedStore,
    metrics_handler,
)
from pigeon.ports import (
    BlobStore,
    Bus,
    Clock,
    Presence,
    PushQueue,
    PushSender,
    PushStore,
    RateLimiter,
    Store,
)
from pigeon.services.accounts import AccountService
from pigeon.services.chats import ChatService
from pigeon.services.clock import SystemClock
from pigeon.services.fanout import Fanout
from pigeon.services.keys import KeyService
from pigeon.services.media import MediaService
from pigeon.services.messaging import MessagingService
from pigeon.services.presence import PresenceService
from pigeon.services.push import PushPolicy, PushService, PushWorker, TargetRules
from pigeon.services.retention import RetentionSweeper
from pigeon.services.throttle import Throttle
from pigeon.services.typing import TypingService

if TYPE_CHECKING:
    from pigeon.adapters.push.rabbitmq import RabbitPushQueue
    from pigeon.adapters.store.dynamodb.recovery import RecoveryWorker

STORE = web.AppKey("store", Store)
BUS = web.AppKey("bus", Bus)
SWEEPER = web.AppKey("sweeper", RetentionSweeper)
PRESENCE = web.AppKey("presence", Presence)
BLOBS = web.AppKey("blobs", BlobStore)
FANOUT = web.AppKey("fanout", Fanout)
LIMITER = web.AppKey("limiter", RateLimiter)
#: The store's own cold-path workers (the DynamoDB store's recovery), run beside the sweeper.
STORE_WORKERS = web.AppKey("store_workers", list["RecoveryWorker"])


def build_store(settings: Settings, clock: Clock | None = None) -> Store:
    """The configured Store adapter (`clock`: the app's, for the stores that read time)."""
    s = settings.store
    if isinstance(s, DynamoSettings):
        return build_dynamo_store(s, settings, clock or SystemClock())
    if isinstance(s, PostgresSettings):
        from pigeon.adapters.store.postgres import PostgresStore

        return PostgresStore(
            s.dsn,
            min_connections=s.min_connections,
            max_connections=s.max_connections,
            command_timeout=s.command_timeout,
            batches_in_flight=s.batches_in_flight,
            max_batch=s.max_batch,
        )
    return SqliteStore(settings.sqlite_path(), synchronous=s.synchronous, max_batch=s.max_batch)


def build_dynamo_store(s: DynamoSettings, settings: Settings, clock: Clock) -> Store:
    """The DynamoDB store: credentials from botocore's chain, the retention as its TTL."""
    from pigeon.adapters.store.dynamodb import DynamoStore
    from pigeon.adapters.store.dynamodb.db import DynamoDb

    db = DynamoDb(
        table_prefix=s.table_prefix,
        endpoint_url=s.endpoint_url,
        region=s.region,
        create_tables=s.create_tables,
        max_attempts=s.max_attempts,
        backoff_base=s.backoff_base,
        backoff_cap=s.backoff_cap,
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        max_connections=s.max_connections,
    )
    retention_ms = int(settings.limits.retention_days * 86_400_000)
    return DynamoStore(db, clock=clock, retention_ms=retention_ms)


def build_store_workers(settings: Settings, store: Store, clock: Clock) -> list[RecoveryWorker]:
    """The cold-path workers the store needs besides the sweeper: on DynamoDB, the recovery
    of sends a crash interrupted (every node runs one; one at a time has the turn)."""
    s = settings.store
    if not isinstance(s, DynamoSettings):
        return []
    from pigeon.adapters.store.dynamodb import DynamoStore
    from pigeon.adapters.store.dynamodb.recovery import RecoveryWorker

    assert isinstance(store, DynamoStore)
    return [RecoveryWorker(store, clock, s.recovery_interval)]


def watch_store_capacity(settings: Settings, metrics: ProcessMetrics, store: Store) -> None:
    """Export what the store consumes of its engine, where it counts it (DynamoDB)."""
    if not isinstance(settings.store, DynamoSettings):  # aiobotocore only where it is used
        return
    from pigeon.adapters.store.dynamodb import DynamoStore

    if isinstance(store, DynamoStore):
        from pigeon.adapters.store.dynamodb.metrics import CapacityCollector

        metrics.registry.register(CapacityCollector(store.db.capacity, store.db.prefix))


def inbox_metrics_interval(settings: Settings) -> float:
    """How often the inbox gauges read the store: on DynamoDB a Scan of the whole inbox
    table, so its own setting (off by default) replaces `metrics.inbox_interval`."""
    s = settings.store
    if isinstance(s, DynamoSettings):
        return s.inbox_metrics_interval
    return settings.metrics.inbox_interval


def build_bus(settings: Settings) -> Bus:
    """The configured Bus adapter."""
    if settings.bus.type == "redis":
        from pigeon.adapters.bus.redis import RedisBus

        return RedisBus(settings.redis.url, cluster=settings.redis.cluster)
    return LocalBus()


def build_presence(settings: Settings, clock: Clock) -> Presence:
    """The configured presence registry."""
    if settings.presence.type == "redis":
        from pigeon.adapters.presence.redis import RedisPresence

        return RedisPresence(
            settings.redis.url,
            cluster=settings.redis.cluster,
            session_ttl=settings.presence.session_ttl,
            clock=clock,
        )
    return LocalPresence()


def build_blobs(settings: Settings, clock: Clock) -> BlobStore:
    """The configured blob store (media)."""
    b = settings.blobs
    if isinstance(b, S3BlobSettings):
        from pigeon.adapters.blobs.s3 import S3BlobStore

        return S3BlobStore(
            b.bucket,
            endpoint_url=b.endpoint_url,
            public_endpoint_url=b.public_endpoint_url,
            region=b.region,
            access_key=b.access_key,
            secret_key=b.secret_key.get_secret_value() if b.secret_key else None,
            retention_days=settings.limits.retention_days,
            prefix=b.prefix,
            trust_store_checksum=b.trust_store_checksum,
            manage_lifecycle=b.manage_lifecycle,
            addressing_style=b.addressing_style,
            clock=clock,
        )
    return LocalBlobStore(
        settings.blob_dir(),
        load_or_create_secret(settings.blob_secret_file()),
        b.base_url,
        clock=clock,
        cdn_cacheable=b.cdn_cacheable,
        fsync=b.fsync,
    )


def build_rate_limiter(settings: Settings) -> RateLimiter:
    """Counters in this process, or in Redis when every node must share them."""
    from pigeon.adapters.ratelimit.windows import WindowRateLimiter

    kind = settings.rate_limits.type or ("redis" if settings.bus.type == "redis" else "local")
    if kind == "redis":
        return WindowRateLimiter(
            settings.redis.url,
            cluster=settings.redis.cluster,
            sync_interval=settings.rate_limits.sync_interval,
        )
    return WindowRateLimiter()


class PushParts(NamedTuple):
    """What push is made of on this node: the queue (None: the store has none yet), one sender
    per configured platform, and the VAPID public key to publish."""

    queue: PushQueue | None
    senders: dict[PushKind, PushSender]
    vapid_public_key: str | None


PUSH = web.AppKey("push", PushParts)
#: The node's push worker (none when the store has no queue), for tests and the bench.
PUSH_WORKER = web.AppKey("push_worker", list[PushWorker])


def build_push_queue(settings: Settings, store: Store) -> PushQueue | None:
    """The push queue: the store's outbox table, leased by the workers (on PostgreSQL by every
    node's, with SKIP LOCKED), or with `push.queue = "rabbitmq"` a RabbitMQ work queue fed from
    that table by a relay (started with the worker: `start_push_worker`); none when push is
    off."""
    if not settings.push.enabled:
        return None
    outbox: PushQueue | None = None
    if isinstance(store, SqliteStore):
        from pigeon.adapters.store.sqlite.push import SqlitePushQueue

        outbox = SqlitePushQueue(store.db)
    elif isinstance(settings.store, DynamoSettings):
        from pigeon.adapters.store.dynamodb import DynamoStore
        from pigeon.adapters.store.dynamodb.push import DynamoPushQueue

        if isinstance(store, DynamoStore):
            outbox = DynamoPushQueue(store.db)
    else:
        from pigeon.adapters.store.postgres import PostgresStore

        if isinstance(store, PostgresStore):
            from pigeon.adapters.store.postgres.push import PgPushQueue

            outbox = PgPushQueue(store.db)
    p = settings.push
    if outbox is None or p.queue != "rabbitmq":
        return outbox
    from pigeon.adapters.push.rabbitmq import RabbitPushQueue

    return RabbitPushQueue(
        outbox,
        p.rabbitmq_url,
        p.rabbitmq_prefix,
        relay_lease=p.relay_lease,
        prefetch=p.concurrency,
        poll_interval=p.poll_interval,
    )


async def start_push_worker(
    settings: Settings,
    push: PushParts,
    store: PushStore,
    clock: Clock,
    *,
    metrics: ProcessMetrics | None = None,
    connect: bool = False,
) -> PushWorker:
    """Run a push worker on `push.queue` (whose senders are open), and, for a RabbitMQ queue,
    its relay and consumer (`connect`: reach RabbitMQ now, or raise; else in the background)."""
    assert push.queue is not None
    queue = push.queue
    worker = PushWorker(
        queue if metrics is None else metrics.timed(queue, PushQueue, "push_queue_"),
        store if metrics is None else metrics.timed(store, PushStore, "push_"),
        push.senders,
        clock,
        push_policy(settings),
    )
    if metrics is not None:
        worker.observe(metrics.push_outcome)
    rabbit = _rabbit(settings, queue)
    if rabbit is not None:
        await rabbit.start(clock, connect=connect)
    try:
        await worker.start()
    except BaseException:
        if rabbit is not None:
            await rabbit.aclose()
        raise
    return worker


async def stop_push_worker(settings: Settings, push: PushParts, worker: PushWorker) -> None:
    """Stop the worker (pushes in flight get a moment), then its queue's relay and consumer."""
    await worker.aclose()
    rabbit = _rabbit(settings, push.queue)
    if rabbit is not None:
        await rabbit.aclose()


def _rabbit(settings: Settings, queue: PushQueue | None) -> RabbitPushQueue | None:
    if settings.push.queue != "rabbitmq":  # aio-pika is imported only where it is used
        return None
    from pigeon.adapters.push.rabbitmq import RabbitPushQueue

    return queue if isinstance(queue, RabbitPushQueue) else None


def build_push(settings: Settings, store: Store) -> PushParts:
    """The push queue of the store and the senders whose credentials are configured."""
    p = settings.push
    queue = build_push_queue(settings, store)
    if queue is None:
        return PushParts(None, {}, None)
    from pigeon.adapters.push.webhook import WebhookSender
    from pigeon.adapters.push.webpush import (
        WebPushSender,
        load_or_create_vapid_key,
        vapid_public_key,
    )

    vapid = load_or_create_vapid_key(settings.vapid_key_file())
    senders: dict[PushKind, PushSender] = {
        # webhooks go only to hosts the operator listed (a gateway on their own network, often)
        "webhook": WebhookSender(
            load_or_create_secret(settings.webhook_secret_file()), timeout=p.gateway_timeout
        ),
        # Web Push endpoints are any host a device names: their names must resolve publicly
        "webpush": WebPushSender(
            vapid,
            p.webpush.subject,
            timeout=p.gateway_timeout,
            public_only=not p.allow_private_targets,
        ),
    }
    if p.fcm.credentials_file is not None:
        from pigeon.adapters.push.fcm import FcmSender

        account = msgspec.json.decode(p.fcm.credentials_file.read_bytes())
        senders["fcm"] = FcmSender(
            account, base_url=p.fcm.base_url, token_url=p.fcm.token_url, timeout=p.gateway_timeout
        )
    a = p.apns
    if a.key_file is not None and a.team_id and a.key_id:
        from pigeon.adapters.push.apns import ApnsSender

        senders["apns"] = ApnsSender(
            a.team_id,
            a.key_id,
            a.key_file.read_bytes(),
            production_url=a.production_url,
            sandbox_url=a.sandbox_url,
            timeout=p.gateway_timeout,
        )
    return PushParts(queue, senders, vapid_public_key(vapid))


def push_policy(settings: Settings) -> PushPolicy:
    """The worker's timing, from `settings.push`."""
    names = {f.name for f in dataclasses.fields(PushPolicy)}
    return PushPolicy(**settings.push.model_dump(include=names))


def runner_options(settings: Settings) -> dict[str, Any]:
    """What the aiohttp runner of the app must be given, wherever it runs (`pigeon serve`, the
    tests): the keep-alive timeout also bounds a half-sent request (slowloris)."""
    return {"keepalive_timeout": settings.gateway.request_timeout}


def create_app(
    settings: Settings, clock: Clock | None = None, *, span_exporter: Any = None
) -> web.Application:
    """Wire services to adapters; nothing is opened until the app starts."""
    clock = clock or SystemClock()
    limits = settings.limits.to_limits()
    metrics = Metrics()
    adapter = build_store(settings, clock)
    watch_store_capacity(settings, metrics, adapter)
    # the services see the store and the bus through timing wrappers (metrics.py)
    store: Store = TimedStore(adapter, metrics)
    # the inboxes' gauges read through the timing (op `inbox_depth`), never traced: a root
    # span every few seconds would say nothing
    metrics.watch_inbox(store.chats.inbox_depth, clock, inbox_metrics_interval(settings))
    bus: Bus = TimedBus(build_bus(settings), metrics)
    tracer = None
    if settings.tracing.enabled:  # spans around commands, store calls and publishes
        from pigeon.tracing import CommandTracer, TracedBus, TracedStore, make_tracer

        otel = make_tracer(settings.tracing, span_exporter)
        store, bus, tracer = TracedStore(store, otel), TracedBus(bus, otel), CommandTracer(otel)
    presence = build_presence(settings, clock)
    blobs = build_blobs(settings, clock)
    media = MediaService(store, blobs, clock, settings.media, limits.retention_seconds)
    fanout = Fanout(bus, on_delivered=metrics.send_delivery.observe)
    limiter = build_rate_limiter(settings)
    throttle = (
        Throttle(limiter, settings.rate_limits.to_rules()) if settings.rate_limits.enabled else None
    )
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib, parallelism=1
    )
    push = build_push(settings, adapter)
    metrics.watch_push_queue(push.queue, clock)
    rules = TargetRules(
        kinds=frozenset(push.senders),
        webhook_hosts=frozenset(h.lower() for h in settings.push.webhook_hosts),
        allow_private=settings.push.allow_private_targets,
    )
    push_service = PushService(store.push, clock, rules)
    chats = ChatService(store, fanout, clock, limits, throttle)
    key_limits = settings.e2e.to_limits()
    messaging = MessagingService(
        store.messages, fanout, clock, limits, media, throttle, store.chats, key_limits
    )
    keys = KeyService(store.keys, store.chats, fanout, clock, key_limits, throttle)
    presence_service = PresenceService(
        presence,
        store,
        bus,
        clock,
        grace=settings.presence.grace,
        max_subscriptions=settings.presence.max_subscriptions,
        session_ttl=settings.presence.session_ttl,
        throttle=throttle,
    )
    typing = TypingService(
        store.chats,
        bus,
        ttl=settings.presence.typing_ttl,
        min_interval=settings.presence.typing_min_interval,
        throttle=throttle,
    )
    services = Services(
        accounts=AccountService(
            store.accounts, bus, clock, limits, hasher, throttle, settings.registration, keys
        ),
        chats=chats,
        messaging=messaging,
        presence=presence_service,
        typing=typing,
        hub=Hub(bus, settings.gateway, control_socket(settings)),
        clock=clock,
        sessions=SessionServices(
            chats=chats,
            messaging=messaging,
            presence=presence_service,
            typing=typing,
            media=media,
            push=push_service,
            keys=keys,
            max_frame_bytes=settings.gateway.max_frame_bytes,
            max_inflight=settings.gateway.max_inflight_commands,
            max_refusals=settings.gateway.max_refusals,
            metrics=metrics,
            tracer=tracer,
        ),
        push=push_service,
        vapid_public_key=push.vapid_public_key,
    )
    app = web.Application(middlewares=[error_middleware], client_max_size=1024 * 1024)
    app[SETTINGS] = settings
    app[SERVICES] = services
    app[STORE] = adapter
    app[BUS] = bus
    app[METRICS] = metrics
    app[PRESENCE] = presence
    probes = {"store": store.ping, "bus": bus.ping, "presence": presence.ping}
    app[READINESS] = Readiness(probes, settings.gateway.readiness_timeout)
    app[BLOBS] = blobs
    app[FANOUT] = fanout
    app[LIMITER] = limiter
    app[SWEEPER] = RetentionSweeper(
        store.messages, clock, limits.retention_seconds, settings.sweep_interval, media
    )
    app[STORE_WORKERS] = build_store_workers(settings, adapter, clock)
    app[PUSH] = push
    app[READY] = {"ready": False}
    add_routes(app)
    if isinstance(blobs, LocalBlobStore):  # its signed URLs point at pigeon's own HTTP
        add_blob_routes(app, blobs, metrics)
    app.router.add_get("/v1/ws", websocket_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_connections)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    store, bus, sweeper = app[STORE], app[BUS], app[SWEEPER]
    await store.open()
    await app[BLOBS].open()
    await bus.open()
    await app[PRESENCE].open()
    await app[LIMITER].open()
    metrics = app[METRICS]
    await metrics.start()
    app[SERVICES].hub.start()
    app[SERVICES].presence.start()
    sweeper.start()
    for store_worker in app[STORE_WORKERS]:
        store_worker.start()
    push, settings = app[PUSH], app[SETTINGS]
    worker = None
    if push.queue is not None:
        for sender in push.senders.values():
            await sender.open()
        if settings.push.serve_runs_worker:  # else `pigeon push-worker` processes push
            clock = app[SERVICES].clock
            worker = await start_push_worker(settings, push, store.push, clock, metrics=metrics)
    app[PUSH_WORKER] = [] if worker is None else [worker]
    app[READY]["ready"] = True
    try:
        yield
    finally:
        app[READY]["ready"] = False
        await metrics.inbox.aclose()  # it reads the store: stopped before the store closes
        if worker is not None:
            await stop_push_worker(settings, push, worker)
        for sender in push.senders.values():
            await sender.aclose()
        await sweeper.aclose()
        for store_worker in app[STORE_WORKERS]:
            await store_worker.aclose()
        await app[SERVICES].hub.aclose()
        await app[SERVICES].presence.aclose()
        app[SERVICES].accounts.close()
        await app[FANOUT].aclose()
        await app[PRESENCE].aclose()
        await app[LIMITER].aclose()
        await bus.aclose()
        await app[BLOBS].aclose()
        await store.aclose()
        await metrics.aclose()


async def _close_connections(app: web.Application) -> None:
    """On SIGTERM: stop reporting ready and tell every client to reconnect elsewhere (1001)."""
    app[READY]["ready"] = False
    await app[SERVICES].hub.aclose()
