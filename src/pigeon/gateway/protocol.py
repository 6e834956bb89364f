"""Wire frames: one msgspec struct per frame type. docs/protocol.md documents each with examples.

Client commands are JSON text frames tagged by `t`, each with a request id `rid` that its single
reply (`ok` or `error`) echoes. Events the server pushes from a device's inbox arrive as `event`
frames (built in `pigeon.domain.events.inbox_frame`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec

from pigeon.domain.push import PushTarget

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
    participants: list[str]
    name: str | None = None
    kind: Literal["direct", "group"] | None = None


class ModifyParticipants(Command, tag="modify_participants"):
    chat: str
    add: list[str] = []
    remove: list[str] = []


class LeaveChat(Command, tag="leave_chat"):
    chat: str


class ListChats(Command, tag="list_chats"):
    pass


class Send(Command, tag="send"):
    chat: str
    cmid: str
    body: str | None = None
    attachment: str | None = None
    ack: Count | None = None  # an `ack` riding along (saves a command per received batch)
    #: Shown in the recipients' pushes as is (an encrypted one in end-to-end encrypted chats);
    #: the server never puts the body in a push.
    push_preview: str | None = None


class Ack(Command, tag="ack"):
    upto: Count


class Read(Command, tag="read"):
    chat: str
    seq: Count


class Receipts(Command, tag="receipts"):
    chat: str
    message: str


class Sync(Command, tag="sync"):
    after: Count


class Ping(Command, tag="ping"):
    pass


class PresenceSubscribe(Command, tag="presence_subscribe"):
    users: list[str]


class PresenceUnsubscribe(Command, tag="presence_unsubscribe"):
    users: list[str]


class SetVisibility(Command, tag="set_visibility"):
    visibility: Literal["chats", "nobody"]


class Typing(Command, tag="typing"):
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
)
COMMAND_NAMES = frozenset(c.__struct_config__.tag for c in get_args(AnyCommand))


class Envelope(msgspec.Struct):
    """What is left to read of a frame that failed to decode: enough to address the error."""

    t: Any = None
    rid: Any = None


class Ok(msgspec.Struct, tag="ok", tag_field="t"):
    rid: Rid
    result: Any = None


class Error(msgspec.Struct, tag="error", tag_field="t"):
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


class Synced(msgspec.Struct, tag="synced", tag_field="t"):
    """The inbox sync is complete up to `iseq`; live events follow."""

    iseq: int


class Gap(msgspec.Struct, tag="gap", tag_field="t"):
    """Inbox entries `from_`..`to` no longer exist (retention expired them); skip them."""

    from_: int = msgspec.field(name="from")
    to: int = 0
    reason: str = "expired"


_encoder = msgspec.json.Encoder()
command_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)
envelope_decoder = msgspec.json.Decoder(Envelope)


def encode(frame: msgspec.Struct) -> bytes:
    """Encode a server frame."""
    return _encoder.encode(frame)
