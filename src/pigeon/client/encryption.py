"""End-to-end encryption wired into a connection: `PigeonClient(..., e2e=E2EConfig(...))`.

Why it exists apart from `e2e/`: the crypto core knows no server; this module is what talks to
it on the core's behalf (keys_upload, keys_query, keys_claim, send_to_device) and keeps what a
device must remember between events: which chats are encrypted (once seen encrypted, kept in
the store and never believed plaintext again) and who is in them, whose devices were verified
(and which were revoked), which messages wait for a key, which to-device payloads and room
keys wait to be checked.

What it guarantees:
- **sending**: before each encrypted message the chat's Megolm session is shared with every
  current member device that lacks it (a one-time key is claimed and an Olm session started
  for a device met for the first time); the session is replaced when a member leaves or is
  removed, when a device is revoked, and per the `RotationPolicy`;
- **receiving**: a room key is imported only if it came over Olm from a verified device of a
  member of its chat; a message decrypts into a `DecryptedMessage` (a `Message`, so code that
  reads `body` keeps working) only if its sender's identity key is the one the device list
  gave; one that cannot be decrypted yet is a `WaitingForKey` event, is kept in the sealed
  store (at most `E2EConfig.max_waiting`, the oldest dropped) and comes again, decrypted, when
  a key to its session is imported, by this client or a later one on the same store; nothing
  here raises into the event loop;
- **key requests**: for such a message the device asks the sender's device and its own other
  devices for the key (`room_key_request` over Olm; one per session per
  `E2EConfig.key_request_interval`, recorded in the store), and again after each connect's
  sync for the sessions kept messages still wait for; it answers such requests from a current
  member device of the chat with what it is entitled to (`GroupSessions.forward`); a
  forwarded key is taken only if asked for, and only from the session's own device or one of
  this user's;
- **rate limits**: a `keys_*` or `send_to_device` command refused with `rate_limited` is sent
  again after the `retry_after` it was told, a few times (`E2EConfig.rate_limit_retries`, each
  wait at most `max_rate_wait`), then fails with `RateLimited`: a send is not failed by a
  short refusal, and event handling is never held up for long;
- **trust**: a known device whose identity keys change is never encrypted to, and is reported
  as an `IdentityKeyChanged` event; a revoked device leaves a tombstone in the store, so that
  if it is announced again (same keys or others) it is refused and reported
  (`IdentityKeyChanged(revoked=True)`), and its messages are `Unreadable`;
  `fingerprint(user)` gives the safety number to compare.
The store is saved after every change (a key used, a session moved or imported).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from pigeon.client.e2e import (
    AttachmentKey,
    CryptoStore,
    Decrypted,
    DeviceIdentity,
    DeviceInfo,
    E2EError,
    Envelope,
    ForwardedRoomKey,
    IdentityKeyChanged,
    KeyRequest,
    MissingKey,
    NewDevice,
    RotationPolicy,
    StoreCorrupt,
    WaitingMessage,
    encrypt_file,
    safety_number,
    verify_identity,
)
from pigeon.client.e2e.megolm import FORWARDED_ROOM_KEY, ROOM_KEY, ROOM_KEY_REQUEST
from pigeon.client.errors import ClientError, ConnectionLost, RateLimited
from pigeon.domain.events import ChatUpdate, DeviceList, Event, KeysExhausted, Message, ToDevice
from pigeon.domain.keys import E2EEnvelope
from pigeon.domain.models import Attachment

log = logging.getLogger(__name__)
Request = Callable[..., Awaitable[Any]]
#: Devices per `keys_claim` and `send_to_device` (the server's default `e2e.max_targets`).
MAX_TARGETS = 1000


@dataclass(frozen=True)
class E2EConfig:
    """Turns end-to-end encryption on for a client.

    `store`: the device's key store file (created on the first connect, opened afterwards; one
    file per device). `pickle_key`: 32 bytes the application keeps (e.g. in the OS keychain):
    the store is sealed with it. `one_time_keys`: how many one-time keys to keep on the server
    (capped by the server's and vodozemac's maxima). `max_waiting`: how many messages are kept
    waiting for their key (the oldest dropped first). `key_request_interval`: seconds between
    two requests for the key of one session. `rate_limit_retries` and `max_rate_wait`: a key
    directory command (or a to-device send) refused with `rate_limited` is tried again after
    the `retry_after` it was told, at most that many times and only if told to wait at most
    that many seconds; else `RateLimited` is raised (so a send, or an event being handled,
    waits at most `rate_limit_retries * max_rate_wait` seconds for it)."""

    store: Path
    pickle_key: bytes
    policy: RotationPolicy | None = None
    one_time_keys: int = 50
    max_waiting: int = 1000
    key_request_interval: float = 60.0
    rate_limit_retries: int = 3
    max_rate_wait: float = 5.0


class DecryptedMessage(Message, frozen=True, kw_only=True):
    """An encrypted message, decrypted: `body` holds its text, `e2e` still holds the envelope
    (so the application knows it was encrypted), `sender_ed25519` the sender device's verified
    key, and `attachment_key` the key of its encrypted file (pass it to `download(key=...)`)."""

    sender_ed25519: str = ""
    attachment_key: AttachmentKey | None = None
    #: The message's whole decrypted content (`body`, `attachment`, anything the sender added).
    content: dict[str, Any] = {}


class WaitingForKey(msgspec.Struct, frozen=True, kw_only=True):
    """ "Waiting for this message": an encrypted message whose room key has not arrived (it was
    asked for). When it does, even after a restart, the message comes again as a
    `DecryptedMessage` with the same `id`."""

    message: Message
    session_id: str


class Unreadable(msgspec.Struct, frozen=True, kw_only=True):
    """An encrypted message that will never decrypt (tampered with, replayed, or not from the
    device it claims): show that it could not be read, never its content."""

    message: Message
    reason: str


#: What `PigeonClient.events()` yields besides the inbox's events when E2E is on.
E2ENotice = WaitingForKey | Unreadable | IdentityKeyChanged
#: What a kept message or room key becomes once handled.
E2EResult = DecryptedMessage | E2ENotice


class _Chat(msgspec.Struct, kw_only=True):
    encrypted: bool
    members: set[str]


class DeviceCrypto:
    """One device's encryption state bound to its connection (`request`)."""

    def __init__(
        self, config: E2EConfig, request: Request, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._request = request
        self._clock = clock
        self.store: CryptoStore | None = None
        self._chats: dict[str, _Chat] = {}
        #: Verified, trusted devices of each user, as last queried (dropped on `device_list`).
        self._devices: dict[str, list[DeviceInfo]] = {}
        self._notices: list[E2ENotice] = []
        self._lock = asyncio.Lock()
        #: Set once the keys were published on connect: the store is open and the server
        #: knows this device's keys.
        self._published = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, user: str, device: str) -> CryptoStore:
        """Open the device's store, or create it on the first connect."""
        if self.store is not None:
            return self.store
        path, key = self.config.store, self.config.pickle_key
        if path.exists():
            store = CryptoStore.open(path, key, policy=self.config.policy)
            if (store.me.user, store.me.device) != (user, device):
                raise StoreCorrupt(f"{path} belongs to device {store.me.device}, not {device}")
        else:
            store = CryptoStore.create(
                path, key, user=user, device=device, policy=self.config.policy
            )
        self.store = store
        return store

    def _me(self) -> CryptoStore:
        if self.store is None:
            raise E2EError("e2e_not_ready", "the key store opens on connect")
        return self.store

    async def publish_keys(self) -> dict[str, Any]:
        """Publish the identity keys (harmless when already published) and top up the one-time
        and fallback keys from the server's counts; returns the counts after the upload."""
        store = self._me()
        counts = await self._call("keys_upload")
        upload = store.keys_to_upload(
            on_server=int(counts["one_time_keys"]),
            target=min(self.config.one_time_keys, int(counts["max_one_time_keys"])),
            fallback_needed=not counts["fallback_key"] or bool(counts["fallback_used"]),
            first=True,
        )
        result = await self._call("keys_upload", **msgspec.to_builtins(upload))
        store.keys_published()
        self._published.set()
        return dict(result)

    async def _call(self, t: str, **fields: Any) -> Any:
        """`request` for the commands this layer sends on its own (keys_*, send_to_device):
        a `rate_limited` reply is waited out (`retry_after`) and the command sent again, at
        most `rate_limit_retries` times and only for waits up to `max_rate_wait` seconds; past
        that, `RateLimited`. Such a command did nothing when refused: sending it again is
        safe."""
        config = self.config
        for attempt in itertools.count():
            try:
                return await self._request(t, **fields)
            except ClientError as exc:
                if exc.code != "rate_limited":
                    raise
                wait = exc.retry_after
                if (
                    wait is None
                    or wait > config.max_rate_wait
                    or attempt >= config.rate_limit_retries
                ):
                    raise RateLimited(t, exc.message, wait) from exc
                log.info("e2e: %s rate limited: trying again in %.1f s", t, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    # -- chats -------------------------------------------------------------------------------

    def learn_chat(self, chat: dict[str, Any]) -> None:
        """Remember a chat from a ChatInfo reply (create_chat, modify_participants)."""
        members = {m["user"] if isinstance(m, dict) else str(m) for m in chat["members"]}
        self._remember(str(chat["id"]), bool(chat.get("encrypted")), members)

    def _remember(self, chat: str, encrypted: bool, members: set[str]) -> None:
        """A chat once seen encrypted stays encrypted (kept in the store): a server that later
        says otherwise is not believed."""
        store = self._me()
        if encrypted and chat not in store.encrypted_chats:
            store.encrypted_chats.add(chat)
            store.save()
        self._chats[chat] = _Chat(encrypted=chat in store.encrypted_chats, members=members)

    def members_changed(self, chat: str, removed: bool) -> None:
        """After a membership change this device made or heard of: a removal rotates."""
        if removed:
            self._me().groups.rotate(chat)
            self._me().save()

    def forget_chat(self, chat: str) -> None:
        self._chats.pop(chat, None)
        self._me().groups.rotate(chat)
        self._me().save()

    async def _chat(self, chat: str) -> _Chat | None:
        known = self._chats.get(chat)
        if known is None:
            for summary in (await self._request("list_chats"))["chats"]:
                self.learn_chat(summary)
            known = self._chats.get(chat)
        return known

    async def is_encrypted(self, chat: str) -> bool:
        if chat in self._me().encrypted_chats:
            return True
        known = await self._chat(chat)
        return known is not None and known.encrypted

    # -- devices -----------------------------------------------------------------------------

    async def _query(self, users: list[str]) -> list[DeviceInfo]:
        """The users' devices whose identity verifies and is the one known (trust on first use);
        a changed one is left out and reported."""
        store = self._me()
        reply = await self._call("keys_query", users=users)
        found: dict[str, list[DeviceInfo]] = {user: [] for user in users}
        changed = False
        for entry in reply["devices"]:
            if entry["identity"] is None:
                continue
            try:
                identity = msgspec.convert(entry["identity"], DeviceIdentity)
                info = verify_identity(identity, entry["user"], entry["device"])
            except (msgspec.ValidationError, E2EError) as exc:
                log.warning("device %s/%s: %s", entry["user"], entry["device"], exc)
                continue
            check = store.devices.check(info)
            if isinstance(check, IdentityKeyChanged):
                what = (
                    "revoked device announced again" if check.revoked else "identity keys changed"
                )
                log.warning("%s: %s/%s", what, info.user, info.device)
                self._notices.append(check)
                continue
            changed |= isinstance(check, NewDevice)
            found.setdefault(info.user, []).append(info)
        if changed:
            store.save()
        self._devices.update(found)
        return [device for user in users for device in found.get(user, [])]

    async def devices_of(self, users: list[str]) -> list[DeviceInfo]:
        """The trusted devices of `users` (queried once, again after a `device_list` event)."""
        unknown = sorted({u for u in users if u not in self._devices})
        if unknown:
            await self._query(unknown)
        return [d for user in users for d in self._devices.get(user, [])]

    async def _sender(self, user: str, device: str) -> DeviceInfo | None:
        known = self._me().devices.get(user, device)
        if known is not None:
            return known
        for info in await self._query([user]):
            if info.device == device:
                return info
        return None

    async def fingerprint(self, user: str) -> str:
        """The safety number of this user and `user` (the same on both sides)."""
        me = self._me().me
        async with self._lock:  # a reply must not land after a revocation handled meanwhile
            mine = [d.ed25519 for d in await self._query([me.user])] + [me.ed25519]
            theirs = [d.ed25519 for d in await self._query([user])]
        return await asyncio.to_thread(safety_number, me.user, mine, user, theirs)

    # -- sending -----------------------------------------------------------------------------

    async def encrypt(self, chat: str, content: dict[str, Any]) -> dict[str, Any]:
        """Share the chat's session with every member device lacking it, then encrypt
        `content`; returns the `e2e` envelope (wire form). One send (or event being handled) at
        a time per device."""
        async with self._lock:
            store = self._me()
            known = await self._chat(chat)
            members = sorted(known.members) if known is not None else [store.me.user]
            devices = await self.devices_of(members)
            to_share = store.groups.share(chat, devices)
            if to_share:
                try:
                    await self._share(to_share)
                except BaseException:
                    store.groups.rotate(chat)  # some may lack the key: start afresh next time
                    store.save()
                    raise
            envelope = store.groups.encrypt(chat, content)
            store.save()
            return msgspec.to_builtins(envelope)  # type: ignore[no-any-return]

    async def _share(self, to_share: list[tuple[DeviceInfo, Any]]) -> None:
        await self._send_olm([(device, msgspec.to_builtins(key)) for device, key in to_share])

    async def _send_olm(self, contents: list[tuple[DeviceInfo, dict[str, Any]]]) -> None:
        """Olm-encrypt each content for its device (claiming a key and starting a session with
        a device met for the first time) and send them all to-device."""
        store = self._me()
        fresh = [d for d, _ in contents if not store.olm.has_session(d)]
        if fresh:
            await self._start_sessions(fresh)
        messages = []
        for device, content in contents:
            if store.olm.has_session(device):
                payload = store.olm.encrypt(device, content)
                messages.append({"device": device.device, "payload": payload})
            else:
                log.warning("no key for %s/%s: nothing sent to it", *device_name(device))
        store.save()
        for start in range(0, len(messages), MAX_TARGETS):
            await self._call("send_to_device", messages=messages[start : start + MAX_TARGETS])

    async def _start_sessions(self, devices: list[DeviceInfo]) -> None:
        store = self._me()
        by_id = {d.device: d for d in devices}
        ids = sorted(by_id)
        keys: list[dict[str, Any]] = []
        for start in range(0, len(ids), MAX_TARGETS):
            claimed = await self._call("keys_claim", devices=ids[start : start + MAX_TARGETS])
            keys.extend(claimed["keys"])
        for key in keys:
            device = by_id.get(key["device"])
            if device is None or device.user != key["user"]:
                continue
            try:
                store.olm.start(
                    device, key["id"], key["key"], key["signature"], fallback=bool(key["fallback"])
                )
            except E2EError as exc:
                log.warning("cannot start a session with %s/%s: %s", *device_name(device), exc)

    async def encrypt_attachment(self, path: Path) -> tuple[Path, AttachmentKey]:
        """Encrypt a file for upload into a temporary file (the caller deletes its directory)."""
        folder = Path(tempfile.mkdtemp(prefix="pigeon-e2e-"))
        sealed = folder / "encrypted"
        key = await asyncio.to_thread(encrypt_file, path, sealed)
        return sealed, key

    # -- receiving ---------------------------------------------------------------------------

    def take_notices(self) -> list[E2ENotice]:
        """Notices raised outside event handling (a key change seen while sending)."""
        notices, self._notices = self._notices, []
        return notices

    async def process(self, event: Event) -> list[Event | E2ENotice]:
        """What the application gets for one inbox event; never raises but for cancellation:
        an error (a lost connection, a full disk, a malformed reply) makes an encrypted
        message `Unreadable` and lets any other event through; only the error's type is
        logged, never its text (it could quote content)."""
        try:
            async with self._lock:  # a rotation must not land between a send's share and encrypt
                out = await self._process(event)
        except Exception as exc:
            log.warning(
                "e2e: could not handle a %s event: %s", type(event).__name__, type(exc).__name__
            )
            if isinstance(event, Message) and (
                event.e2e is not None or event.chat in self._encrypted_chats()
            ):
                out = [Unreadable(message=event, reason=f"not handled: {type(exc).__name__}")]
            else:
                out = [] if isinstance(event, ToDevice) else [event]
        notices, self._notices = self._notices, []
        return [*notices, *out]

    def _encrypted_chats(self) -> set[str]:
        return set() if self.store is None else self.store.encrypted_chats

    async def _process(self, event: Event) -> list[Event | E2ENotice]:
        out: list[Event | E2ENotice] = []
        store = self._me()
        if isinstance(event, Message) and store.waiting.discard(event.id):
            store.save()  # it came again (not acked before a restart): handled anew, once
        if (store.pending_to_device or store.pending_room_keys) and not isinstance(event, ToDevice):
            try:
                out.extend(await self._import_pending())
            except ClientError:
                pass  # still offline: tried again on a later event
            except Exception as exc:  # must not spoil the event at hand
                log.warning("e2e: kept room keys not imported: %s", type(exc).__name__)
        if isinstance(event, Message):
            if isinstance(event.e2e, E2EEnvelope):
                return [*out, await self._receive(event)]
            if event.chat in store.encrypted_chats:
                reason = "sent unencrypted in an encrypted chat"
                return [*out, Unreadable(message=event, reason=reason)]
            return [*out, event]
        if isinstance(event, ToDevice):
            return await self._to_device(event)
        if isinstance(event, ChatUpdate):
            self._chat_update(event)
        elif isinstance(event, DeviceList):
            self._device_list(event)
        elif isinstance(event, KeysExhausted):
            await self.publish_keys()
        return [*out, event]

    def _chat_update(self, event: ChatUpdate) -> None:
        store = self._me()
        info = event.chat
        if store.me.user in event.removed:
            self.forget_chat(info.id)
            return
        self._remember(info.id, info.encrypted, {m.user for m in info.members})
        self.members_changed(info.id, removed=bool(event.removed))

    def _device_list(self, event: DeviceList) -> None:
        store = self._me()
        self._devices.pop(event.user, None)  # queried again before the next share
        if event.change == "removed":
            store.groups.device_revoked(event.user, event.device)
            if (event.user, event.device) != (store.me.user, store.me.device):
                store.devices.revoke(event.user, event.device)  # a tombstone, for good
            store.save()

    async def _to_device(self, event: ToDevice) -> list[Event | E2ENotice]:
        store = self._me()
        # kept (sealed) before any await: a connection lost while fetching the sender's keys
        # or checking the chat's members must not lose the payload nor its room key
        raw = {"sender": event.sender, "sender_device": event.sender_device}
        store.pending_to_device.append({**raw, "payload": event.payload})
        store.save()
        return await self._import_pending()

    async def _open_pending(self) -> None:
        """Olm-decrypt the kept to-device payloads, oldest first; a room key (or a forwarded
        key, or a key request) is kept in turn (with the used one-time key, in the same save).
        A `ClientError` keeps the rest."""
        store = self._me()
        while store.pending_to_device:
            raw = store.pending_to_device[0]
            device = str(raw.get("sender_device"))
            try:
                sender = await self._sender(str(raw["sender"]), device)
            except ClientError:
                raise
            except Exception as exc:
                log.warning("e2e: to-device payload dropped: %s", type(exc).__name__)
                sender = None
            store.pending_to_device.pop(0)
            if sender is None:
                log.warning("to-device payload from unknown device %s", device)
                store.save()
                continue
            try:
                content = store.olm.decrypt(sender, str(raw["payload"]))
            except E2EError as exc:
                log.warning("to-device payload from %s dropped: %s", device, exc)
                store.save()
                continue
            if content.get("type") in (ROOM_KEY, FORWARDED_ROOM_KEY, ROOM_KEY_REQUEST):
                pending = {"sender": msgspec.to_builtins(sender), "content": content}
                store.pending_room_keys.append(pending)
            store.save()

    async def _import_pending(self) -> list[Event | E2ENotice]:
        """Decrypt the payloads kept by `_to_device`, then act on their contents (import a room
        key, answer a key request), oldest first; a `ClientError` (e.g. the connection lost
        while listing chats) keeps the rest for a later try (on a later event)."""
        store = self._me()
        await self._open_pending()
        out: list[Event | E2ENotice] = []
        while store.pending_room_keys:
            pending = store.pending_room_keys[0]
            try:
                sender = msgspec.convert(pending["sender"], DeviceInfo)
                content: dict[str, Any] = dict(pending["content"])
            except (KeyError, TypeError, ValueError, msgspec.ValidationError):
                log.warning("e2e: a kept room key is malformed: dropped")
                store.pending_room_keys.pop(0)
                store.save()
                continue
            out.extend(await self._act_on(sender, content))
            store.pending_room_keys.pop(0)
            store.save()
        return out

    async def _act_on(self, sender: DeviceInfo, content: dict[str, Any]) -> list[E2EResult]:
        """One kept Olm content from `sender` (verified): what it makes decryptable."""
        kind = content.get("type")
        if kind == ROOM_KEY_REQUEST:
            await self._answer(sender, content)
            return []
        if kind == FORWARDED_ROOM_KEY:
            return await self._import_forwarded(sender, content)
        return await self._import_room_key(sender, content)

    async def _import_room_key(
        self, sender: DeviceInfo, content: dict[str, Any]
    ) -> list[E2EResult]:
        chat = await self._chat(str(content.get("chat")))
        if chat is None or sender.user not in chat.members:
            log.warning("room key from %s for a chat it is not in", sender.device)
            return []
        key = self._me().groups.import_room_key(sender, content)
        if key is None:
            return []
        return self._retry_waiting(sender.curve25519, key.session_id)

    async def _import_forwarded(
        self, forwarder: DeviceInfo, content: dict[str, Any]
    ) -> list[E2EResult]:
        """A key sent in answer to this device's request: taken only if asked for, and from
        the session's own device or one of this user's (which vouches for the device it names);
        the session's device must be trusted and a member of the chat."""
        store = self._me()
        try:
            key = msgspec.convert(content, ForwardedRoomKey)
        except msgspec.ValidationError:
            log.warning("e2e: a malformed forwarded key from %s: dropped", forwarder.device)
            return []
        if not store.key_requests.asked(key.sender_key, key.session_id):
            log.warning("e2e: a forwarded key from %s not asked for: dropped", forwarder.device)
            return []
        if forwarder.curve25519 == key.sender_key:
            original: DeviceInfo | None = forwarder
        elif forwarder.user == store.me.user:
            original = await self._sender(key.sender, key.sender_device)
        else:
            log.warning("e2e: %s forwarded another device's key: dropped", forwarder.device)
            return []
        chat = await self._chat(key.chat)
        if original is None or chat is None or original.user not in chat.members:
            log.warning("e2e: a forwarded key from %s refused", forwarder.device)
            return []
        imported = store.groups.import_forwarded_key(original, content)
        if imported is None:
            log.warning("e2e: a forwarded key from %s does not match its device", forwarder.device)
            return []
        return self._retry_waiting(original.curve25519, imported.session_id)

    async def _answer(self, requester: DeviceInfo, content: dict[str, Any]) -> None:
        """Answer a key request (best effort: the requester asks again later) if `requester`
        is a current device of a member of the chat and entitled to the session."""
        store = self._me()
        try:
            request = msgspec.convert(content, KeyRequest)
        except msgspec.ValidationError:
            log.warning("e2e: a malformed key request from %s: dropped", requester.device)
            return
        try:
            chat = await self._chat(request.chat)
            if chat is None or requester.user not in chat.members:
                log.warning("e2e: key request from %s refused: not a member", requester.device)
                return
            current = await self._query([requester.user])  # a revoked one is no longer listed
            if requester not in current:
                log.warning("e2e: key request from %s refused: not listed", requester.device)
                return
            key = store.groups.forward(request, requester)
            if key is None:
                log.info("e2e: key request from %s refused: not entitled", requester.device)
                return
            await self._send_olm([(requester, msgspec.to_builtins(key))])
        except ClientError as exc:
            log.warning("e2e: key request from %s unanswered: %s", requester.device, exc.code)

    def _retry_waiting(self, sender_key: str, session_id: str) -> list[E2EResult]:
        """The messages that waited for this session, decrypted now (or unreadable); those it
        still cannot decrypt (their index is before the key's) keep waiting, unannounced."""
        store = self._me()
        entries = store.waiting.take(sender_key, session_id)
        if not entries:
            return []
        out: list[E2EResult] = []
        still: list[WaitingMessage] = []
        for entry in entries:
            try:
                message = msgspec.convert(entry.message, Message)
            except msgspec.ValidationError:
                log.warning("e2e: a kept waiting message is malformed: dropped")
                continue
            result = self._open(message)
            if isinstance(result, MissingKey):
                still.append(entry)
            else:
                out.append(result)
        store.waiting.put_back(still)
        store.save()
        return out

    async def _receive(self, message: Message) -> E2EResult:
        """An encrypted message from the inbox: decrypted, or kept and its key asked for."""
        store = self._me()
        result = self._open(message)
        if not isinstance(result, MissingKey):
            store.save()
            return result
        entry = WaitingMessage(
            sender_key=result.sender_key,
            session_id=result.session_id,
            message_id=message.id,
            message=msgspec.to_builtins(message),
            since=self._clock(),
        )
        dropped = store.waiting.add(entry, cap=self.config.max_waiting)
        if dropped:
            log.warning(
                "e2e: more than %d messages wait for a key: the oldest %d dropped",
                self.config.max_waiting,
                len(dropped),
            )
        store.save()
        await self._ask_for_key(message, result)
        return WaitingForKey(message=message, session_id=result.session_id)

    def _open(self, message: Message) -> DecryptedMessage | Unreadable | MissingKey:
        store = self._me()
        if store.devices.is_revoked(message.sender, message.sender_device):
            return Unreadable(message=message, reason="the sender's device was revoked")
        envelope = msgspec.convert(msgspec.to_builtins(message.e2e), Envelope)
        result = store.groups.decrypt(
            message.chat,
            envelope,
            sender=message.sender,
            sender_device=message.sender_device,
            message_id=message.id,
        )
        if isinstance(result, MissingKey):
            return result
        if not isinstance(result, Decrypted):
            reason = getattr(result, "reason", type(result).__name__.lower())
            return Unreadable(message=message, reason=reason)
        known = store.devices.get(result.sender, result.sender_device)
        if known is None or known.ed25519 != result.sender_ed25519:
            return Unreadable(message=message, reason="sender keys not in the device list")
        return _decrypted(message, result)

    async def _ask_for_key(self, message: Message, missing: MissingKey) -> None:
        """`_request_key`, best effort: never raises."""
        try:
            await self._request_key(message, missing)
        except Exception as exc:
            log.warning("e2e: key request not sent: %s", type(exc).__name__)

    async def _request_key(self, message: Message, missing: MissingKey) -> bool:
        """Ask the sender's device and this user's other devices for the key to `missing`'s
        session, over Olm; at most once per session per `key_request_interval` (recorded in
        the store before sending, so a flood of such messages sends one, and a restart does
        not reset it). Returns whether a request went out."""
        store = self._me()
        now = self._clock()
        interval = self.config.key_request_interval
        if not store.key_requests.due(missing.sender_key, missing.session_id, now, interval):
            return False
        store.key_requests.sent(missing.sender_key, missing.session_id, now)
        store.save()
        targets = await self._key_holders(message, missing)
        if not targets:
            return False
        request = KeyRequest(
            chat=missing.chat,
            sender_key=missing.sender_key,
            session_id=missing.session_id,
            message_index=missing.message_index,
        )
        await self._send_olm([(d, msgspec.to_builtins(request)) for d in targets])
        return True

    async def ask_for_waiting_keys(self) -> int:
        """After a connect's sync (`PigeonClient` calls it in the background, once per
        connection): ask again for the key of each session that kept messages wait for, as
        when one of its messages arrives (once per session per `key_request_interval`, as
        recorded in the store), so that a message that waited across a restart or a lost
        connection (its request, or the answer, lost; the key's holder offline then) is not
        left waiting until the session's next message. One session at a time under the lock,
        so events are handled in between. Best effort: never raises (but for cancellation),
        and stops at the first failure (a lost connection: the next connect asks again).
        Returns the number of requests sent."""
        await self._published.wait()  # the store is open
        store = self._me()
        oldest: dict[tuple[str, str], WaitingMessage] = {}
        for entry in store.waiting.all():
            oldest.setdefault((entry.sender_key, entry.session_id), entry)
        sent = 0
        try:
            for entry in oldest.values():
                async with self._lock:
                    sent += await self._ask_again(entry)
        except Exception as exc:
            level = logging.INFO if isinstance(exc, ConnectionLost) else logging.WARNING
            log.log(level, "e2e: key requests for waiting messages stopped: %s", type(exc).__name__)
        return sent

    async def _ask_again(self, entry: WaitingMessage) -> bool:
        """The key request for a kept message's session, if still missing and due."""
        store = self._me()
        now, interval = self._clock(), self.config.key_request_interval
        if not store.key_requests.due(entry.sender_key, entry.session_id, now, interval):
            return False
        try:
            message = msgspec.convert(entry.message, Message)
        except msgspec.ValidationError:
            return False
        missing = self._open(message)  # the key may have come meanwhile, the sender revoked
        if not isinstance(missing, MissingKey):
            return False
        return await self._request_key(message, missing)

    async def _key_holders(self, message: Message, missing: MissingKey) -> list[DeviceInfo]:
        """Who may hold the key: the message's sender device (if its key is the envelope's)
        and this user's other devices; nobody if this user is not in the chat."""
        store = self._me()
        chat = await self._chat(missing.chat)
        if chat is None or store.me.user not in chat.members:
            return []
        targets: list[DeviceInfo] = []
        sender = await self._sender(message.sender, message.sender_device)
        if sender is not None and sender.curve25519 == missing.sender_key:
            targets.append(sender)
        for device in await self.devices_of([store.me.user]):
            if device not in targets:
                targets.append(device)
        return [d for d in targets if d.curve25519 != store.me.curve25519]


def _decrypted(message: Message, result: Decrypted) -> DecryptedMessage:
    content = result.content
    body = content.get("body")
    key: AttachmentKey | None = None
    attachment = message.attachment
    described = content.get("attachment")
    if isinstance(described, dict):
        try:
            key = msgspec.convert(described.get("key"), AttachmentKey)
        except msgspec.ValidationError:
            key = None
        if attachment is not None:  # what the sender said the file is (the server saw none)
            attachment = msgspec.structs.replace(
                attachment,
                content_type=described.get("content_type"),
                filename=described.get("filename"),
                size=described.get("size"),
            )
    return DecryptedMessage(
        id=message.id,
        chat=message.chat,
        seq=message.seq,
        sender=message.sender,
        sender_device=message.sender_device,
        cmid=message.cmid,
        at=message.at,
        body=body if isinstance(body, str) else None,
        attachment=attachment if isinstance(attachment, Attachment) else None,
        e2e=message.e2e,
        sender_ed25519=result.sender_ed25519,
        attachment_key=key,
        content=content,
    )


def device_name(device: DeviceInfo) -> tuple[str, str]:
    return device.user, device.device
