"""DynamoDB implementation of `ChatStore`: chats, membership, a user's chats.

Why it exists: the seeds' store needs chats whose changes reach every member's inbox exactly
once, with the membership change itself, although DynamoDB has no multi-statement transaction
that can hold a group's inbox entries. A change is one transaction of its items (chat, members,
direct pair) plus the `ChatUpdate`'s commit record, handed to the append protocol of `inbox.py`
(`append_events` with `extra`): the change and its events are all or nothing, and the entries
follow in idempotent steps (docs/architecture.md, "DynamoDB store", "chats").
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from pigeon.adapters.store.dynamodb import inbox, push
from pigeon.adapters.store.dynamodb.codec import (
    PK,
    SK,
    Expr,
    Item,
    Value,
    bool_of,
    encode,
    int_of,
    key,
    live_filter,
    num_key,
    opt_int,
    opt_str,
    str_of,
    strs_of,
)
from pigeon.adapters.store.dynamodb.db import DynamoDb, TransactionCancelled
from pigeon.adapters.store.dynamodb.inbox import Policy
from pigeon.adapters.store.dynamodb.keyspace import (
    chat_key,
    head_key,
    member_key,
    message_key,
    user_key,
)
from pigeon.adapters.store.dynamodb.tables import ACCOUNTS, CHATS, INBOX, MESSAGES, Table
from pigeon.domain.errors import BadRequest, Conflict, NotFound, Unavailable
from pigeon.domain.events import ChatChange, ChatUpdate, Delivery, encode_event
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, ChatSummary, Member, Role
from pigeon.ports import ChatRecord, ChatStore, InboxDepth, MemberRecord, StoreCounts

BY_USER = CHATS.index("by_user")
#: Items of one transaction besides the `ChatUpdate`'s record (DynamoDB's limit is 100).
_MAX_CHANGE = 99
_KINDS = ("delivered", "read")


def pair_key(user_a: str, user_b: str) -> Item:
    """The one direct chat of two users, whatever their order."""
    a, b = sorted((user_a, user_b))
    return key(f"P#{a}#{b}")


def _member_item(chat_id: str, m: Member, pos: int, seq: int) -> Item:
    values: dict[str, Value | None] = {
        "role": m.role,
        "pos": pos,
        "delivered_seq": seq,
        "read_seq": seq,
        BY_USER.pk: m.user,
        BY_USER.sk: chat_id,
    }
    return member_key(chat_id, m.user) | encode(values)


def _info(chat: Item, members: list[Item]) -> ChatInfo:
    ordered = sorted(members, key=lambda m: int_of(m, "pos"))
    return ChatInfo(
        id=str_of(chat, PK)[2:],
        kind=str_of(chat, "kind"),  # type: ignore[arg-type]
        name=opt_str(chat, "name"),
        created_by=str_of(chat, "created_by"),
        created_at=int_of(chat, "created_at"),
        version=int_of(chat, "version"),
        members=[Member(user=str_of(m, SK)[2:], role=_role(m)) for m in ordered],
        encrypted=bool_of(chat, "encrypted"),
    )


def _role(member: Item) -> Role:
    return "admin" if str_of(member, "role") == "admin" else "member"


async def partners(db: DynamoDb, user_id: str) -> set[str]:
    """The users who share a committed chat with `user_id` (the user too, if in any chat):
    the user's chats from `by_user`, then their rosters (one BatchGet)."""
    expr = Expr()
    cond = f"{expr.name(BY_USER.pk)} = {expr.value(user_id)}"
    items = await db.query_items(CHATS, cond, expr, index=BY_USER)
    ids = {str_of(i, PK) for i in items}
    chats = await db.batch_get(CHATS, [key(c) for c in sorted(ids)]) if ids else []
    return {u for c in chats if "st" not in c for u in strs_of(c, "roster")}


class DynamoChats:
    """Chats and membership on DynamoDB."""

    def __init__(
        self, db: DynamoDb, policy: Policy | None = None, *, lock_wait_ms: int = 10_000
    ) -> None:
        self._db = db
        self._policy = policy or Policy()
        self._lock_wait_ms = lock_wait_ms
        self._rng = random.Random()

    # -- reads ------------------------------------------------------------------------------------

    async def _partition(self, chat_id: str) -> tuple[Item | None, list[Item]]:
        """The chat item (None if absent or not committed yet) and its member items."""
        expr = Expr()
        cond = f"{expr.name(PK)} = {expr.value(f'C#{chat_id}')}"
        items = await self._db.query_items(CHATS, cond, expr, consistent=True)
        chat = next((i for i in items if str_of(i, SK) == "#"), None)
        if chat is None or "st" in chat:
            return None, []
        return chat, [i for i in items if str_of(i, SK).startswith("M#")]

    async def get_chat(self, chat_id: str) -> ChatInfo | None:
        chat, members = await self._partition(chat_id)
        return None if chat is None else _info(chat, members)

    async def find_direct(self, user_a: str, user_b: str) -> ChatInfo | None:
        pair = await self._db.get(CHATS, pair_key(user_a, user_b))
        return None if pair is None else await self.get_chat(str_of(pair, "chat"))

    async def _devices(self, users: list[str]) -> list[tuple[str, str]]:
        """(user, device) of these users' devices, in (user, device) order."""
        if not users:
            return []
        found = await self._db.batch_get(ACCOUNTS, [user_key(u) for u in users])
        return sorted((str_of(u, PK)[2:], d) for u in found for d in strs_of(u, "device_ids"))

    async def _chat_ids(self, user_id: str) -> list[str]:
        """The chats of a user, from `by_user` (eventually consistent on DynamoDB)."""
        expr = Expr()
        cond = f"{expr.name(BY_USER.pk)} = {expr.value(user_id)}"
        items = await self._db.query_items(CHATS, cond, expr, index=BY_USER)
        return sorted({str_of(i, PK)[2:] for i in items})

    async def _chats(self, chat_ids: list[str]) -> list[Item]:
        """The committed chat items of these ids."""
        if not chat_ids:
            return []
        found = await self._db.batch_get(CHATS, [chat_key(c) for c in chat_ids])
        return [c for c in found if "st" not in c]

    async def shares_chat(self, user_id: str, others: list[str]) -> set[str]:
        if not others:
            return set()
        return await partners(self._db, user_id) & set(others)

    async def member_devices(self, chat_id: str) -> list[tuple[str, str]]:
        chat = await self._db.get(CHATS, chat_key(chat_id))
        if chat is None or "st" in chat:
            return []
        return await self._devices(sorted(strs_of(chat, "roster")))

    async def count_chats(self, user_id: str) -> int:
        expr = Expr()
        cond = f"{expr.name(BY_USER.pk)} = {expr.value(user_id)}"
        return await self._db.count(CHATS, cond, expr, index=BY_USER)

    async def list_chats(self, user_id: str) -> list[ChatSummary]:
        ids = await self._chat_ids(user_id)
        parts = await asyncio.gather(*(self._partition(c) for c in ids))
        summaries = await asyncio.gather(
            *(self._summary(user_id, chat, members) for chat, members in parts if chat is not None)
        )
        found = [s for s in summaries if s is not None]
        return sorted(found, key=lambda s: (s.last_activity_at, s.id), reverse=True)

    async def _summary(self, user_id: str, chat: Item, members: list[Item]) -> ChatSummary | None:
        mine = next((m for m in members if str_of(m, SK) == f"M#{user_id}"), None)
        if mine is None:
            return None
        info = _info(chat, members)
        return ChatSummary(
            id=info.id,
            kind=info.kind,
            name=info.name,
            members=info.member_ids(),
            last_seq=opt_int(chat, "last_seq") or 0,
            last_activity_at=int_of(chat, "last_activity_at"),
            last_sender=opt_str(chat, "last_sender"),
            last_preview=opt_str(chat, "last_preview"),
            unread=await self._unread(info.id, user_id, opt_int(mine, "read_seq") or 0),
            encrypted=info.encrypted,
        )

    async def _unread(self, chat_id: str, user_id: str, read_seq: int) -> int:
        """Others' messages after the read mark: one counting Query of the chat's messages."""
        expr = Expr()
        cond = (
            f"{expr.name(PK)} = {expr.value(f'C#{chat_id}')}"
            f" AND {expr.name(SK)} > {expr.value(num_key(read_seq))}"
        )
        where = f"{expr.name('sender')} <> {expr.value(user_id)} AND " + live_filter(
            expr, self._policy.clock.now_ms()
        )
        return await self._db.count(MESSAGES, cond, expr, where=where, consistent=True)

    # -- create -----------------------------------------------------------------------------------

    async def create_chat(self, chat: ChatInfo) -> tuple[ChatInfo, list[Delivery]]:
        db = self._db
        ids = chat.member_ids()
        values: dict[str, Value | None] = {
            "kind": chat.kind,
            "name": chat.name,
            "created_by": chat.created_by,
            "created_at": chat.created_at,
            "encrypted": chat.encrypted,
            "version": chat.version,
            "roster": frozenset(ids) or None,
            "next_pos": len(chat.members),
            "last_seq": 0,
            "last_activity_at": chat.created_at,
        }
        chat_item = chat_key(chat.id) | encode(values)
        members = [_member_item(chat.id, m, i, 0) for i, m in enumerate(chat.members)]
        devices = await self._devices(ids)
        event = ChatUpdate(
            chat=chat, change="created", by=chat.created_by, at=chat.created_at, added=ids
        )
        payload = encode_event(event)
        new = f"attribute_not_exists({PK})"
        if chat.kind == "direct" and len(ids) == 2:
            pair = pair_key(*ids) | encode({"chat": chat.id})
            extra = [db.tx_put(CHATS, pair, new), db.tx_put(CHATS, chat_item, new)]
        else:
            extra = [db.tx_put(CHATS, chat_item, new)]
        extra += [db.tx_put(CHATS, m) for m in members]
        at = chat.created_at
        targets = [d for _, d in devices]
        if len(extra) <= _MAX_CHANGE:
            try:
                out = await inbox.append_events(
                    db, targets, payload, at, policy=self._policy, extra=extra
                )
            except TransactionCancelled as exc:
                if chat.kind == "direct" and 0 in exc.failed:
                    existing = await self.find_direct(*ids)
                    if existing is not None:
                        return existing, []
                raise Conflict("this chat exists already") from None
        else:
            out = await self._create_large(chat_item, members, targets, payload, at)
        if chat.kind == "group":  # a direct chat announces itself with its first message
            invited = set(ids) - {chat.created_by}
            await self._push_invitations(chat.id, devices, out, invited, at)
        return chat, out

    async def _create_large(
        self, chat_item: Item, members: list[Item], targets: list[str], payload: bytes, at: int
    ) -> list[Delivery]:
        """A chat whose members exceed a transaction: the chat item first, marked pending
        (readers ignore it), the members after it, then its `ChatUpdate` with the chat's
        `REMOVE st` in the record's transaction: the chat appears with its events."""
        db = self._db
        await db.put(
            CHATS, chat_item | encode({"st": "pending"}), condition=f"attribute_not_exists({PK})"
        )
        await db.batch_write(CHATS, puts=members)
        expr = Expr()
        st = expr.name("st")
        show = db.tx_update(
            CHATS, key(str_of(chat_item, PK)), f"REMOVE {st}", expr, f"attribute_exists({st})"
        )
        return await inbox.append_events(
            db, targets, payload, at, policy=self._policy, extra=[show]
        )

    async def _push_invitations(
        self,
        chat_id: str,
        devices: list[tuple[str, str]],
        deliveries: list[Delivery],
        invited: set[str],
        at: int,
    ) -> None:
        """The invited users' devices with a push target get a push about the chat (the
        outbox's `mark_pending`, after the commit: a crash here loses a push, not an event)."""
        theirs = {d for u, d in devices if u in invited}
        mine = [d for d in deliveries if d.device in theirs]
        if not mine:
            return
        heads = await self._db.batch_get(INBOX, [head_key(d.device) for d in mine])
        with_push = {str_of(h, PK)[2:] for h in heads if bool_of(h, "push")}
        if not with_push:
            return
        rules = await push.policy(self._db)
        for d in mine:
            if d.device in with_push:
                await push.mark_pending(
                    self._db, d.device, chat_id, at, invite_iseq=d.iseq, rules=rules
                )

    # -- change -----------------------------------------------------------------------------------

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait_ms / 1000
        attempt = 0
        while True:
            chat, members = await self._partition(chat_id)
            if chat is None:
                raise NotFound("no such chat")
            if int_of(chat, "version") != expected_version:
                raise Conflict("chat changed concurrently; retry")
            holder = opt_str(chat, "lock")
            now = self._policy.clock.now_ms()
            if holder is None:
                done = await self._change(chat, members, add, remove, promote, actor, at)
                if done is not None:
                    return done
            elif (opt_int(chat, "lock_until") or 0) <= now:
                await self._break_lock(chat_id, holder, opt_int(chat, "last_seq") or 0)
                continue
            if loop.time() > deadline:
                raise Unavailable("the chat is busy")
            await asyncio.sleep(self._rng.uniform(0, min(0.2, 0.005 * 2 ** min(attempt, 6))))
            attempt += 1

    async def _break_lock(self, chat_id: str, holder: str, last_seq: int) -> None:
        """The lock's lease passed: finish the message that may hold it, then free it."""
        record = await self._db.get(MESSAGES, message_key(chat_id, last_seq))
        if record is not None and inbox.is_pending(record):
            await inbox.roll_forward(self._db, record, self._policy)
        await inbox.release_chat_lock(self._db, chat_id, holder)

    async def _change(
        self,
        chat: Item,
        members: list[Item],
        add: list[Member],
        remove: list[str],
        promote: list[str],
        actor: str,
        at: int,
    ) -> tuple[ChatInfo, list[Delivery]] | None:
        """One attempt at the change as read; None if the chat moved under it (read again)."""
        db = self._db
        chat_id = str_of(chat, PK)[2:]
        version = int_of(chat, "version")
        last_seq = opt_int(chat, "last_seq") or 0
        next_pos = opt_int(chat, "next_pos") or len(members)
        kept = [m for m in members if str_of(m, SK)[2:] not in set(remove)]
        kept_ids = {str_of(m, SK)[2:] for m in kept}
        fresh = [m for m in add if m.user not in kept_ids]
        new_items = [_member_item(chat_id, m, next_pos + i, last_seq) for i, m in enumerate(fresh)]
        promoted = [u for u in dict.fromkeys(promote) if u in kept_ids | {m.user for m in fresh}]
        after = [
            m | encode({"role": "admin"}) if str_of(m, SK)[2:] in promoted else m
            for m in [*kept, *new_items]
        ]
        info = msgspec.structs.replace(_info(chat, after), version=version + 1)
        event_id = new_id()
        roster = frozenset(info.member_ids())
        expr = Expr()
        v, lock, lock_until = expr.name("version"), expr.name("lock"), expr.name("lock_until")
        sets = [
            f"{v} = {expr.value(version + 1)}",
            f"{expr.name('next_pos')} = {expr.value(next_pos + len(fresh))}",
            f"{lock} = {expr.value(event_id)}",
            f"{lock_until} = {expr.value(self._policy.clock.now_ms() + self._policy.lease_ms)}",
        ]
        update = "SET " + ", ".join(sets)
        if roster:
            update = update.replace(
                "SET ", f"SET {expr.name('roster')} = {expr.value(roster)}, ", 1
            )
        else:
            update += f" REMOVE {expr.name('roster')}"
        cond = (
            f"{v} = {expr.value(version)} AND attribute_not_exists({lock})"
            f" AND attribute_not_exists({expr.name('st')})"
        )
        extra: list[dict[str, Any]] = [db.tx_update(CHATS, chat_key(chat_id), update, expr, cond)]
        extra += [db.tx_put(CHATS, m) for m in new_items]
        extra += [db.tx_delete(CHATS, member_key(chat_id, u)) for u in dict.fromkeys(remove)]
        for u in promoted:
            e = Expr()
            extra.append(
                db.tx_update(
                    CHATS, member_key(chat_id, u), f"SET {e.name('role')} = {e.value('admin')}", e
                )
            )
        if last_seq > 0:  # marks start at the last seq: the past counts as seen on joining
            expires = self._policy.expires()
            extra += [
                db.tx_put(
                    MESSAGES,
                    key(f"R#{chat_id}#{m.user}", f"{k}#{num_key(last_seq)}")
                    | encode({"at": at, "expires": expires}),
                )
                for m in fresh
                for k in _KINDS
            ]
        if len(extra) > _MAX_CHANGE:
            raise BadRequest("too many membership changes at once")
        change: ChatChange = "left" if remove == [actor] and not add else "members"
        event = ChatUpdate(
            chat=info,
            change=change,
            by=actor,
            at=at,
            added=[m.user for m in add],
            removed=list(remove),
        )
        devices = await self._devices(sorted(roster | set(remove)))
        try:
            out = await inbox.append_events(
                db,
                [d for _, d in devices],
                encode_event(event),
                at,
                policy=self._policy,
                event_id=event_id,
                extra=extra,
            )
        except TransactionCancelled as exc:
            if 0 in exc.failed:
                return None
            raise
        finally:
            await inbox.release_chat_lock(db, chat_id, event_id)
        await self._push_invitations(chat_id, devices, out, {m.user for m in fresh}, at)
        return info, out

    # -- an operator's reads ----------------------------------------------------------------------

    async def _scan(self, table: Table, **kwargs: Any) -> AsyncIterator[Item]:
        """Every item of a table (after `FilterExpression`), strongly consistent."""
        kwargs = {"TableName": self._db.name(table), **kwargs, "ConsistentRead": True}
        while True:
            response = await self._db.call("scan", idempotent=True, **kwargs)
            for item in response.get("Items", []):
                yield item
            start = response.get("LastEvaluatedKey")
            if not start:
                return
            kwargs["ExclusiveStartKey"] = start

    def _record(self, chat: Item) -> ChatRecord:
        return ChatRecord(
            id=str_of(chat, PK)[2:],
            kind=str_of(chat, "kind"),  # type: ignore[arg-type]
            name=opt_str(chat, "name"),
            created_at=int_of(chat, "created_at"),
            members=len(strs_of(chat, "roster")),
            last_seq=opt_int(chat, "last_seq") or 0,
            last_activity_at=int_of(chat, "last_activity_at"),
        )

    async def chat_records(self, limit: int, user_id: str | None = None) -> list[ChatRecord]:
        if user_id is not None:
            chats = await self._chats(await self._chat_ids(user_id))
        else:
            expr = Expr()
            where = (
                f"{expr.name(SK)} = {expr.value('#')} AND begins_with({expr.name(PK)},"
                f" {expr.value('C#')}) AND attribute_not_exists({expr.name('st')})"
            )
            chats = [c async for c in self._scan(CHATS, FilterExpression=where, **expr.kwargs())]
        records = [self._record(c) for c in chats if "st" not in c]
        records.sort(key=lambda r: (r.last_activity_at, r.id), reverse=True)
        return records[:limit]

    async def chat_record(self, chat_id: str) -> ChatRecord | None:
        chat = await self._db.get(CHATS, chat_key(chat_id))
        return None if chat is None or "st" in chat else self._record(chat)

    async def member_records(self, chat_id: str) -> list[MemberRecord]:
        chat, members = await self._partition(chat_id)
        if chat is None:
            return []
        ordered = sorted(members, key=lambda m: int_of(m, "pos"))
        users = await self._db.batch_get(ACCOUNTS, [user_key(str_of(m, SK)[2:]) for m in ordered])
        names = {str_of(u, PK)[2:]: str_of(u, "username") for u in users}
        return [
            MemberRecord(
                user=(u := str_of(m, SK)[2:]),
                username=names.get(u, ""),
                role=_role(m),
                delivered_seq=opt_int(m, "delivered_seq") or 0,
                read_seq=opt_int(m, "read_seq") or 0,
            )
            for m in ordered
        ]

    async def store_counts(self) -> StoreCounts:
        """Scans of the chats, messages and inbox tables: an operator's command."""
        now = self._policy.clock.now_ms()
        chats = len(await self.chat_records(2**62))
        messages = bodies = 0
        expr = Expr()
        where = f"begins_with({expr.name(PK)}, {expr.value('C#')}) AND " + live_filter(expr, now)
        async for m in self._scan(MESSAGES, FilterExpression=where, **expr.kwargs()):
            messages += 1
            bodies += "raw" in m
        depth = await self.inbox_depth()
        return StoreCounts(
            chats=chats,
            messages=messages,
            bodies=bodies,
            inbox=depth.entries,
            oldest_inbox_at=depth.oldest_at,
        )

    async def inbox_depth(self) -> InboxDepth:
        """A Scan of the inbox table (entries, not heads): in proportion to its size, so the
        metrics should read it at a long interval on this store."""
        expr = Expr()
        where = f"{expr.name(SK)} <> {expr.value('#')} AND " + live_filter(
            expr, self._policy.clock.now_ms()
        )
        entries, oldest = 0, None
        async for e in self._scan(INBOX, FilterExpression=where, **expr.kwargs()):
            entries += 1
            at = int_of(e, "at")
            oldest = at if oldest is None else min(oldest, at)
        return InboxDepth(entries=entries, oldest_at=oldest)


_check: type[ChatStore] = DynamoChats
