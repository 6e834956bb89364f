"""Entities of the product: users, devices, chats and their members, messages.

Times are integer milliseconds since the Unix epoch everywhere (store, wire, SDK) so that no layer
guesses a unit or a time zone. Structs are msgspec structs: cheap to build and to encode.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

ChatKind = Literal["direct", "group"]
Role = Literal["admin", "member"]
#: Who may see a user's online status and last seen: people sharing a chat with them, or nobody.
Visibility = Literal["chats", "nobody"]
PresenceStatus = Literal["online", "offline", "unknown"]


class User(msgspec.Struct, frozen=True, kw_only=True):
    """A person with an account; owns up to `Limits.max_devices_per_user` devices."""

    id: str
    username: str
    created_at: int


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """What login needs to see of a user: never leaves the accounts service."""

    user_id: str
    username: str
    password_hash: str


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """One logged-in client of a user: the unit that holds a connection and an inbox."""

    id: str
    user_id: str
    name: str
    created_at: int


class Member(msgspec.Struct, frozen=True, kw_only=True):
    """A chat participant and their role."""

    user: str
    role: Role = "member"


class ChatInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A chat's identity and membership. `version` grows on every membership change and
    guards concurrent edits (compare-and-set in the store)."""

    id: str
    kind: ChatKind
    name: str | None
    created_by: str
    created_at: int
    members: list[Member]
    version: int = 0
    #: Created end-to-end encrypted: its messages carry `e2e` envelopes, never a plaintext body.
    encrypted: bool = False

    def role_of(self, user_id: str) -> Role | None:
        """The user's role in this chat, or None when they are not a participant."""
        for m in self.members:
            if m.user == user_id:
                return m.role
        return None

    def member_ids(self) -> list[str]:
        """Participant user ids, in join order."""
        return [m.user for m in self.members]


class ChatSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One row of a user's conversation list."""

    id: str
    kind: ChatKind
    name: str | None
    members: list[str]
    last_seq: int
    last_activity_at: int
    last_sender: str | None
    last_preview: str | None
    unread: int
    #: The chat was created end-to-end encrypted (its previews are then always null).
    encrypted: bool = False


class Attachment(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Media a message carries, as recipients see it: enough to show a placeholder (type, size,
    dimensions, whether a thumbnail exists) before asking for a download URL by `id`."""

    id: str
    content_type: str | None = None
    size: int | None = None
    sha256: str | None = None
    filename: str | None = None
    encrypted: bool = False
    meta: dict[str, Any] = {}


class MemberReceipt(msgspec.Struct, frozen=True, kw_only=True):
    """Per-member receipt detail of one message: when it was delivered to and read by them."""

    user: str
    delivered_at: int | None
    read_at: int | None


class PresenceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A user's announced presence: online, or offline since `last_seen` (None: never seen)."""

    online: bool
    last_seen: int | None = None
