"""Events that travel through a device's durable inbox.

Every event a device must not miss (a message, a receipt, a chat change, its user's read marker)
is written to that device's inbox in the same transaction as the change that caused it, numbered
by a per-device, gap-free sequence `iseq`. A device acks cumulatively by `iseq`; a device that sees
a gap knows something was lost in transit and asks for a resync. The JSON encoding of these structs
is their wire format (docs/protocol.md), encoded once per event however many devices receive it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from pigeon.domain.keys import DeviceChange, E2EEnvelope
from pigeon.domain.models import Attachment, ChatInfo, PresenceStatus

ReceiptKind = Literal["delivered", "read"]
ChatChange = Literal["created", "members", "left"]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag="message", tag_field="type"):
    """A chat message as recipients see it. `seq` orders it within its chat (gap-free)."""

    id: str
    chat: str
    seq: int
    sender: str
    sender_device: str
    cmid: str
    at: int
    body: str | None = None
    attachment: Attachment | None = None
    #: An encrypted message carries this instead of a body (left out of plain messages).
    e2e: E2EEnvelope | msgspec.UnsetType = msgspec.UNSET


class Receipt(msgspec.Struct, frozen=True, kw_only=True, tag="receipt", tag_field="type"):
    """`user` has received (or read) every message of `chat` up to `seq`. `all_seq` is the
    lowest mark of the same kind among all members but the receipt's recipient: that user's
    messages up to `all_seq` have reached every other member (group aggregation). A read
    receipt implies delivery, so a device may get `read` without a `delivered` before it."""

    chat: str
    user: str
    kind: ReceiptKind
    seq: int
    all_seq: int
    at: int


class ChatUpdate(msgspec.Struct, frozen=True, kw_only=True, tag="chat_update", tag_field="type"):
    """The chat was created, or its membership changed (`added`/`removed`) by user `by`.
    `chat` is the state after the change; a removed user gets it too, then no more events."""

    chat: ChatInfo
    change: ChatChange
    by: str
    at: int
    added: list[str] = []
    removed: list[str] = []


class ReadState(msgspec.Struct, frozen=True, kw_only=True, tag="read_state", tag_field="type"):
    """The user read `chat` up to `seq` on another of their devices."""

    chat: str
    seq: int
    at: int


class DeviceList(msgspec.Struct, frozen=True, kw_only=True, tag="device_list", tag_field="type"):
    """`user` added a device, the device published its identity keys, or it was revoked: go
    to everyone sharing a chat with the user and to the user's other devices, so that senders
    share keys with a new device and stop encrypting for a revoked one (`keys_query` again)."""

    user: str
    device: str
    change: DeviceChange
    at: int


class ToDevice(msgspec.Struct, frozen=True, kw_only=True, tag="to_device", tag_field="type"):
    """An opaque payload one device sent to this one (`send_to_device`): Olm-encrypted room
    keys, typically. No chat, no seq; delivered, acked and retained like any inbox entry."""

    sender: str
    sender_device: str
    payload: str
    at: int


class KeysExhausted(
    msgspec.Struct, frozen=True, kw_only=True, tag="keys_exhausted", tag_field="type"
):
    """This device's one-time keys ran out: a claim just got its fallback key (the first time
    since it was uploaded). Upload one-time keys and a new fallback key (`keys_upload`)."""

    at: int


Event = Message | Receipt | ChatUpdate | ReadState | DeviceList | ToDevice | KeysExhausted

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    """The event's canonical JSON encoding (also its wire form)."""
    return _encoder.encode(event)


def decode_event(raw: bytes) -> Event:
    """Inverse of `encode_event`."""
    return _decoder.decode(raw)


class InboxEntry(msgspec.Struct, frozen=True):
    """One event in one device's inbox, in its encoded form (decoded only where needed)."""

    iseq: int
    raw: bytes


class InboxPage(msgspec.Struct, frozen=True):
    """A page of a device's inbox read in one snapshot: the deliverable entries, the highest
    iseq ever issued to the device (`head`) and its cumulative ack, as of that snapshot."""

    entries: list[InboxEntry]
    head: int
    acked: int


class Delivery(msgspec.Struct, frozen=True):
    """An inbox entry just committed for `device`, to be pushed if the device is online."""

    device: str
    iseq: int
    raw: bytes


def inbox_frame(iseq: int, raw: bytes) -> bytes:
    """The frame a device receives for one inbox entry (see docs/protocol.md, `event`)."""
    return b'{"t":"event","iseq":%d,"event":%s}' % (iseq, raw)


class PresenceFrame(msgspec.Struct, frozen=True, kw_only=True, tag="presence", tag_field="t"):
    """Ephemeral (never stored): `user` is now online, offline since `last_seen`, or `unknown`
    (they hide their presence)."""

    user: str
    status: PresenceStatus
    last_seen: int | None = None


class TypingFrame(msgspec.Struct, frozen=True, kw_only=True, tag="typing", tag_field="t"):
    """Ephemeral (never stored): `user` (on `device`) started or stopped typing in `chat`. A
    `typing: true` expires after `ttl_ms` unless renewed; the server also sends `false` then."""

    chat: str
    user: str
    device: str
    typing: bool
    ttl_ms: int = 0


def encode_frame(frame: PresenceFrame | TypingFrame) -> bytes:
    """The wire form of an ephemeral frame."""
    return _encoder.encode(frame)
