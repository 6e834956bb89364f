"""The operator's use cases (`pigeon admin`): accounts, devices, chats, invites and what the
store holds, by name where an operator knows names.

It exists so that the command line stays a thin shell over rules kept in the core: disabling,
enabling and revoking go through `AccountService` (whose bus frames close live connections),
creating a user goes through the same checks as a registration, and every read is a port method
of the store. The command line builds it on the configured store, with a bus that reaches the
running nodes (docs/architecture.md, "Admin").
"""

from __future__ import annotations

import msgspec

from pigeon.domain.errors import NotFound
from pigeon.domain.models import Device, User
from pigeon.ports import (
    AccountRecord,
    ChatRecord,
    Clock,
    InviteBatch,
    MemberRecord,
    PushQueue,
    Store,
)
from pigeon.services.accounts import AccountService

#: Dead letters counted by `stats` at most (the push queues keep the newest 10 000).
DEAD_LETTERS_COUNTED = 10_000


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """What the store holds, for `pigeon admin stats` (two snapshots: accounts, then chats and
    messages; push is None where the store has no push queue)."""

    users: int
    disabled_users: int
    devices: int
    chats: int
    messages: int
    #: Of `messages`, those whose body is kept (waiting for a device's ack).
    bodies: int
    #: Inbox entries waiting for their device's ack, and the age of the oldest (seconds).
    inbox_entries: int
    oldest_inbox_age: float | None
    push_pending: int | None
    dead_letters: int | None


class AdminService:
    """An operator's reads and changes, over the store's ports and the accounts service."""

    def __init__(
        self,
        store: Store,
        accounts: AccountService,
        clock: Clock,
        push_queue: PushQueue | None = None,
    ) -> None:
        self._store = store
        self._accounts = accounts
        self._clock = clock
        self._push = push_queue

    async def account(self, username: str) -> AccountRecord:
        """A user's record by name (`NotFound` if none)."""
        record = await self._store.accounts.account(username)
        if record is None:
            raise NotFound(f"no user named {username!r}")
        return record

    async def users(self, limit: int, after: str | None = None) -> list[AccountRecord]:
        """A page of users in name order, after the name `after`."""
        return await self._store.accounts.list_accounts(limit, after)

    async def create_user(self, username: str, password: str) -> User:
        """Create an account, whatever the server's registration mode (the operator decides);
        the name and password rules of a registration apply."""
        return await self._accounts.register(username, password, by_operator=True)

    async def disable(self, username: str) -> tuple[AccountRecord, list[Device]]:
        """Disable the user: no login, no token; their live connections are closed. Returns
        their record and the devices told to close."""
        record = await self.account(username)
        return record, await self._accounts.disable(record.id)

    async def enable(self, username: str) -> AccountRecord:
        """Let a disabled user log in and use their devices again."""
        record = await self.account(username)
        await self._accounts.enable(record.id)
        return record

    async def devices(self, username: str) -> list[Device]:
        """The user's devices, oldest first."""
        return await self._accounts.devices((await self.account(username)).id)

    async def revoke(self, username: str, device_id: str) -> None:
        """Revoke one of the user's devices (its live connection is closed)."""
        await self._accounts.revoke((await self.account(username)).id, device_id)

    async def chats(self, limit: int, username: str | None = None) -> list[ChatRecord]:
        """Chats (of `username`, if given), newest activity first."""
        user_id = None if username is None else (await self.account(username)).id
        return await self._store.chats.chat_records(limit, user_id)

    async def chat(self, chat_id: str) -> tuple[ChatRecord, list[MemberRecord]]:
        """One chat and its members with their roles and marks."""
        record = await self._store.chats.chat_record(chat_id)
        if record is None:
            raise NotFound(f"no chat {chat_id!r}")
        return record, await self._store.chats.member_records(chat_id)

    async def create_invites(self, count: int, valid_days: float) -> list[str]:
        """New single-use invite codes (shown once: only their hashes are kept)."""
        return await self._accounts.create_invites(count, valid_days)

    async def invites(self) -> list[InviteBatch]:
        """The invite codes still usable, by batch (codes are kept hashed: counts only)."""
        return await self._store.accounts.list_invites(self._clock.now_ms())

    async def stats(self) -> Stats:
        """Counts of what the store holds, and the push queue's backlog if there is one."""
        now = self._clock.now_ms()
        accounts = await self._store.accounts.account_counts()
        held = await self._store.chats.store_counts()
        pending = dead = None
        if self._push is not None:
            dead = len(await self._push.dead_letters(DEAD_LETTERS_COUNTED))
            depth = getattr(self._push, "depth", None)  # a `PushQueueStats`, if it is one
            if depth is not None:
                pending = (await depth(now)).pending
        oldest = held.oldest_inbox_at
        return Stats(
            users=accounts.users,
            disabled_users=accounts.disabled,
            devices=accounts.devices,
            chats=held.chats,
            messages=held.messages,
            bodies=held.bodies,
            inbox_entries=held.inbox,
            oldest_inbox_age=None if oldest is None else max(0.0, (now - oldest) / 1000),
            push_pending=pending,
            dead_letters=dead,
        )
