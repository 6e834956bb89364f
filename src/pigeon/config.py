"""One settings object for the whole server, from PIGEON_* env vars and an optional TOML file.

Nested settings use `__` in env vars, e.g. `PIGEON_STORE__PATH`, `PIGEON_LIMITS__GROUP_CAP`.
Components receive their own section, never `os.environ`.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from pigeon.domain.keys import KeyLimits
from pigeon.domain.limits import Limits, Rate, RateRules


class Section(BaseModel):
    """A settings section: a key it does not know is an error (a typo such as `groupcap` must
    not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class SqliteSettings(Section):
    """The embedded store: one SQLite file (default `<data_dir>/pigeon.db`)."""

    type: Literal["sqlite"] = "sqlite"
    path: Path | None = None
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    #: Jobs per group commit at most. Under a backlog a wider commit writes each hot page once
    #: for more messages (with 2,000 and 20,000 sends in flight, 4096 delivered 1.2-1.6x and
    #: 1.35x the messages a second of the former 512).
    max_batch: int = Field(4096, ge=1, le=10_000)


class PostgresSettings(Section):
    """The shared store of a cluster: PostgreSQL through an asyncpg connection pool per node."""

    type: Literal["postgres"] = "postgres"
    dsn: str = "postgresql://postgres@127.0.0.1:5432/pigeon"
    min_connections: int = Field(2, ge=1, le=1000)
    max_connections: int = Field(16, ge=1, le=1000)
    #: Seconds a statement, or the wait for a pooled connection, may take before the command
    #: fails with `unavailable` (temporary): a hung database must not hold clients for long.
    command_timeout: float = Field(5.0, gt=0, le=300)
    #: Group commit: transactions of sends (and, apart, of acks) a node runs at once; the calls
    #: that arrive meanwhile wait and go together in the next one (up to `max_batch`). Fewer
    #: means wider batches: less PostgreSQL CPU per message (and, where each commit waits for
    #: its WAL flush, less latency too: operations.md, "Tuning").
    batches_in_flight: int = Field(1, ge=1, le=64)
    max_batch: int = Field(256, ge=1, le=1000)

    @model_validator(mode="after")
    def _pool_ordered(self) -> PostgresSettings:
        if self.max_connections < self.min_connections:
            raise ValueError("store.max_connections must be >= store.min_connections")
        return self


class DynamoSettings(Section):
    """The store on DynamoDB (or a server that speaks its API: ScyllaDB's Alternator, moto),
    through aiobotocore. Credentials come from the usual AWS chain (environment, shared files,
    container or instance role), never from here.

    For a cluster whose store must scale out beyond one PostgreSQL server: every node talks
    to the same tables (docs/operations.md, "DynamoDB"; the design in docs/architecture.md,
    "DynamoDB store")."""

    type: Literal["dynamodb"] = "dynamodb"
    #: None: AWS's endpoint for `region`. Else e.g. `http://alternator:8000`.
    endpoint_url: str | None = None
    region: str = "us-east-1"
    #: Prepended to every table's name (`pigeon_messages`...): several deployments per account.
    table_prefix: str = Field("pigeon_", pattern=r"^[A-Za-z0-9_.-]{0,200}$")
    #: Create missing tables and indexes (on-demand billing) and enable TTL at start-up.
    #: Off: the tables must exist (made by infrastructure code), and pigeon checks them.
    create_tables: bool = False
    #: Attempts of a throttled call before it fails with `unavailable` (exponential backoff
    #: with full jitter between them, from `backoff_base` seconds, at most `backoff_cap`).
    max_attempts: int = Field(8, ge=1, le=50)
    backoff_base: float = Field(0.025, gt=0, le=10)
    backoff_cap: float = Field(1.0, gt=0, le=60)
    #: Seconds to connect, and to wait for one answer, before the attempt counts as failed.
    connect_timeout: float = Field(2.0, gt=0, le=60)
    read_timeout: float = Field(5.0, gt=0, le=300)
    #: HTTP connections per node (a group message's fan-out runs many calls at once).
    max_connections: int = Field(64, ge=1, le=10_000)
    #: Seconds between two passes of the recovery worker, which finishes sends that a crash
    #: left half-done and nobody else finished (it reads the records written since the
    #: previous pass). Every node runs one; one at a time has the turn.
    recovery_interval: float = Field(30.0, gt=0, le=86400)
    #: Replaces `metrics.inbox_interval` on this store: the `pigeon_inbox_*` gauges count the
    #: inboxes with a Scan of the whole inbox table (capacity in proportion to its size), so
    #: they are off (0) unless set.
    inbox_metrics_interval: float = Field(0.0, ge=0, le=86400)


def _type_or(default: str) -> Callable[[Any], str]:
    """A discriminator: a section's `type` picks its settings class; without one, `default`
    (the embedded engine), so `[store]` with only `path` still means SQLite."""

    def discriminate(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("type", default))
        return str(getattr(value, "type", default))

    return discriminate


StoreSettings = Annotated[
    Annotated[SqliteSettings, Tag("sqlite")]
    | Annotated[PostgresSettings, Tag("postgres")]
    | Annotated[DynamoSettings, Tag("dynamodb")],
    Discriminator(_type_or("sqlite")),
]


class LocalBlobSettings(Section):
    """Media on this machine's disk, served by pigeon's own HTTP through HMAC-signed URLs."""

    type: Literal["local"] = "local"
    #: Default `<data_dir>/blobs`. Every node serving it must see the same directory.
    path: Path | None = None
    #: The URL-signing secret (created on first start); default `<data_dir>/blob-secret`.
    secret_file: Path | None = None
    #: Public base URL of pigeon for signed URLs; None gives relative `/v1/blobs/...` URLs.
    base_url: str | None = None
    #: Let shared caches (a CDN in front) keep downloads (`public`) rather than `private`.
    cdn_cacheable: bool = False
    fsync: bool = True


class S3BlobSettings(Section):
    """Media in an S3 bucket (or an S3-compatible store), moved with S3 pre-signed URLs."""

    type: Literal["s3"] = "s3"
    bucket: str = "pigeon-media"
    endpoint_url: str | None = None
    #: The endpoint clients reach, when it differs from the one pigeon talks to.
    public_endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    #: None: the usual AWS credential chain (env, profile, instance role).
    secret_key: SecretStr | None = None
    prefix: str = ""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    #: Trust the checksum S3 verified on upload instead of reading the object back.
    trust_store_checksum: bool = True
    #: Keep a lifecycle rule expiring objects after the retention.
    manage_lifecycle: bool = True


BlobSettings = Annotated[
    Annotated[LocalBlobSettings, Tag("local")] | Annotated[S3BlobSettings, Tag("s3")],
    Discriminator(_type_or("local")),
]

#: Content types accepted by default (shell-style patterns).
DEFAULT_MEDIA_TYPES = [
    "image/*",
    "video/*",
    "audio/*",
    "text/plain",
    "application/pdf",
    "application/zip",
    "application/octet-stream",
    "application/msword",
    "application/vnd.openxmlformats-officedocument.*",
    "application/vnd.oasis.opendocument.*",
]


class MediaSettings(Section):
    """Attachments: what may be uploaded, how big, how often, and how URLs and thumbnails work."""

    upload_url_ttl: float = Field(900.0, gt=0, le=7 * 86400)
    download_url_ttl: float = Field(3600.0, gt=0, le=7 * 86400)
    #: Accepted content types (shell-style patterns, matched on the type without parameters).
    allowed_types: list[str] = Field(default_factory=lambda: list(DEFAULT_MEDIA_TYPES))
    #: Size limit by content type pattern; the most specific match wins ("*" is the fallback).
    max_bytes: dict[str, int] = Field(
        default_factory=lambda: {"image/*": 16 * 1024 * 1024, "*": 100 * 1024 * 1024}
    )
    #: Attachments one user may create per hour (seed 002 suggests 50).
    uploads_per_hour: int = Field(50, ge=1)
    thumbnail_max_side: int = Field(320, ge=16, le=2048)
    thumbnail_format: Literal["jpeg", "webp"] = "jpeg"
    thumbnail_max_pixels: int = Field(50_000_000, ge=1)
    #: Larger sources get no thumbnail (decoding them would be slow).
    thumbnail_max_source_bytes: int = Field(64 * 1024 * 1024, ge=1)
    #: Attachments never sent in any chat are deleted after this many seconds.
    unreferenced_after: float = Field(86400.0, gt=0)

    def limit_for(self, content_type: str) -> int:
        """The size limit of `content_type`: the longest matching pattern wins."""
        base = content_type.split(";", 1)[0].strip().lower()
        matches = [p for p in self.max_bytes if fnmatch.fnmatchcase(base, p)]
        if not matches:
            return 0
        return self.max_bytes[max(matches, key=len)]

    def allows(self, content_type: str) -> bool:
        base = content_type.split(";", 1)[0].strip().lower()
        return any(fnmatch.fnmatchcase(base, p) for p in self.allowed_types)


class BusSettings(Section):
    """Routing between nodes: `local` (in-process, one node only) or `redis` (see `redis`)."""

    type: Literal["local", "redis"] = "local"


class RedisSettings(Section):
    """The Redis behind a `redis` bus or presence registry: one server, or a Redis Cluster
    (`cluster = true`, `url` names any node; the bus then uses sharded pub/sub)."""

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False


class LimitSettings(Section):
    """Product limits (see `pigeon.domain.limits.Limits`)."""

    max_devices_per_user: int = Field(3, ge=1, le=100)
    group_cap: int = Field(100, ge=2, le=10_000)
    max_chats_per_user: int = Field(10_000, ge=1, le=10_000_000)
    max_body_bytes: int = Field(64 * 1024, ge=1, le=16 * 1024 * 1024)
    max_group_name_chars: int = Field(128, ge=1, le=1024)
    preview_chars: int = Field(100, ge=0, le=1000)
    retention_days: float = Field(30.0, gt=0)
    sync_page: int = Field(500, ge=1, le=10_000)
    sync_page_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    def to_limits(self) -> Limits:
        return Limits(
            max_devices_per_user=self.max_devices_per_user,
            group_cap=self.group_cap,
            max_chats_per_user=self.max_chats_per_user,
            max_body_bytes=self.max_body_bytes,
            max_group_name_chars=self.max_group_name_chars,
            preview_chars=self.preview_chars,
            retention_seconds=self.retention_days * 86400,
            sync_page=self.sync_page,
            sync_page_bytes=self.sync_page_bytes,
        )


class E2ESettings(Section):
    """End-to-end encryption: what a device may publish and send (`pigeon.domain.keys.
    KeyLimits`). The server checks shapes and sizes only; it never holds a private key."""

    max_one_time_keys: int = Field(100, ge=1, le=10_000)
    #: Decoded bytes of a public key (Curve25519, Ed25519: 32).
    key_bytes: int = Field(32, ge=16, le=4096)
    #: Decoded bytes of a signature (Ed25519: 64).
    signature_bytes: int = Field(64, ge=16, le=8192)
    max_bundle_bytes: int = Field(4096, ge=256, le=1024 * 1024)
    max_to_device_bytes: int = Field(64 * 1024, ge=1024, le=1024 * 1024)
    max_ciphertext_bytes: int = Field(96 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_targets: int = Field(1000, ge=1, le=100_000)

    def to_limits(self) -> KeyLimits:
        return KeyLimits(**self.model_dump())


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?\s*$")
_UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600}
_UNIT_SECONDS |= {"hour": 3600, "d": 86400, "day": 86400}


def parse_rate(text: str) -> Rate:
    """`"300/10s"`, `"30/minute"`, `"5/hour"`: an amount per (a number of) seconds, minutes,
    hours or days."""
    match = _RATE.match(text.lower())
    if match is None or match.group(3) not in _UNIT_SECONDS:
        raise ValueError(f"{text!r} is not a rate such as 300/10s, 30/minute or 5/hour")
    amount, count, unit = match.groups()
    seconds = int(count or 1) * _UNIT_SECONDS[unit]
    if int(amount) < 1 or seconds < 1:
        raise ValueError(f"{text!r}: the amount and the period must be positive")
    return Rate(int(amount), seconds)


class RateLimitSettings(Section):
    """Abuse limits (`pigeon.domain.limits.RateRules`): "<amount>/<period>" per sliding window;
    amounts of `*_bytes_*` rules are bytes."""

    enabled: bool = True
    #: Where the counters live: `local` (this process) or `redis` (shared by every node).
    #: Unset: `redis` when the bus is Redis (a cluster), else `local`.
    type: Literal["local", "redis"] | None = None
    #: With `redis`: seconds between a node's syncs of the message path's counters (sends,
    #: a chat's fan-out, typing), which it decides on its own view and shares after; other
    #: nodes' spends reach it this late (architecture.md, "Abuse limits").
    sync_interval: float = Field(default=0.1, gt=0, le=10)
    send_per_device: str = "300/10s"
    send_per_user: str = "600/10s"
    send_bytes_per_device: str = f"{4 * 1024 * 1024}/10s"
    fanout_per_chat: str = "500/second"
    create_chat_per_user: str = "30/minute"
    groups_per_user: str = "50/hour"
    modify_members_per_user: str = "60/minute"
    typing_per_device: str = "20/10s"
    presence_subscribe_per_device: str = "30/minute"
    sync_per_device: str = "30/minute"
    key_uploads_per_device: str = "60/minute"
    key_queries_per_device: str = "120/minute"
    #: Claimed keys (one per device asked for): keep it above group_cap x max_devices_per_user
    #: (a full group's claim), and per user that times the devices a user has.
    key_claims_per_device: str = "400/minute"
    key_claims_per_user: str = "1000/minute"
    #: Keys of one device one user may take: keep it at least max_devices_per_user.
    key_claims_per_target: str = "10/hour"
    register_per_address: str = "20/hour"
    login_per_address: str = "60/minute"
    login_per_username: str = "5/minute"
    login_per_username_hourly: str = "20/hour"
    login_per_username_daily: str = "50/day"

    @model_validator(mode="after")
    def _rates_parse(self) -> RateLimitSettings:
        self.to_rules()
        return self

    def to_rules(self) -> RateRules:
        names = RateRules.__struct_fields__
        return RateRules(**{name: parse_rate(getattr(self, name)) for name in names})


class GatewaySettings(Section):
    """WebSocket connection behaviour."""

    ping_interval: float = Field(30.0, gt=0)
    idle_timeout: float = Field(60.0, gt=0)
    outbound_queue_frames: int = Field(2048, ge=16)
    #: Bytes queued for one connection at most (replies, pushes and the inbox sync); above it
    #: the device is disconnected as too slow (4000). The sync waits at half of it.
    outbound_queue_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    #: A connection whose queued frames make no progress for this long is closed (4000), even
    #: if it keeps sending pings: its peer stopped reading.
    stall_timeout: float = Field(30.0, gt=0)
    #: Seconds a client may take to send a whole HTTP request line and headers (and to stay
    #: idle between keep-alive requests), and a REST body: half-sent requests (slowloris) are
    #: closed after it.
    request_timeout: float = Field(10.0, gt=0)
    #: `rate_limited` replies a connection may get in 10 s; past that it is closed with 4003
    #: (its client ignores the limits, and every refusal still costs the server).
    max_refusals: int = Field(50, ge=1)
    #: A REST request refused as `rate_limited` gets its 429 after this many seconds (at most
    #: its Retry-After): a script that hammers a limit (password guessing) then costs a coroutine
    #: asleep instead of a request's handling per round trip. 0 answers at once.
    refusal_delay: float = Field(1.0, ge=0, le=60)
    #: Concurrent WebSockets per client address (0: no cap). Set it where clients connect
    #: directly; behind a TCP load balancer every client has the balancer's address.
    max_connections_per_address: int = Field(0, ge=0)
    max_inflight_commands: int = Field(256, ge=1)
    #: Frames above this get a `too_large` error; the connection lives on.
    max_frame_bytes: int = Field(1024 * 1024, ge=1024)
    #: Frames above this close the connection (1009): the server will not buffer them.
    hard_frame_limit: int = Field(4 * 1024 * 1024, ge=1024)
    auth_timeout: float = Field(10.0, gt=0)
    #: Listen backlog: connection bursts (a node restart) queue here instead of being refused.
    backlog: int = Field(2048, ge=16)
    #: Share the listening port with other processes (SO_REUSEPORT); set by `--workers`.
    reuse_port: bool = False
    #: How long `/readyz` waits for the store, the bus and the presence registry to answer
    #: their probes (concurrently) before it reports the silent ones as failed (503).
    readiness_timeout: float = Field(1.0, gt=0, le=30)
    #: How long a closing handshake may wait for the peer's close frame.
    close_timeout: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _frame_limits_ordered(self) -> GatewaySettings:
        if self.hard_frame_limit < self.max_frame_bytes:
            raise ValueError("gateway.hard_frame_limit must be >= gateway.max_frame_bytes")
        return self


class PresenceSettings(Section):
    """Presence and typing behaviour."""

    #: Where sessions live: `local` (this process) or `redis` (shared by every node).
    type: Literal["local", "redis"] = "local"
    #: A session not refreshed by its node's heartbeat for this long is dropped (its node died);
    #: only registries that share state between nodes (redis) expire sessions.
    session_ttl: float = Field(30.0, gt=0)
    #: A user whose last connection dropped is announced offline only after this many seconds.
    grace: float = Field(5.0, ge=0)
    max_subscriptions: int = Field(1000, ge=1)
    typing_ttl: float = Field(6.0, gt=0)
    typing_min_interval: float = Field(2.0, ge=0)

    @model_validator(mode="after")
    def _ttl_covers_grace(self) -> PresenceSettings:
        # A user whose node dies within the grace period is confirmed offline by another
        # node a session TTL later: a TTL shorter than the grace would cut the grace short.
        if self.session_ttl < self.grace:
            raise ValueError("presence.session_ttl must be >= presence.grace")
        return self


class FcmSettings(Section):
    """Firebase Cloud Messaging (HTTP v1): on when a service-account key file is given."""

    credentials_file: Path | None = None
    base_url: str = "https://fcm.googleapis.com"
    #: Default: the key file's own `token_uri`.
    token_url: str | None = None


class ApnsSettings(Section):
    """Apple Push Notification service, token-based: on when a `.p8` key file is given."""

    team_id: str | None = None
    key_id: str | None = None
    key_file: Path | None = None
    production_url: str = "https://api.push.apple.com"
    sandbox_url: str = "https://api.sandbox.push.apple.com"


class WebPushSettings(Section):
    """Web Push (RFC 8030/8291/8292): always on; the VAPID key is made on first start."""

    #: Default: `<data_dir>/vapid.pem`. Its public half is served at `/v1/push/vapid-key`.
    vapid_key_file: Path | None = None
    #: The contact push services may use (RFC 8292): a mailto: or https: URL.
    subject: str = "mailto:admin@localhost"


class PushSettings(Section):
    """Push notifications to devices with no live connection (docs/operations.md, "Push")."""

    enabled: bool = True
    #: A job is pushed once it has waited this long: a connected device acks within it.
    grace: float = Field(0.5, ge=0, le=60)
    #: At most one push per device and chat per window; a burst in it is one push with a count.
    window: float = Field(30.0, ge=0, le=86400)
    #: Leased jobs come back after this, should their worker die mid-job.
    visibility_timeout: float = Field(60.0, gt=0)
    #: Attempts before a job goes to the dead letters (`pigeon push dlq`).
    max_attempts: int = Field(8, ge=1, le=100)
    #: Backoff between attempts: a random point in [c/2, c], c = base * 2^(attempt-1), capped.
    backoff_base: float = Field(1.0, gt=0)
    backoff_max: float = Field(3600.0, gt=0)
    #: Pushes in flight per worker.
    concurrency: int = Field(32, ge=1, le=10_000)
    #: How often an idle worker looks for due jobs.
    poll_interval: float = Field(0.25, gt=0, le=60)
    #: Seconds a gateway may take to answer one push.
    gateway_timeout: float = Field(10.0, gt=0)
    #: Webhook targets' HMAC key; default `<data_dir>/push-webhook-secret` (made if missing).
    webhook_secret_file: Path | None = None
    #: Hosts a webhook target may name (the operator's own gateways); empty: no webhooks. A
    #: device names the URL, so without this list it could make the server POST anywhere.
    webhook_hosts: list[str] = []
    #: Accept webhook and Web Push URLs on loopback or private addresses (tests, a LAN).
    allow_private_targets: bool = False
    fcm: FcmSettings = FcmSettings()
    apns: ApnsSettings = ApnsSettings()
    webpush: WebPushSettings = WebPushSettings()
    #: What the workers take jobs from: `store` (the outbox table itself: one node, or a few on
    #: PostgreSQL) or `rabbitmq` (a relay moves due jobs from the outbox to a RabbitMQ quorum
    #: queue; for clusters: docs/architecture.md, "Push").
    queue: Literal["store", "rabbitmq"] = "store"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: Names of the queues: `<prefix>` (the work queue), `<prefix>.delay.<N>s` (retries).
    rabbitmq_prefix: str = Field("pigeon.push", min_length=1, max_length=200)
    #: With `rabbitmq`: how long a job handed to RabbitMQ stays leased in the outbox before a
    #: relay hands it over again (the safety net, should RabbitMQ lose it): above the longest
    #: wait in the work queue plus `visibility_timeout`. Retries extend it by their delay.
    relay_lease: float = Field(600.0, gt=0)
    #: `pigeon serve` runs a worker (and, with `rabbitmq`, a relay); a cluster with dedicated
    #: `pigeon push-worker` processes may turn it off.
    serve_runs_worker: bool = True

    @model_validator(mode="after")
    def _lease_outlives_a_send(self) -> PushSettings:
        # A send that outlasts its job's lease lets another worker push the job again. FCM may
        # fetch a token and then send: two gateway timeouts.
        if self.visibility_timeout <= 2 * self.gateway_timeout:
            raise ValueError("push.visibility_timeout must be > 2 * push.gateway_timeout")
        if self.queue == "rabbitmq":
            # a job's lease in the outbox must outlive its push, as a worker's lease does
            if self.relay_lease <= self.visibility_timeout:
                raise ValueError("push.relay_lease must be > push.visibility_timeout")
            if not self.rabbitmq_url.startswith(("amqp://", "amqps://")):
                raise ValueError("push.rabbitmq_url must be an amqp:// or amqps:// URL")
            if not re.fullmatch(r"[A-Za-z0-9_.:-]+", self.rabbitmq_prefix) or (
                self.rabbitmq_prefix.startswith("amq.")
            ):
                raise ValueError(
                    "push.rabbitmq_prefix: letters, digits and _ . : - only, not starting amq."
                )
        return self


class TracingSettings(Section):
    """OpenTelemetry traces of WebSocket commands down to store and bus calls (`tracing.py`);
    needs the `tracing` extra. Off: nothing is wrapped, nothing costs."""

    enabled: bool = False
    #: An OTLP/HTTP traces endpoint (an OpenTelemetry collector, Jaeger, Tempo).
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "pigeon"
    #: The share of commands traced (a trace is decided at its command: all of it or nothing).
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)


class MetricsSettings(Section):
    """Prometheus metrics (`GET /metrics`; docs/operations.md, "Metrics")."""

    #: Seconds between two readings of the inboxes' depth and oldest entry from the store (the
    #: `pigeon_inbox_*` gauges), by every `pigeon serve` process; each counts the waiting
    #: entries. 0: never read (no such gauges).
    inbox_interval: float = Field(15.0, ge=0, le=86400)
    #: `pigeon push-worker`: serve `GET /metrics` on this `host:port` (port 0: any free one,
    #: logged). Unset: the worker opens no port.
    push_worker_address: str | None = None

    @field_validator("push_worker_address")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is not None:
            split_address(value)  # a ValueError says what is wrong
        return value


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`; an empty host: every interface) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
        raise ValueError(f"{address!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


class Settings(BaseSettings):
    """Everything `pigeon serve` needs."""

    model_config = SettingsConfigDict(env_prefix="PIGEON_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    data_dir: Path = Path("./var")
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
    ] = "INFO"
    log_json: bool = True
    #: One line per REST request on the `pigeon.access` logger (method, path, status, bytes, ms).
    log_access: bool = True
    store: StoreSettings = SqliteSettings()
    bus: BusSettings = BusSettings()
    redis: RedisSettings = RedisSettings()
    blobs: BlobSettings = LocalBlobSettings()
    media: MediaSettings = MediaSettings()
    limits: LimitSettings = LimitSettings()
    e2e: E2ESettings = E2ESettings()
    gateway: GatewaySettings = GatewaySettings()
    presence: PresenceSettings = PresenceSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    push: PushSettings = PushSettings()
    tracing: TracingSettings = TracingSettings()
    metrics: MetricsSettings = MetricsSettings()
    #: Who may create an account: `open` (anyone), `invite` (with a single-use code made by
    #: `pigeon invite`), `closed` (nobody; existing accounts keep working).
    registration: Literal["open", "invite", "closed"] = "open"
    sweep_interval: float = Field(3600.0, gt=0)
    #: Allocations between young-generation garbage collections (Python's default is 700).
    #: Fewer collections keep the message path's p99 low: at 1000 msg/s on one core, p99 went
    #: from 60 ms to 16 ms with 50 000. 0 keeps Python's defaults.
    gc_threshold: int = Field(50_000, ge=0)
    #: Young-generation collections between collections of the middle generation (Python's
    #: default is 10). A collection scans what is alive in the generations it collects: a
    #: saturated node holds tens of thousands of commands in flight (their tasks, coroutines
    #: and futures), and every middle collection scanned all of them again. At 100 they are
    #: rare (2,000 pairs saturated: 1.1-1.2x msgs/s). At moderate load nothing is collected at all
    #: (the message path's objects die young). 0 keeps Python's default.
    gc_threshold_gen1: int = Field(100, ge=0)
    #: argon2id cost: time cost and memory in KiB (lower only for tests).
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(64 * 1024, ge=8)

    @model_validator(mode="after")
    def _claims_reach_every_device(self) -> Settings:
        # Each of a user's devices claims a key of each device it starts a session with: a
        # per-target rule below the devices a user may have would leave some of them out.
        allowed = parse_rate(self.rate_limits.key_claims_per_target).amount
        devices = self.limits.max_devices_per_user
        if self.rate_limits.enabled and allowed < devices:
            raise ValueError(
                "rate_limits.key_claims_per_target (PIGEON_RATE_LIMITS__KEY_CLAIMS_PER_TARGET) "
                f"allows {allowed} keys of one device per user, fewer than "
                f"limits.max_devices_per_user ({devices}): not every device of a user could "
                "start a session with it"
            )
        return self

    def blob_dir(self) -> Path:
        path = self.blobs.path if isinstance(self.blobs, LocalBlobSettings) else None
        return path or self.data_dir / "blobs"

    def blob_secret_file(self) -> Path:
        path = self.blobs.secret_file if isinstance(self.blobs, LocalBlobSettings) else None
        return path or self.data_dir / "blob-secret"

    def vapid_key_file(self) -> Path:
        return self.push.webpush.vapid_key_file or self.data_dir / "vapid.pem"

    def webhook_secret_file(self) -> Path:
        return self.push.webhook_secret_file or self.data_dir / "push-webhook-secret"

    def sqlite_path(self) -> Path:
        path = self.store.path if isinstance(self.store, SqliteSettings) else None
        return path or self.data_dir / "pigeon.db"


def effective(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, secrets masked: secret fields, and passwords inside URLs
    (a PostgreSQL DSN, a Redis URL), for `pigeon check-config` and support requests."""

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        if isinstance(value, str) and "://" in value:
            return _URL_PASSWORD.sub(r"\1***@", value)
        return value

    return dict(mask(settings.model_dump(mode="json")))


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


class ConfigError(ValueError):
    """Settings that cannot be used, said in one line: which setting, where it came from (file
    key or env var), and what is wrong with it."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from (lowest to highest precedence) defaults, TOML file, env vars, overrides.
    Raises `ConfigError` for a missing or unreadable file and for bad or unknown settings."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as f:
                file_values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: not valid TOML: {exc}") from None
    # The raw env values (not a validated Settings): a section such as `store` must merge
    # key by key with the file's, e.g. PIGEON_STORE__DSN over a file that sets type=postgres.
    env = EnvSettingsSource(Settings)()
    merged = _deep_merge(_deep_merge(file_values, env), overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


#: The tags of the discriminated sections (store, blobs), which pydantic puts in an error's path.
_TAGS = frozenset({"sqlite", "postgres", "dynamodb", "local", "s3"})


def describe(exc: ValidationError) -> str:
    """A validation failure as one line: each bad setting with its env var name."""
    parts = []
    for error in exc.errors():
        # discriminated sections put the engine's tag in the path (store.sqlite.dsn): drop it
        loc = [str(x) for x in error["loc"] if x not in _TAGS]
        what = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"]
        if not loc:  # a rule across sections: its message names the settings
            parts.append(what.removeprefix("Value error, "))
            continue
        env = "PIGEON_" + "__".join(x.upper() for x in loc)
        parts.append(f"{'.'.join(loc)} ({env}): {what}")
    return "bad settings: " + "; ".join(parts)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
