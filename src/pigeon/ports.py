"""Ports: the contracts between the core (services) and the engines behind it.

Each Protocol's docstring is its contract: what is atomic, what is ordered, what is guaranteed.
The contract suites in tests/contract run every adapter against these words.
"""

from __future__ import annotations

import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, Protocol

import msgspec

from pigeon.domain.events import Delivery, InboxPage, Message
from pigeon.domain.keys import (
    ClaimedKey,
    DeviceChange,
    DeviceIdentity,
    DeviceKeys,
    E2EEnvelope,
    KeyCounts,
    OneTimeKey,
)
from pigeon.domain.limits import Rate, Spend
from pigeon.domain.media import AttachmentRecord, BlobInfo, DownloadGrant, UploadGrant, UploadTicket
from pigeon.domain.models import (
    Attachment,
    ChatInfo,
    ChatKind,
    ChatSummary,
    Credentials,
    Device,
    Member,
    MemberReceipt,
    PresenceRecord,
    Role,
    User,
    Visibility,
)
from pigeon.domain.push import PushKind, PushNotification, PushOutcome, PushTarget


class Clock(Protocol):
    """Wall-clock time in integer milliseconds since the epoch; injected so tests can steer it."""

    def now_ms(self) -> int: ...


class DeviceStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A device and whether its user may act: what authenticating a token needs, in one read."""

    device: Device
    #: When an operator disabled the user (ms); None while the account is enabled.
    disabled_at: int | None


class AccountRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A user as an operator sees them (`pigeon admin users list`): never sent to clients."""

    id: str
    username: str
    created_at: int
    #: How many devices the user has (logged in, not revoked).
    devices: int
    disabled_at: int | None


class InviteBatch(msgspec.Struct, frozen=True, kw_only=True):
    """Unspent, unexpired invite codes made together. Codes are stored as their SHA-256, so
    how many there are and until when they are valid is all that can be listed."""

    created_at: int
    expires_at: int
    count: int


class AccountCounts(msgspec.Struct, frozen=True, kw_only=True):
    """How many accounts a store holds (`pigeon admin stats`)."""

    users: int
    #: Of `users`, those disabled.
    disabled: int
    devices: int


class AccountStore(Protocol):
    """Users and their devices.

    A user may be *disabled* by an operator (`disabled_at` set): the store keeps their devices,
    tokens and inboxes as they are; what a disabled user may not do is decided by the accounts
    service, which reads `disabled_at` with the device when it authenticates.
    """

    async def create_user(
        self, user: User, password_hash: str, invite: bytes | None = None, at: int = 0
    ) -> None:
        """Insert a user. Raises `Conflict` if the username is taken (case-insensitive). With
        `invite` (the SHA-256 of an invite code), the code is spent in the same transaction:
        `Forbidden` if it is unknown, spent or expired at `at`; a refused registration spends
        nothing."""

    async def add_invites(self, code_hashes: list[bytes], created_at: int, expires_at: int) -> None:
        """Store single-use invite codes (their SHA-256), valid until `expires_at` (ms)."""

    async def credentials(self, username: str) -> Credentials | None:
        """The stored password hash of `username`, or None."""

    async def get_users(self, user_ids: list[str]) -> list[User]:
        """The users among `user_ids` that exist (any order)."""

    async def user_by_name(self, username: str) -> User | None:
        """Look a user up by username (case-insensitive)."""

    async def add_device(self, device: Device, token_hash: bytes, max_devices: int) -> None:
        """Register a device with its token hash. Atomically refuses with `TooManyDevices` if
        the user already has `max_devices` devices."""

    async def list_devices(self, user_id: str) -> list[Device]:
        """The user's devices, oldest first."""

    async def revoke_device(self, user_id: str, device_id: str) -> bool:
        """Delete the device, its token and its inbox. False if it was not the user's device."""

    async def device_by_token(self, token_hash: bytes) -> Device | None:
        """The device holding this token hash, or None (unknown or revoked)."""

    async def set_visibility(self, user_id: str, visibility: Visibility) -> None:
        """Who may see the user's presence."""

    async def presence_settings(
        self, user_ids: list[str]
    ) -> dict[str, tuple[Visibility, int | None]]:
        """For each existing user among `user_ids`: (visibility, last seen stored at last exit)."""

    async def set_last_seen(self, user_id: str, at: int) -> None:
        """Persist when the user was last seen (survives restarts of the presence registry)."""

    async def set_disabled(self, user_id: str, at: int | None) -> bool:
        """Disable the user from `at` (ms), or enable them again with None. Disabling a user
        who is disabled already keeps the first time. False if there is no such user."""

    async def device_status(self, device_id: str) -> DeviceStatus | None:
        """The device with its user's `disabled_at`, in one read; None if it is gone
        (revoked)."""

    async def device_status_by_token(self, token_hash: bytes) -> DeviceStatus | None:
        """The device holding this token hash with its user's `disabled_at`, in one read;
        None if the token is unknown or its device revoked."""

    async def account(self, username: str) -> AccountRecord | None:
        """A user's record by username (case-insensitive), or None."""

    async def list_accounts(self, limit: int, after: str | None = None) -> list[AccountRecord]:
        """At most `limit` users in the order of their case-folded usernames (compared
        bytewise, the same on every engine), starting after the username `after`
        (case-insensitive; it need not exist): pages for an operator."""

    async def list_invites(self, now: int) -> list[InviteBatch]:
        """The invite codes neither spent nor expired at `now` (ms), grouped by when they
        were made and until when they are valid, soonest expiry first."""

    async def account_counts(self) -> AccountCounts:
        """How many users (of them disabled) and devices exist, in one snapshot. Counts every
        row: an operator's command, not for a hot path."""


class ChatRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A chat as an operator sees it (`pigeon admin chats list`)."""

    id: str
    kind: ChatKind
    name: str | None
    created_at: int
    #: How many members it has now.
    members: int
    #: Messages sent in it so far (its last seq; the sweeper may have deleted some).
    last_seq: int
    last_activity_at: int


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A chat member with their role and receipt marks (`pigeon admin chats show`)."""

    user: str
    username: str
    role: Role
    delivered_seq: int
    read_seq: int


class StoreCounts(msgspec.Struct, frozen=True, kw_only=True):
    """What the chat and message side of a store holds (`pigeon admin stats`)."""

    chats: int
    #: Message rows (metadata kept until the retention, bodies or not).
    messages: int
    #: Of `messages`, those whose body is still kept (a device has not acked them yet).
    bodies: int
    #: Inbox entries waiting for their device's ack, over all devices.
    inbox: int
    #: When the oldest of them was written (ms); None if every inbox is empty.
    oldest_inbox_at: int | None


class InboxDepth(msgspec.Struct, frozen=True, kw_only=True):
    """How much waits in the inboxes of every device, at one instant (the metrics' gauges)."""

    #: Inbox entries waiting for their device's ack, over all devices.
    entries: int
    #: When the oldest of them was written (ms); None if every inbox is empty.
    oldest_at: int | None


class ChatStore(Protocol):
    """Chats and membership. Every change also writes a `ChatUpdate` into the inbox of every
    device of every user concerned, in the same transaction, and returns those deliveries."""

    async def get_chat(self, chat_id: str) -> ChatInfo | None:
        """The chat and its current members, or None."""

    async def find_direct(self, user_a: str, user_b: str) -> ChatInfo | None:
        """The one direct chat between two users, if it exists."""

    async def create_chat(self, chat: ChatInfo) -> tuple[ChatInfo, list[Delivery]]:
        """Create `chat` with its members. For a direct chat, if the pair already has one, that
        chat is returned instead with no deliveries (one direct chat per pair, race-free)."""

    async def change_members(
        self,
        chat_id: str,
        expected_version: int,
        add: list[Member],
        remove: list[str],
        promote: list[str],
        actor: str,
        at: int,
    ) -> tuple[ChatInfo, list[Delivery]]:
        """Apply a membership change if the chat is still at `expected_version` (else raise
        `Conflict`; `NotFound` if no chat): add members, remove users, make `promote` admins.
        Removed users' devices and remaining members' devices get one ChatUpdate. New members
        start with delivered/read marks at the chat's current seq (they see no older messages)."""

    async def shares_chat(self, user_id: str, others: list[str]) -> set[str]:
        """Those of `others` who are in at least one chat with `user_id`."""

    async def member_devices(self, chat_id: str) -> list[tuple[str, str]]:
        """(user id, device id) of every device of every member of the chat."""

    async def count_chats(self, user_id: str) -> int:
        """How many chats the user is a member of."""

    async def list_chats(self, user_id: str) -> list[ChatSummary]:
        """The user's chats, newest activity first, with unread counts (others' messages after
        the user's read mark)."""

    # An operator's reads (`pigeon admin`): each one statement or one read snapshot.

    async def chat_records(self, limit: int, user_id: str | None = None) -> list[ChatRecord]:
        """At most `limit` chats (only those `user_id` is a member of, if given), newest
        activity first, ties broken by the greater id."""

    async def chat_record(self, chat_id: str) -> ChatRecord | None:
        """One chat's record, or None."""

    async def member_records(self, chat_id: str) -> list[MemberRecord]:
        """The chat's members in join order, with usernames, roles and marks ([] if there is
        no such chat)."""

    async def store_counts(self) -> StoreCounts:
        """Chats, messages, kept bodies and waiting inbox entries, in one snapshot (the
        message tables are counted here: the message store's adapters are the message path's
        alone). Counts every row: an operator's command, not for a hot path."""

    async def inbox_depth(self) -> InboxDepth:
        """The inbox entries of every device and the oldest one's time, in one snapshot (a
        read: it changes nothing). It counts the inbox's rows (a scan of an index), so the
        metrics read it every few seconds, apart from the scrapes and the message path."""


class SendRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A message a device asks to send; `message_id` and `at` are chosen by the service."""

    message_id: str
    chat: str
    sender: str
    sender_device: str
    cmid: str
    at: int
    body: str | None
    attachment: Attachment | None
    preview: str | None
    #: The sender's own text for the recipients' pushes (stored for them, never in the event).
    push_preview: str | None = None
    #: An encrypted message's envelope: part of the message event, stored and erased as the
    #: body is (adapters put it into `Message.e2e`).
    e2e: E2EEnvelope | None = None

    def message(self, seq: int) -> Message:
        """The message event this request becomes once the chat gave it `seq`."""
        return Message(
            id=self.message_id,
            chat=self.chat,
            seq=seq,
            sender=self.sender,
            sender_device=self.sender_device,
            cmid=self.cmid,
            at=self.at,
            body=self.body,
            attachment=self.attachment,
            e2e=msgspec.UNSET if self.e2e is None else self.e2e,
        )


class SendResult(msgspec.Struct, frozen=True):
    """The committed message (or the original one, when `duplicate`) and what to push."""

    message: Message
    duplicate: bool
    deliveries: list[Delivery]


class SweepStats(msgspec.Struct, frozen=True):
    """What one retention sweep removed."""

    messages: int
    inbox_entries: int


class MessageStore(Protocol):
    """Messages, per-device inboxes and receipts: the message path.

    Durability: a method returns only after its transaction is committed. Ordering: a chat's
    messages get gap-free `seq` 1, 2, 3...; each device's inbox gets gap-free `iseq`, and within
    one chat a device's inbox order equals seq order, also under concurrent writers.
    """

    async def send(self, req: SendRequest) -> SendResult:
        """Atomically: check the sender is a participant (`Forbidden`; `NotFound` if no chat),
        assign the next seq, store the message, write one inbox entry per device of every other
        participant and per other device of the sender, and bump the chat's activity. If
        (sender_device, cmid) was already sent, return the original with `duplicate=True` and
        write nothing."""

    async def ack(self, device: Device, upto: int, at: int) -> list[Delivery]:
        """Remove the device's inbox entries with iseq <= upto. Messages acked advance the
        user's delivered mark per chat and write `Receipt`s to their senders' devices (returned).
        A message whose every inbox entry is gone loses its body. Idempotent."""

    async def mark_read(self, device: Device, chat_id: str, seq: int, at: int) -> list[Delivery]:
        """Advance the user's read mark in the chat to `seq` (capped at the chat's last seq;
        never backwards). Writes read `Receipt`s to the senders of newly read messages and a
        `ReadState` to the user's other devices. `Forbidden` if not a participant."""

    async def read_inbox(
        self, device_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> InboxPage:
        """The device's deliverable inbox entries with iseq > after, in iseq order, at most
        `limit` and, with `max_bytes`, no more entries than fit in that many bytes (always at
        least one), with the device's inbox head and ack in the same snapshot. Iseqs missing
        between `after` and `head` were acked or expired."""

    async def acked_iseq(self, device_id: str) -> int:
        """The highest iseq the device has acked (0 if none)."""

    async def receipts(
        self, user_id: str, chat_id: str, message_id: str
    ) -> tuple[Message, list[MemberReceipt]]:
        """Per-member delivered/read times of one message of the chat, for a participant
        `user_id` (`Forbidden` otherwise, checked first; `NotFound` if no such message)."""

    async def sweep(self, before: int) -> SweepStats:
        """Delete messages created before `before` (ms) and every inbox entry created before it."""


class AttachmentStore(Protocol):
    """Attachment metadata and who may read it; the bytes live in a `BlobStore` under the
    attachment's id. An attachment becomes readable by a chat's members when it is shared into
    that chat (before the message that carries it is sent), and stays readable by its owner."""

    async def create(
        self, record: AttachmentRecord, *, max_per_window: int, window_start: int
    ) -> None:
        """Insert `record`. Atomically refuses with `RateLimited` if its owner already created
        `max_per_window` attachments at or after `window_start` (ms)."""

    async def get(self, attachment_id: str) -> AttachmentRecord | None:
        """The attachment, or None."""

    async def mark_uploaded(
        self, attachment_id: str, at: int, meta: dict[str, Any]
    ) -> AttachmentRecord | None:
        """Record that the upload was verified (`uploaded_at` is set the first time only) and
        replace `meta`. Returns the updated record, None if there is no such attachment."""

    async def share(self, attachment_id: str, chat_id: str) -> None:
        """Let the members of `chat_id` read the attachment (idempotent; `NotFound` if there is
        no such attachment). The caller checked that the sharer may read it and belongs to
        the chat."""

    async def may_read(self, user_id: str, attachment_id: str) -> bool:
        """True if `user_id` owns the attachment or is a member of a chat it was shared into."""

    async def sweep(self, before: int, unshared_before: int) -> list[str]:
        """Delete attachments created before `before` (retention), and those created before
        `unshared_before` that were never shared (abandoned uploads). Returns their ids, whose
        blobs (and thumbnails) the caller deletes."""


class PushContext(msgspec.Struct, frozen=True, kw_only=True):
    """What the push worker needs to know about a device before it pushes to it."""

    target: PushTarget | None
    user_id: str
    #: A message of others in the chat waits for the device (unacked, up to the job's
    #: `last_iseq`): without one, only an invitation makes a push.
    waiting: bool
    #: The user's unread messages in the chat, at most `MAX_COUNT` (what the push says).
    count: int
    #: The device's cumulative ack.
    acked_iseq: int
    #: Unread messages of the user over all chats (the badge).
    unread: int
    #: The sender of the newest waiting message, when the user allows names in pushes.
    sender_name: str | None
    #: The device's user is disabled (`pigeon admin users disable`): no push goes to them.
    disabled: bool
    #: The push preview its sender attached to that message, if any.
    preview: str | None = None


class PushStore(Protocol):
    """Each device's push target, written with the device; jobs come from `PushQueue`.

    Contract: while a device has a target, appending a message entry to its inbox marks its job
    of that chat pending in the same transaction (the outbox), so a node killed right after a
    commit loses no push. An invitation into a chat does the same. A revoked device loses its
    target and its jobs.
    """

    async def set_target(self, device_id: str, target: PushTarget | None, at: int) -> None:
        """Register, replace (or, with None, remove) the device's target."""

    async def target_status(self, device_id: str) -> tuple[PushTarget | None, str | None]:
        """The device's target, and why a gateway removed the last one (None if it did not)."""

    async def remove_gone(self, device_id: str, target: PushTarget, reason: str, at: int) -> bool:
        """A gateway said `target` is permanently invalid: remove it, unless the device has
        registered another one meanwhile. True if it was removed."""

    async def set_show_names(self, user_id: str, show: bool) -> None:
        """The user's privacy setting: may pushes to their devices name the sender?"""

    async def context(self, device_id: str, chat_id: str, upto: int) -> PushContext | None:
        """What a push to the device about the chat needs, looking at its inbox up to `upto`
        (None: the device is gone)."""


class PushJob(msgspec.Struct, frozen=True, kw_only=True):
    """A device's pending push about one chat, leased to one worker until `lease` (ms).

    The job is a flag, not a list: a burst of messages marks it pending once (one write), and
    what it says (how many messages) is counted when it is pushed.
    """

    device: str
    chat: str
    #: The device's newest inbox entry that had its grace when the job was claimed: the push
    #: covers up to it (a younger one may still be acked by a connected device).
    last_iseq: int
    #: An invitation into the chat is part of it (its inbox entry), 0 if none.
    invite_iseq: int
    #: How many times it has been leased, this one included.
    attempts: int
    lease: int


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A push that failed `max_attempts` times, kept for the operator."""

    id: int
    device: str
    chat: str
    attempts: int
    error: str
    failed_at: int


class PushQueue(Protocol):
    """Work-queue semantics for push jobs: each job goes to one worker at a time.

    A claimed job is invisible until its lease ends; a worker that dies mid-job lets it come back
    after `visibility` seconds. A job is `done` (sent, or needed no push), `retry`-ed at a later
    time, or moved to the dead letters. Every answer names the lease it got, so a worker whose
    lease ran out cannot overwrite the answer of the worker that holds it now.
    """

    async def configure(self, grace: float, window: float) -> None:
        """The rules jobs become due by (from then on): a job is due `grace` seconds after its
        first entry (a device online acks within it), and not within `window` seconds of the
        device's last push about the chat (one push per device and chat per window)."""

    async def claim(self, now: int, limit: int, visibility: float) -> list[PushJob]:
        """Lease up to `limit` due jobs for `visibility` seconds, the longest due first."""

    async def next_due(self) -> int | None:
        """When (ms) the earliest pending job may be claimed, or None if there is none."""

    async def done(self, job: PushJob, now: int, pushed: bool) -> None:
        """The entries `job` covers are dealt with. If entries of the chat came after its
        `last_iseq`, it stays pending: due after a grace from `now` (and, if it was pushed,
        after the window)."""

    async def retry(self, job: PushJob, due_at: int, error: str) -> None:
        """Give the job back, claimable again at `due_at` (ms; no grace: it had its own)."""

    async def dead(self, job: PushJob, error: str, now: int) -> None:
        """Move the job to the dead letters (newer entries stay pending, as after `done`)."""

    async def extend(self, job: PushJob, until: int) -> PushJob | None:
        """Keep the job leased until `until` (ms; claimable again then), recording its
        `attempts`, if its lease is still `job.lease`: the job with its new lease, else None
        (it was answered, or its lease ran out and it was claimed again). For a queue that
        hands jobs on (RabbitMQ's relay): the outbox's lease stays the truth while a job
        waits elsewhere."""

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The oldest dead letters first."""

    async def retry_dead(self, ids: list[int] | None, now: int) -> int:
        """Queue the dead letters again, due at `now` (all when `ids` is None); how many were."""

    async def drop_dead(self, ids: list[int] | None) -> int:
        """Forget dead letters (all when `ids` is None); how many were."""


class PushQueueDepth(msgspec.Struct, frozen=True, kw_only=True):
    """How much work a push queue holds at one instant (the metrics' gauges)."""

    #: Jobs pending, leased ones included.
    pending: int
    #: Pending jobs that may be claimed now (not leased, grace, window and backoff over).
    due: int
    #: When (ms) the longest-waiting of those became claimable; None if none is.
    oldest_due_at: int | None


class PushQueueStats(Protocol):
    """A read a `PushQueue` may offer besides its contract, for monitoring: kept apart from
    `PushQueue` so that a queue without it (the metrics skip it) is still a `PushQueue`."""

    async def depth(self, now: int) -> PushQueueDepth:
        """The queue's depth at `now` (ms), in one snapshot. A read: it changes nothing."""


class PushQueueFeed(Protocol):
    """What a queue that is fed (a broker delivers its jobs) may offer besides `PushQueue`: kept
    apart so that a worker polls a queue without it (a table) and waits on one with it."""

    async def wait_due(self, timeout: float) -> None:
        """Return once a claim may find a job, or after `timeout` seconds."""


class KeyStore(Protocol):
    """What end-to-end encryption needs from the store: each device's public keys, one-time
    keys taken atomically, device-list announcements and to-device messages.

    Keys belong to their device: revoking the device (`AccountStore.revoke_device`) deletes
    them in the same transaction (foreign keys). The store checks nothing about a key but
    what atomicity needs; shapes, sizes and who may see whom are the services' rules.

    Announcements and to-device messages are inbox entries like any other (`iseq`, ack,
    retention), written in the transaction that causes them; each method returns them as
    `Delivery`s to push.
    """

    async def upload(
        self,
        device: Device,
        identity: DeviceIdentity | None,
        one_time_keys: list[OneTimeKey],
        fallback: OneTimeKey | None,
        max_one_time_keys: int,
        at: int,
    ) -> tuple[KeyCounts, list[Delivery]]:
        """Atomically: publish the device's identity keys (identical ones again: a no-op;
        different ones: `Conflict`, they never change), add one-time keys (an id the device
        already holds is kept as it is: a retried upload is harmless; `TooManyKeys` if the
        device would then hold more than `max_one_time_keys`, and nothing is stored), and
        replace the fallback key (no longer marked used). Keys without published identity
        keys are refused (`BadRequest`). Publishing identity keys for the first time writes
        a `DeviceList` event (`keys`) as `announce` does. Returns the device's counts after
        the upload and the deliveries. `NotFound` if the device is gone."""

    async def counts(self, device_id: str) -> KeyCounts:
        """What the device holds (`max_one_time_keys` is left 0 for the caller to fill)."""

    async def query(self, user_ids: list[str]) -> list[DeviceKeys]:
        """Every device of these users (unknown users have none) with its identity keys or
        None, by user in the order given, then oldest device first."""

    async def owners(self, device_ids: list[str]) -> dict[str, str]:
        """The user of each existing device among `device_ids` (revoked ones are absent)."""

    async def claim(
        self, device_ids: list[str], at: int, fallback_only: frozenset[str] = frozenset()
    ) -> tuple[list[ClaimedKey], list[Delivery]]:
        """For each device, take one of its one-time keys (deleted as it is taken: two
        concurrent claims, on any node, never get the same key) or, if it has none left, its
        fallback key (kept, and marked used). A device with neither is left out. Order of
        `device_ids`. The first time a fallback key is handed out since it was uploaded, a
        `KeysExhausted` event is written into its own device's inbox, in the same transaction
        (exactly once, also under concurrent claims); those deliveries come second.

        A device in `fallback_only` (the claimer took too many of its keys lately) gets its
        fallback key whatever one-time keys it holds: none of them is taken, and the fallback
        key is neither marked used nor told of (`KeysExhausted`), since the device's one-time
        keys did not run out and it has nothing to top up; without a fallback key it is left
        out. Ids in `fallback_only` but not in `device_ids` are ignored."""

    async def announce(
        self, user_id: str, device_id: str, change: DeviceChange, at: int
    ) -> list[Delivery]:
        """Write one `DeviceList` event into the inbox of every device of every user who
        shares a chat with `user_id`, and of the user's other devices (never `device_id`
        itself), in one transaction."""

    async def to_device(
        self, sender: Device, payloads: list[tuple[str, str]], at: int
    ) -> list[Delivery]:
        """Write one `ToDevice` event per (device id, payload) into that device's inbox, in
        one transaction; devices that no longer exist are skipped. The device ids are
        distinct."""


class Store(Protocol):
    """The whole persistent state, one sub-store per aggregate. Opened and closed with the app."""

    accounts: AccountStore
    chats: ChatStore
    messages: MessageStore
    attachments: AttachmentStore
    push: PushStore
    keys: KeyStore

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def aclose(self) -> None:
        """Finish in-flight writes and release connections."""

    async def ping(self) -> None:
        """A cheap probe that the store can do its work right now (the node's readiness,
        `/readyz`): returns, or raises `Unavailable` saying what is wrong. It changes nothing.
        Callers bound it with a timeout and may cancel it; cancelling leaves nothing behind."""


class Presence(Protocol):
    """Who is online: a user is online while at least one of their sessions (live connections,
    on any node) is registered. Tracks the *announced* state separately, so that a brief
    disconnect within the grace period is never announced (no flapping). Implementations must
    make each method atomic per user."""

    async def session_up(self, user_id: str, session: str) -> bool:
        """Register a live session. True if the user's announced state was offline (it is now
        online: the caller announces it)."""

    async def session_down(self, user_id: str, session: str, at: int) -> bool:
        """Forget a session. True if it was the user's last one (last seen = `at`): the caller
        confirms the offline state after the grace period."""

    async def confirm_offline(self, user_id: str) -> PresenceRecord | None:
        """If the user still has no session and is announced online, mark them announced
        offline and return the record to announce; else None. Either way the user is no
        longer pending: `reap` stops offering them."""

    async def lookup(self, user_ids: list[str]) -> dict[str, PresenceRecord]:
        """The announced state of each user this registry knows (unknown users are absent)."""

    async def refresh(self, sessions: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Heartbeat of one node: keep these (user, session) pairs alive for another session
        TTL. Returns the pairs the registry no longer knew (reaped while this node could not
        refresh them, or lost with the registry's own state): the caller registers them again
        with `session_up`. Registries shared by several nodes expire sessions nobody refreshes
        (their node died); a single-process registry may ignore this and return []."""

    async def reap(self, now: int) -> list[str]:
        """Drop every session whose TTL ran out by `now` (ms). Returns the users left with no
        session, as `session_down` would have (last seen = the session's last refresh), and
        users whose last session ended a session TTL ago and who are still announced online
        (the node that would have confirmed them after the grace period died): the caller
        confirms them offline. A user the caller failed to confirm is returned again by a
        later reap. A single-process registry has nothing to reap."""

    async def ping(self) -> None:
        """A cheap round trip to the registry (readiness, `/readyz`): returns, or raises
        `Unavailable`. A registry in this process always answers. Callers bound it with a
        timeout and may cancel it."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...


BusHandler = Callable[[bytes], None]


class Subscription(Protocol):
    """A live subscription; `cancel()` stops delivery (idempotent)."""

    def cancel(self) -> None: ...


class Bus(Protocol):
    """Routes frames between nodes by channel (names: `pigeon.services.channels`), e.g. to the
    node that holds a device's connection.

    Delivery is at-most-once and best-effort (a frame may be lost when a node or the broker
    fails); the durable inbox is what makes messages reliable. Frames published by one publisher
    to one channel arrive in publish order. A node subscribes to a channel at most once (a new
    subscription replaces the old). Handlers run on the event loop and must not block.
    """

    async def publish(self, channel: str, frame: bytes) -> None:
        """Send `frame` to whoever subscribed to `channel` (nobody: dropped)."""

    async def publish_many(
        self, items: list[tuple[str, bytes]], *, local_first: bool = False
    ) -> None:
        """`publish` for many (channel, frame) pairs, in order, in as few round trips as we can.

        `local_first`: a frame whose channel is subscribed on this node goes to that handler
        only, at once, and not to the other nodes. For frames only the channel's one live
        subscriber needs (a device's deliveries: one connection per device), when whoever
        holds a channel that moved makes up for what it missed (the hub's resync when a
        device's connection leaves a node)."""

    async def subscribe(self, channel: str, handler: BusHandler) -> Subscription:
        """Deliver frames of `channel` to `handler` until cancelled."""

    def on_recovered(self, callback: Callable[[Collection[str]], None]) -> None:
        """Run `callback` (on the event loop) each time the bus comes back from an outage
        during which frames may have been lost, once its subscriptions are live again, with
        the channels that may have lost frames (a Redis server's: all of them; a cluster
        slot that moved: its channels). A node uses it to resync those connections from the
        durable inbox."""

    async def ping(self) -> None:
        """A cheap round trip on the connections that deliver frames to this node (readiness,
        `/readyz`): returns, or raises `Unavailable`. A bus in this process always answers.
        Callers bound it with a timeout and may cancel it."""

    async def open(self) -> None:
        """Connect."""

    async def aclose(self) -> None:
        """Disconnect; subscriptions end."""


# --- Blob storage (media messages) -----------------------------------------------------------


class BlobStore(Protocol):
    """Attachment bytes and their thumbnails, moved by clients straight to and from storage
    through pre-signed URLs, so that no upload or download is relayed by pigeon's event loop.

    Keys are server-generated (`pigeon.domain.media.check_key`: a ULID, optionally `.thumb`).
    Every method raises `BadRequest` for any other key before it touches storage, which makes
    path traversal impossible by construction. Bytes are opaque: an end-to-end encrypted blob is
    stored, verified and served exactly like any other. Digests are lowercase hex SHA-256, sizes
    bytes, times integer milliseconds since the epoch. Engine failures raise `Unavailable`.

    Upload, in three steps, and the guarantee they give together:
      1. `upload_url` signs *one* PUT of exactly `size` bytes whose SHA-256 is `sha256`, sent
         with `content_type`, to `key`, valid until `expires_at`.
      2. The client sends that PUT. A wrong method, an altered URL or header, or an expired
         URL is refused (HTTP 403). Wherever the engine can check the bytes as they arrive, a
         wrong size or digest is refused too and nothing is kept (pigeon's own endpoint streams
         to a temporary file while hashing and renames it into place only on a match; S3 checks
         the signed Content-Length and x-amz-checksum-sha256).
      3. Once the client says it uploaded, the service calls `verify`. It raises `NotFound` if
         nothing is stored (never uploaded, or refused), and `SizeMismatch` /
         `ChecksumMismatch` *after deleting the blob* if an engine that could not check during
         the upload (e.g. an S3-compatible store that ignores checksums) holds other bytes.
      So: after `verify` returns, the key holds exactly the declared bytes; a message may only
      reference a blob once `verify` has returned for it.

    Download: `download_url` signs GET (and HEAD on pigeon's own endpoint) of `key` until
    `expires_at`. Responses carry the stored Content-Type, Content-Length, an ETag and
    `Accept-Ranges: bytes`; a single `Range` gives 206 with Content-Range, an unsatisfiable one
    416. Cache-Control lets a cache (or a CDN in front) keep the response no longer than the URL
    is valid. A missing blob is refused: 404 (S3 may say 403 to credentials that cannot list
    the bucket); the URL does not prove the blob still exists.

    Stored blobs are immutable: a key is written once (a repeated, identical upload is
    harmless) and then only deleted.
    """

    async def upload_url(
        self, key: str, *, size: int, sha256: str, content_type: str, expires_at: int
    ) -> UploadTicket:
        """Sign an upload of exactly these bytes to `key`. `BadRequest` on a malformed key, size,
        digest or content type; `ValueError` if `expires_at` is not in the future or beyond what
        the engine can sign (S3: 7 days). Signing needs no round trip to storage."""

    async def download_url(self, key: str, *, expires_at: int, filename: str | None = None) -> str:
        """Sign a download of `key` until `expires_at`. With `filename`, responses carry
        `Content-Disposition: attachment` with that name (made header-safe). Does not check
        that the blob exists."""

    async def verify(self, key: str, *, size: int, sha256: str) -> BlobInfo:
        """Confirm `key` holds exactly `size` bytes with digest `sha256` (see step 3 above).
        Raises `NotFound`, or deletes the blob and raises `SizeMismatch` / `ChecksumMismatch`.
        May read the whole blob back (streamed) when the engine kept no verified digest."""

    async def stat(self, key: str) -> BlobInfo | None:
        """Size and content type of a stored blob, or None."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """Stream bytes `start` (inclusive) to `end` (exclusive; None: to the end) of a blob
        in chunks of bounded size, never the whole blob at once (thumbnail generation reads
        through this). Raises `NotFound` on first iteration if there is no such blob; a
        `start` at or past the end yields nothing. Close it (`contextlib.aclosing`) when
        stopping early, to release the file or connection at once."""

    async def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        """Store a small server-made blob (a thumbnail: tens of KiB, generated whole in memory
        anyway) at `key`, replacing any previous one atomically."""

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete these blobs (in batches where the engine has them). Idempotent: missing keys
        are not an error. All keys are checked before anything is deleted."""

    async def sweep(self, before: int) -> int:
        """Delete every blob stored before `before` (ms) and abandoned partial uploads, and
        return how many blobs were removed. An engine whose own expiry enforces the retention
        (an S3 lifecycle rule, set by `open`) may leave this to the engine and return 0."""

    async def open(self) -> None:
        """Prepare storage (directories; the bucket and its lifecycle rule). Idempotent."""

    async def aclose(self) -> None:
        """Release connections. Signed URLs stay valid: they do not depend on this process."""


class BlobEndpoint(Protocol):
    """The serving half of a blob store whose signed URLs point at pigeon's own HTTP
    (`/v1/blobs/{key}`, see `pigeon.gateway.blobs`): the local adapter. The gateway checks each
    request here before it reads a byte of the body, and needs no database: everything an
    upload must satisfy (size, digest, content type, expiry) is in the signed URL.

    `params` are the request's query parameters. Both `authorize_*` raise `BadRequest` for a
    malformed key, `SignatureInvalid` for an altered or incomplete URL or one signed for
    another method, and `UrlExpired` for a genuine URL past its expiry (signature first, so a
    forged URL never learns whether it has expired).
    """

    def authorize_upload(self, key: str, params: Mapping[str, str]) -> UploadGrant:
        """What this signed PUT allows."""

    def authorize_download(self, key: str, params: Mapping[str, str]) -> DownloadGrant:
        """What this signed GET (or HEAD) allows."""

    async def receive(self, grant: UploadGrant, chunks: AsyncIterable[bytes]) -> BlobInfo:
        """Stream an upload to storage while hashing it, in bounded memory. Keeps the blob only
        if it is exactly `grant.size` bytes with digest `grant.sha256`; otherwise deletes
        everything written and raises `SizeMismatch` (as soon as too many bytes arrive) or
        `ChecksumMismatch`. An interrupted upload leaves nothing behind either."""

    async def locate(self, key: str) -> tuple[Path, BlobInfo] | None:
        """The file holding a stored blob (to be sent with sendfile) and its info, or None."""


class RateLimiter(Protocol):
    """Counters of what a key (a device, a user, a chat, an address) spent under a `Rate`.

    Sliding windows; `cost` is the units one request spends (1, or its bytes). In a cluster the
    counters are shared by every node (same semantics as on one node). A limiter whose backing
    service is down or slow lets requests through (None): abuse limits must never take the
    message path down with them.
    """

    async def hit(
        self, rate: Rate, key: str, cost: int = 1, *, deferred: bool = False
    ) -> float | None:
        """Spend `cost` under `rate` for `key`: None if it fits (and is counted), else the
        seconds after which it would fit (nothing counted). `deferred`: in a cluster, decide on
        this node's view of the counter and share the spend shortly after, without waiting
        for the other nodes (other nodes' spends are then seen up to a sync interval late);
        for the message path's rules, not for those that stop guessing."""

    async def hit_all(self, spends: Sequence[Spend], *, deferred: bool = False) -> float | None:
        """One request's spends on several counters, all or nothing: None if every one fits
        (all counted), else the longest wait among those that do not (none counted).
        `deferred` as for `hit`."""

    async def open(self) -> None:
        """Connect (no-op for in-process counters)."""

    async def aclose(self) -> None:
        """Disconnect."""


class PushSender(Protocol):
    """Delivers one push to one platform's gateway (FCM, APNs, Web Push or a webhook).

    `send` never raises for what a gateway or the network does: it answers a `PushOutcome`
    (`sent`, `retry` with the gateway's `Retry-After` if any, or `gone` for a permanently invalid
    target). Retrying, backoff and dead letters are the push worker's business, not the
    sender's. Each sender takes its gateway's base URL from config, so tests point it at a fake
    gateway on loopback.
    """

    kind: PushKind

    async def send(self, target: PushTarget, note: PushNotification) -> PushOutcome:
        """Push `note` to `target` (whose `kind` is this sender's)."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...


def port_operations(port: type[Any]) -> list[str]:
    """The coroutine methods a protocol declares: its named operations (what the metrics and
    tracing wrappers of a port time or trace)."""
    return [
        name
        for name, member in vars(port).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    ]
