"""Wire frames: one msgspec struct per frame type. docs/protocol.md documents each with examples.

Client commands are JSON text frames tagged by `t`, each with a request id `rid` that its single
reply (`ok` or `error`) echoes. Events the server pushes from a device's inbox arrive as `event`
frames (built in `pigeon.domain.events.inbox_frame`). `frame_schema()` turns these structs into
the JSON Schema served at `GET /v1/schema`, so the published description is the code itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal, get_args

import msgspec
import msgspec.inspect as mi

from pigeon.domain.events import Event, PresenceFrame, TypingFrame
from pigeon.domain.keys import (
    ClaimedKey,
    DeviceIdentity,
    DeviceKeys,
    E2EEnvelope,
    KeyCounts,
    OneTimeKey,
)
from pigeon.domain.push import PushTarget

#: The wire protocol's version, sent in `ready` and by `/healthz` and `/readyz`. It changes only
#: when a change could break a client written for the previous one (a frame, field or command
#: removed or renamed, a meaning changed); additions (commands, optional fields, event types,
#: error codes) keep it. docs/protocol.md, "Protocol version", says what a client does.
PROTOCOL_VERSION = 1

Rid = int | str
#: A non-negative integer that fits SQLite's and PostgreSQL's 64-bit integers.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Command(msgspec.Struct, tag_field="t", kw_only=True, forbid_unknown_fields=True):
    """Base of every client command."""

    rid: Rid


class Auth(Command, tag="auth"):
    """First frame of a connection that did not authenticate during the handshake."""

    token: str


class CreateChat(Command, tag="create_chat"):
    """Create a chat of the caller and `participants` (user ids): a direct chat or a group."""

    participants: list[str]
    name: str | None = None
    kind: Literal["direct", "group"] | None = None
    #: End-to-end encrypted: every message must then carry an `e2e` envelope.
    encrypted: bool = False


class ModifyParticipants(Command, tag="modify_participants"):
    """Add and/or remove members of a group (admins only)."""

    chat: str
    add: list[str] = []
    remove: list[str] = []


class LeaveChat(Command, tag="leave_chat"):
    """Leave a group."""

    chat: str


class ListChats(Command, tag="list_chats"):
    """The caller's conversations, newest activity first, with unread counts."""


class Send(Command, tag="send"):
    """Send a message; `ok` once it is durably committed. Retried with the same `cmid`, it is
    committed once."""

    chat: str
    cmid: str
    body: str | None = None
    attachment: str | None = None
    ack: Count | None = None  # an `ack` riding along (saves a command per received batch)
    #: Shown in the recipients' pushes as is (an encrypted one in end-to-end encrypted chats);
    #: the server never puts the body in a push.
    push_preview: str | None = None
    #: An encrypted message, instead of a `body` (required in an encrypted chat).
    e2e: E2EEnvelope | None = None


class Ack(Command, tag="ack"):
    """Acknowledge every inbox entry with `iseq <= upto` (cumulative)."""

    upto: Count


class Read(Command, tag="read"):
    """Mark the chat read by the caller's user up to `seq`."""

    chat: str
    seq: Count


class Receipts(Command, tag="receipts"):
    """Per-member delivery and read times of a message the caller sent."""

    chat: str
    message: str


class Sync(Command, tag="sync"):
    """Send the inbox again after `after` (heals a gap), then `synced`."""

    after: Count


class Ping(Command, tag="ping"):
    """A no-op that counts as activity for the heartbeat."""


class PresenceSubscribe(Command, tag="presence_subscribe"):
    """Watch these users' presence (each shares a chat with the caller); `ok` has their state."""

    users: list[str]


class PresenceUnsubscribe(Command, tag="presence_unsubscribe"):
    """Stop watching these users' presence."""

    users: list[str]


class SetVisibility(Command, tag="set_visibility"):
    """Who sees the caller's presence: people sharing a chat, or nobody."""

    visibility: Literal["chats", "nobody"]


class Typing(Command, tag="typing"):
    """Tell the chat's online members that the caller is typing (or stopped)."""

    chat: str
    typing: bool = True


class CreateAttachment(Command, tag="create_attachment"):
    """Declare an upload: exactly `size` bytes with this SHA-256 (lowercase hex)."""

    content_type: str
    size: Count
    sha256: str
    filename: str | None = None
    #: Client-side encrypted bytes: stored and served the same, no server thumbnail.
    encrypted: bool = False


class AttachmentUploaded(Command, tag="attachment_uploaded"):
    """The bytes are uploaded: verify them and make the attachment sendable."""

    attachment: str


class AttachmentUrl(Command, tag="attachment_url"):
    """A signed download URL of an attachment (or its thumbnail)."""

    attachment: str
    thumbnail: bool = False


class PushRegister(Command, tag="push_register"):
    """Set this device's push target (replacing any earlier one); see docs/protocol.md §3, §11."""

    target: PushTarget


class PushUnregister(Command, tag="push_unregister"):
    """Remove this device's push target."""


class PushStatus(Command, tag="push_status"):
    """This device's push target, or why a gateway removed it."""


class PushShowNames(Command, tag="push_show_names"):
    """The user's privacy setting: may pushes to their devices name the sender?"""

    show: bool


class KeysUpload(Command, tag="keys_upload"):
    """Publish this device's identity keys (once), add one-time keys, replace its fallback key;
    the reply says how many one-time keys it holds (send it empty to ask)."""

    identity: DeviceIdentity | None = None
    one_time_keys: list[OneTimeKey] = []
    fallback_key: OneTimeKey | None = None


class KeysQuery(Command, tag="keys_query"):
    """The devices and identity keys of these users (each shares a chat with the caller)."""

    users: list[str]


class KeysClaim(Command, tag="keys_claim"):
    """One key per named device, to start an Olm session with it: a one-time key, taken for
    good, or the device's fallback key when none is left."""

    devices: list[str]


class ToDeviceMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One payload of a `send_to_device`, for one device."""

    device: str
    payload: str


class SendToDevice(Command, tag="send_to_device"):
    """Opaque payloads into named devices' inboxes (no chat, no seq): room keys, typically."""

    messages: list[ToDeviceMessage]


AnyCommand = (
    Auth
    | CreateChat
    | ModifyParticipants
    | LeaveChat
    | ListChats
    | Send
    | Ack
    | Read
    | Receipts
    | Sync
    | Ping
    | PresenceSubscribe
    | PresenceUnsubscribe
    | SetVisibility
    | Typing
    | CreateAttachment
    | AttachmentUploaded
    | AttachmentUrl
    | PushRegister
    | PushUnregister
    | PushStatus
    | PushShowNames
    | KeysUpload
    | KeysQuery
    | KeysClaim
    | SendToDevice
)
COMMAND_NAMES = frozenset(c.__struct_config__.tag for c in get_args(AnyCommand))


class Envelope(msgspec.Struct):
    """What is left to read of a frame that failed to decode: enough to address the error."""

    t: Any = None
    rid: Any = None


class Ok(msgspec.Struct, tag="ok", tag_field="t"):
    """The success reply to the command with this `rid`; `result` depends on the command
    (docs/protocol.md, section 3)."""

    rid: Rid
    result: Any = None


class Error(msgspec.Struct, tag="error", tag_field="t"):
    """The failure reply to the command with this `rid` (null if it could not be read). `code`
    is stable; `temporary`: the same command may succeed if retried unchanged."""

    rid: Rid | None
    code: str
    message: str
    temporary: bool = False
    retry_after: float | msgspec.UnsetType = msgspec.UNSET  # `rate_limited` only: seconds


class Ready(msgspec.Struct, tag="ready", tag_field="t"):
    """First server frame after authentication; the inbox sync follows."""

    user: str
    device: str
    acked: int
    server_time: int
    #: `PROTOCOL_VERSION` of the server.
    protocol: int = PROTOCOL_VERSION


class Synced(msgspec.Struct, tag="synced", tag_field="t"):
    """The inbox sync is complete up to `iseq`; live events follow."""

    iseq: int


class Gap(msgspec.Struct, tag="gap", tag_field="t"):
    """Inbox entries `from`..`to` no longer exist (retention expired them); skip them."""

    from_: int = msgspec.field(name="from")
    to: int = 0
    reason: str = "expired"


class EventFrame(msgspec.Struct, tag="event", tag_field="t"):
    """One entry of the device's durable inbox: ack it by `iseq`. (Sent as bytes made by
    `inbox_frame`, the event encoded once for all its recipients; this struct describes them.)"""

    iseq: int
    event: Event


#: Every frame the server sends.
ServerFrame = Ok | Error | Ready | Synced | Gap | EventFrame | PresenceFrame | TypingFrame
#: Structures of `ok` results that no event carries, described in the schema as well.
RESULTS = (KeyCounts, DeviceKeys, ClaimedKey)


def frame_schema() -> dict[str, Any]:
    """A JSON Schema (2020-12) of every WebSocket frame, generated from the structs: a frame
    is a `ClientFrame` (a command) or a `ServerFrame`. Client frames are described as the server
    accepts them (unknown fields refused, defaults optional); server frames as the server sends
    them (every field it always sends is required; clients must ignore fields they do not
    know, which a later server may add)."""
    (client, server, *_), defs = msgspec.json.schema_components(
        (AnyCommand, ServerFrame, *RESULTS), ref_template="#/$defs/{name}"
    )
    seen: set[type] = set()
    infos = mi.multi_type_info((ServerFrame, *RESULTS))
    for struct in (s for info in infos for s in _structs(info, seen)):
        schema = defs[struct.cls.__name__]
        if not struct.cls.__struct_config__.omit_defaults:
            sent = [f.encode_name for f in struct.fields if _always_sent(f)]
            if struct.tag_field is not None:
                sent.insert(0, struct.tag_field)
            schema["required"] = sent
    defs["ClientFrame"] = {"title": "ClientFrame", "description": "A command.", **client}
    defs["ServerFrame"] = {"title": "ServerFrame", "description": "A server frame.", **server}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Pigeon WebSocket frames",
        "description": (
            f"Protocol version {PROTOCOL_VERSION}. Every frame is one JSON object: a command "
            "(ClientFrame, tagged by `t`) or a frame the server sends (ServerFrame). The "
            "`result` of an `ok` depends on its command: docs/protocol.md, section 3."
        ),
        "x-protocol-version": PROTOCOL_VERSION,
        "anyOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/ServerFrame"}],
        "$defs": defs,
    }


def _structs(t: mi.Type, seen: set[type]) -> Iterator[mi.StructType]:
    """Every struct type reachable from `t`, once each."""
    if isinstance(t, mi.StructType):
        if t.cls in seen:
            return
        seen.add(t.cls)
        yield t
        for field in t.fields:
            yield from _structs(field.type, seen)
    elif isinstance(t, mi.UnionType):
        for member in t.types:
            yield from _structs(member, seen)
    elif isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        yield from _structs(t.item_type, seen)
    elif isinstance(t, mi.DictType):
        yield from _structs(t.value_type, seen)
    elif isinstance(t, mi.Metadata):
        yield from _structs(t.type, seen)


def _always_sent(field: mi.Field) -> bool:
    """Encoded every time (a field left UNSET by default is not)."""
    return (
        field.required
        or field.default is not msgspec.NODEFAULT
        or (field.default_factory is not msgspec.NODEFAULT)
    )


_encoder = msgspec.json.Encoder()
command_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)
envelope_decoder = msgspec.json.Decoder(Envelope)


def encode(frame: msgspec.Struct) -> bytes:
    """Encode a server frame."""
    return _encoder.encode(frame)
