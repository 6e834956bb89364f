"""Megolm: one sender ratchet per chat and device, whose key is shared over Olm.

Why it exists: encrypting a group message once per member device would cost a hundred Olm
encryptions per message in a hundred-device chat. Instead each sender keeps an *outbound group
session* per chat, encrypts each message once with it, and sends its session key to every
member device once, Olm-encrypted (a "room key"). Receivers keep *inbound group sessions*.

What it guarantees:
- **Rotation.** A new session (and new keys for everyone) when a member leaves or is removed,
  when one of the devices it was shared with is revoked or no longer listed among the members'
  devices, and after `RotationPolicy.max_messages` messages or `max_age` seconds. A removed
  member or revoked device never gets a key to a later message. A device added later gets the
  current key at its current index: it reads what is sent after it joined, not before.
- **Authenticity.** An inbound session is bound to the device that sent its room key over Olm
  (verified keys) and to its chat; a message decrypts only if the envelope's sender key, the
  server's sender device and the chat agree with it. vodozemac checks each message's signature,
  so a tampered ciphertext is refused.
- **Decrypting never raises.** `decrypt` returns a `DecryptResult`: `Decrypted`, `MissingKey`
  ("waiting for this message": ask the sender's devices for the key, or wait for it),
  `Replayed` (a message index already used by another message), or `Undecryptable`.
- **Key requests answer only what the asker was entitled to.** A device that lacks a key sends
  a `KeyRequest`; `forward` answers it with a `ForwardedRoomKey` (vodozemac's `export_at`)
  only for this user's other devices (from the index this device holds it), or for a device
  this device shared one of its own sessions with, from the index it shared it at (each own
  session records who got it, and at which index). Everyone else gets nothing: a device added
  later, or one that was never sent the session, reads no earlier message through a request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec
import vodozemac

from pigeon.client.e2e.errors import NoSession
from pigeon.client.e2e.keys import MEGOLM_ALGORITHM, DeviceInfo

ROOM_KEY = "room_key"
ROOM_KEY_REQUEST = "room_key_request"
FORWARDED_ROOM_KEY = "forwarded_room_key"
DeviceRef = tuple[str, str, str]  # (user, device, curve25519)


class RotationPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When an outbound session is replaced even though membership did not change."""

    #: Messages encrypted with one session.
    max_messages: int = 100
    #: Seconds since the session was created.
    max_age: float = 7 * 24 * 3600.0


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """An encrypted message body: the `e2e` field of a message (docs/protocol.md)."""

    algorithm: str
    sender_key: str
    session_id: str
    ciphertext: str


class RoomKey(msgspec.Struct, frozen=True, kw_only=True):
    """A Megolm session key for one chat, as the content of an Olm to-device payload."""

    type: Literal["room_key"] = "room_key"
    algorithm: str = MEGOLM_ALGORITHM
    chat: str
    session_id: str
    session_key: str


class KeyRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request for a Megolm session key this device lacks, as the content of an Olm
    to-device payload to the session's sender device and this user's other devices.
    `message_index`: of the message that could not be decrypted (informative)."""

    type: Literal["room_key_request"] = "room_key_request"
    chat: str
    sender_key: str
    session_id: str
    message_index: int | None = None


class ForwardedRoomKey(msgspec.Struct, frozen=True, kw_only=True):
    """A Megolm session key sent again in answer to a `KeyRequest`, as the content of an Olm
    to-device payload: exported from `first_index` (vodozemac's `export_at`), and naming the
    device whose session it is (`sender*`), which may be another than the one forwarding it."""

    type: Literal["forwarded_room_key"] = "forwarded_room_key"
    algorithm: str = MEGOLM_ALGORITHM
    chat: str
    session_id: str
    session_key: str
    first_index: int
    sender: str
    sender_device: str
    sender_key: str
    sender_ed25519: str


class Decrypted(msgspec.Struct, frozen=True, kw_only=True):
    """The message's content, and who sent it (verified keys)."""

    content: dict[str, Any]
    sender: str
    sender_device: str
    sender_ed25519: str
    session_id: str
    message_index: int


class MissingKey(msgspec.Struct, frozen=True, kw_only=True):
    """No key to this message yet ("waiting for this message"): its room key has not arrived,
    or the key this device has starts at a later index. Retry when a room key for `session_id`
    is imported, or ask the sender's devices for it."""

    chat: str
    sender_key: str
    session_id: str
    message_index: int | None = None


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    """Another message already used this session's message index: the server (or someone)
    replayed a ciphertext under a new message id. Show nothing."""

    session_id: str
    message_index: int
    first_message_id: str


class Undecryptable(msgspec.Struct, frozen=True, kw_only=True):
    """The message cannot and will never decrypt: malformed, tampered with, or not from the
    device or chat it claims."""

    reason: str


DecryptResult = Decrypted | MissingKey | Replayed | Undecryptable


class _Plaintext(msgspec.Struct, frozen=True, kw_only=True):
    chat: str
    content: dict[str, Any]


class _Outbound:
    def __init__(self, session: vodozemac.GroupSession, created: float) -> None:
        self.session = session
        self.created = created
        self.shared: set[DeviceRef] = set()


class _Inbound:
    def __init__(self, session: vodozemac.InboundGroupSession, chat: str, sender: DeviceInfo):
        self.session = session
        self.chat = chat
        self.sender = sender
        #: message index -> the id of the message that used it (replay detection).
        self.seen: dict[int, str] = {}
        #: This device's own sessions: each device it was shared with, and the message index
        #: it was shared at (what that device may be sent again on request).
        self.shared: dict[DeviceRef, int] = {}


class _OutboundState(msgspec.Struct, kw_only=True):
    pickle: str
    created: float
    shared: list[DeviceRef]


class _InboundState(msgspec.Struct, kw_only=True):
    pickle: str
    chat: str
    sender: DeviceInfo
    seen: dict[int, str]
    shared: list[tuple[str, str, str, int]] = []


class GroupState(msgspec.Struct, kw_only=True):
    """What `GroupSessions.dump` gives the store: pickles and bookkeeping."""

    outbound: dict[str, _OutboundState] = {}
    inbound: list[_InboundState] = []


_decode_plaintext = msgspec.json.Decoder(_Plaintext).decode


def _ref(device: DeviceInfo) -> DeviceRef:
    return (device.user, device.device, device.curve25519)


class GroupSessions:
    """This device's outbound sessions (one per chat) and inbound sessions (by sender key and
    session id)."""

    def __init__(
        self,
        me: DeviceInfo,
        *,
        policy: RotationPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._me = me
        self.policy = policy or RotationPolicy()
        self._clock = clock
        self._outbound: dict[str, _Outbound] = {}
        self._inbound: dict[tuple[str, str], _Inbound] = {}

    # -- sending -----------------------------------------------------------------------------

    def share(self, chat: str, devices: Iterable[DeviceInfo]) -> list[tuple[DeviceInfo, RoomKey]]:
        """Before sending to `chat`, whose member devices (verified; this device's own may be
        among them) are `devices`: rotates the session if due, and returns the room keys to
        send, Olm-encrypted, to the devices that lack the current one. They count as shared
        once returned: if sending them fails, call `rotate(chat)`."""
        current = {_ref(d): d for d in devices if d.curve25519 != self._me.curve25519}
        outbound = self._outbound.get(chat)
        if outbound is None or self._due(outbound) or not outbound.shared <= current.keys():
            outbound = self._start(chat)
        key = RoomKey(
            chat=chat,
            session_id=outbound.session.session_id,
            session_key=outbound.session.session_key.to_base64(),
        )
        missing = [device for ref, device in current.items() if ref not in outbound.shared]
        outbound.shared.update(_ref(d) for d in missing)
        own = self._inbound.get((self._me.curve25519, outbound.session.session_id))
        if own is not None:  # who may ask for it again, and from which index
            index = outbound.session.message_index
            for device in missing:
                own.shared.setdefault(_ref(device), index)
        return [(device, key) for device in missing]

    def encrypt(self, chat: str, content: dict[str, Any]) -> Envelope:
        """Encrypt a message's content for `chat` with its current session (`share` first:
        `NoSession` otherwise, or when the session was rotated since)."""
        outbound = self._outbound.get(chat)
        if outbound is None:
            raise NoSession(f"no group session for chat {chat}: share it first")
        plain = msgspec.json.encode(_Plaintext(chat=chat, content=content))
        message = outbound.session.encrypt(plain)
        return Envelope(
            algorithm=MEGOLM_ALGORITHM,
            sender_key=self._me.curve25519,
            session_id=outbound.session.session_id,
            ciphertext=message.to_base64(),
        )

    def needs_rotation(self, chat: str) -> bool:
        """Whether the next `share` for `chat` starts a new session (by count or age; removals
        are seen by `share` itself)."""
        outbound = self._outbound.get(chat)
        return outbound is None or self._due(outbound)

    def rotate(self, chat: str) -> None:
        """Forget the chat's outbound session: the next `share` starts a new one. Call it when a
        member leaves or is removed."""
        self._outbound.pop(chat, None)

    def device_revoked(self, user: str, device: str) -> list[str]:
        """Forget every outbound session shared with that device (it was revoked); returns the
        chats affected."""
        chats = [
            chat
            for chat, outbound in self._outbound.items()
            if any(ref[:2] == (user, device) for ref in outbound.shared)
        ]
        for chat in chats:
            del self._outbound[chat]
        return chats

    def _due(self, outbound: _Outbound) -> bool:
        policy = self.policy
        too_old = self._clock() - outbound.created >= policy.max_age
        return too_old or outbound.session.message_index >= policy.max_messages

    def _start(self, chat: str) -> _Outbound:
        session = vodozemac.GroupSession()
        outbound = _Outbound(session, self._clock())
        self._outbound[chat] = outbound
        # This device reads its own messages (echoes, its other devices' syncs) like anyone.
        inbound = vodozemac.InboundGroupSession(session.session_key)
        self._inbound[(self._me.curve25519, session.session_id)] = _Inbound(inbound, chat, self._me)
        return outbound

    # -- receiving ---------------------------------------------------------------------------

    def import_room_key(self, sender: DeviceInfo, content: dict[str, Any]) -> RoomKey | None:
        """Keep the room key that `sender` (the verified device an Olm payload came from) sent;
        returns it, or None if `content` is not a valid room key. A key already held from an
        earlier index is kept (a later one cannot read more). The caller checks first that
        `sender` is a member of `key.chat`: this module knows no memberships."""
        try:
            key = msgspec.convert(content, RoomKey)
            if key.algorithm != MEGOLM_ALGORITHM:
                return None
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(key.session_key))
        except (msgspec.ValidationError, vodozemac.SessionKeyDecodeException, ValueError):
            return None
        if session.session_id != key.session_id:
            return None
        return key if self._keep(sender, key.chat, session) else None

    def import_forwarded_key(
        self, sender: DeviceInfo, content: dict[str, Any]
    ) -> ForwardedRoomKey | None:
        """Keep a key forwarded in answer to a `KeyRequest`, as a session of `sender`: the
        verified device the key names as its session's (not necessarily the one that forwarded
        it). Returns it, or None if `content` is not a valid forwarded key of that device's.
        The caller checks first that it asked for it, that the forwarding device may forward
        it (the session's own device, or one of this user's), and that `sender` is a member of
        `key.chat`."""
        try:
            key = msgspec.convert(content, ForwardedRoomKey)
            named = (key.sender, key.sender_device, key.sender_key, key.sender_ed25519)
            if key.algorithm != MEGOLM_ALGORITHM or named != (
                sender.user,
                sender.device,
                sender.curve25519,
                sender.ed25519,
            ):
                return None
            exported = vodozemac.ExportedSessionKey(key.session_key)
            session = vodozemac.InboundGroupSession.import_session(exported)
        except (msgspec.ValidationError, vodozemac.SessionKeyDecodeException, ValueError):
            return None
        if session.session_id != key.session_id:
            return None
        return key if self._keep(sender, key.chat, session) else None

    def _keep(self, sender: DeviceInfo, chat: str, session: vodozemac.InboundGroupSession) -> bool:
        """File `session` under its sender device; False if a session of that id is held for
        another chat or device. One held from an earlier index is kept."""
        where = (sender.curve25519, session.session_id)
        held = self._inbound.get(where)
        if held is not None and (held.chat != chat or held.sender != sender):
            return False
        if held is None or session.first_known_index < held.session.first_known_index:
            fresh = _Inbound(session, chat, sender)
            if held is not None:
                fresh.seen, fresh.shared = held.seen, held.shared
            self._inbound[where] = fresh
        return True

    def forward(self, request: KeyRequest, requester: DeviceInfo) -> ForwardedRoomKey | None:
        """The answer to `requester`'s `request` (a verified device that is, as the caller
        checked, a current member device of `request.chat`), or None if it is not entitled to
        the session: this user's other devices get any session held, from the first index held;
        another user's device gets a session of this device's own only if it was shared with
        it, from the index it was shared at."""
        inbound = self._inbound.get((request.sender_key, request.session_id))
        if inbound is None or inbound.chat != request.chat:
            return None
        if requester.curve25519 == self._me.curve25519:
            return None
        first = inbound.session.first_known_index
        if requester.user == self._me.user:
            index = first
        elif inbound.sender == self._me and _ref(requester) in inbound.shared:
            index = max(first, inbound.shared[_ref(requester)])
        else:
            return None
        exported = inbound.session.export_at(index)
        if exported is None:
            return None
        return ForwardedRoomKey(
            chat=inbound.chat,
            session_id=inbound.session.session_id,
            session_key=exported.to_base64(),
            first_index=index,
            sender=inbound.sender.user,
            sender_device=inbound.sender.device,
            sender_key=inbound.sender.curve25519,
            sender_ed25519=inbound.sender.ed25519,
        )

    def decrypt(
        self, chat: str, envelope: Envelope, *, sender: str, sender_device: str, message_id: str
    ) -> DecryptResult:
        """Decrypt a message of `chat` that the server says `sender`/`sender_device` sent with
        id `message_id`. Never raises."""
        if envelope.algorithm != MEGOLM_ALGORITHM:
            return Undecryptable(reason=f"unknown algorithm {envelope.algorithm!r}")
        inbound = self._inbound.get((envelope.sender_key, envelope.session_id))
        if inbound is None:
            return MissingKey(
                chat=chat, sender_key=envelope.sender_key, session_id=envelope.session_id
            )
        if inbound.chat != chat:
            return Undecryptable(reason="the session belongs to another chat")
        if (inbound.sender.user, inbound.sender.device) != (sender, sender_device):
            return Undecryptable(reason="the session belongs to another device")
        try:
            message = vodozemac.MegolmMessage.from_base64(envelope.ciphertext)
        except (vodozemac.DecodeException, ValueError) as exc:
            return Undecryptable(reason=f"malformed ciphertext: {exc}")
        index = message.message_index()
        if index < inbound.session.first_known_index:
            return MissingKey(
                chat=chat,
                sender_key=envelope.sender_key,
                session_id=envelope.session_id,
                message_index=index,
            )
        return self._open(inbound, message, index, message_id)

    def _open(
        self, inbound: _Inbound, message: vodozemac.MegolmMessage, index: int, message_id: str
    ) -> DecryptResult:
        first = inbound.seen.get(index)
        if first is not None and first != message_id:
            return Replayed(
                session_id=inbound.session.session_id, message_index=index, first_message_id=first
            )
        try:
            plaintext = inbound.session.decrypt(message).plaintext
            plain = _decode_plaintext(plaintext)
        except vodozemac.MegolmDecryptionException as exc:
            return Undecryptable(reason=f"refused: {exc}")
        except msgspec.DecodeError as exc:
            return Undecryptable(reason=f"malformed plaintext: {exc}")
        if plain.chat != inbound.chat:
            return Undecryptable(reason="the message was encrypted for another chat")
        inbound.seen[index] = message_id
        return Decrypted(
            content=plain.content,
            sender=inbound.sender.user,
            sender_device=inbound.sender.device,
            sender_ed25519=inbound.sender.ed25519,
            session_id=inbound.session.session_id,
            message_index=index,
        )

    # -- persistence -------------------------------------------------------------------------

    def dump(self, pickle_key: bytes) -> GroupState:
        """Every session pickled (encrypted) with `pickle_key`, plus bookkeeping."""
        return GroupState(
            outbound={
                chat: _OutboundState(
                    pickle=o.session.pickle(pickle_key),
                    created=o.created,
                    shared=sorted(o.shared),
                )
                for chat, o in self._outbound.items()
            },
            inbound=[
                _InboundState(
                    pickle=i.session.pickle(pickle_key),
                    chat=i.chat,
                    sender=i.sender,
                    seen=i.seen,
                    shared=[(*ref, index) for ref, index in sorted(i.shared.items())],
                )
                for i in self._inbound.values()
            ],
        )

    def restore(self, state: GroupState, pickle_key: bytes) -> None:
        """Load sessions written by `dump` (raises vodozemac's `PickleException`)."""
        self._outbound = {}
        for chat, o in state.outbound.items():
            outbound = _Outbound(
                vodozemac.GroupSession.from_pickle(o.pickle, pickle_key), o.created
            )
            outbound.shared = set(o.shared)
            self._outbound[chat] = outbound
        self._inbound = {}
        for i in state.inbound:
            session = vodozemac.InboundGroupSession.from_pickle(i.pickle, pickle_key)
            inbound = _Inbound(session, i.chat, i.sender)
            inbound.seen = dict(i.seen)
            inbound.shared = {(u, d, k): index for u, d, k, index in i.shared}
            self._inbound[(i.sender.curve25519, session.session_id)] = inbound
