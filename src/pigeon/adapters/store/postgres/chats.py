"""PostgreSQL implementation of `ChatStore`.

Membership changes are cold paths: they run as short client-side transactions. Their `ChatUpdate`
is encoded here and appended to the inboxes by `pigeon_append` (functions.py), which hands out the
`iseq`s under the devices' locks, after the chat's row lock (the lock order). Users invited into
a group get their devices' push jobs marked in the same transaction (`enqueue_invitations`).
"""

from __future__ import annotations

import asyncpg

from pigeon.adapters.store.postgres.db import PgDb
from pigeon.adapters.store.postgres.push import enqueue_invitations
from pigeon.domain.errors import Conflict, NotFound
from pigeon.domain.events import ChatChange, ChatUpdate, Delivery, encode_event
from pigeon.domain.models import ChatInfo, ChatSummary, Member
from pigeon.ports import ChatRecord, ChatStore, InboxDepth, MemberRecord, StoreCounts

_LOAD_CHAT = """
SELECT c.kind, c.name, c.created_by, c.created_at, c.version, c.encrypted,
    array(SELECT m.user_id FROM members m WHERE m.chat_id = c.id ORDER BY m.pos) AS users,
    array(SELECT m.role FROM members m WHERE m.chat_id = c.id ORDER BY m.pos) AS roles
FROM chats c WHERE c.id = $1
"""
# The devices of these users in a stable order (oldest device first), as the SQLite store.
_DEVICES_OF = (
    "SELECT array_agg(id ORDER BY user_id, created_at, id) FROM devices"
    " WHERE user_id = ANY($1::text[])"
)
_APPEND = (
    "SELECT o_device, o_iseq"
    " FROM pigeon_append($1, array_fill($2::bytea, ARRAY[$3::integer]), NULL, $4)"
)
_INSERT_MEMBERS = """
INSERT INTO members (chat_id, user_id, role, pos, delivered_seq, read_seq)
SELECT $1, m.user_id, m.role, $4 + m.ord - 1, $5, $5
FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS m(user_id, role, ord)
"""
_LOG_JOINERS = """
INSERT INTO receipt_log (chat_id, user_id, kind, seq, at)
SELECT $1, u.user_id, k.kind, $3, $4
FROM unnest($2::text[]) AS u(user_id), (VALUES ('delivered'), ('read')) AS k(kind)
ON CONFLICT DO NOTHING
"""
_LIST_CHATS = """
SELECT c.id, c.kind, c.name, c.last_seq, c.last_activity_at, c.last_sender, lm.preview,
    c.encrypted,
    (SELECT count(*) FROM messages x
        WHERE x.chat_id = c.id AND x.seq > me.read_seq AND x.sender <> $1) AS unread,
    array(SELECT m.user_id FROM members m WHERE m.chat_id = c.id ORDER BY m.pos) AS members
FROM members me
JOIN chats c ON c.id = me.chat_id
LEFT JOIN messages lm ON lm.chat_id = c.id AND lm.seq = c.last_seq
WHERE me.user_id = $1
ORDER BY c.last_activity_at DESC, c.id DESC
"""

#: A chat's record for operators (`ChatRecord`), its member count included.
_RECORD = """
SELECT c.id, c.kind, c.name, c.created_at,
    (SELECT count(*) FROM members m WHERE m.chat_id = c.id) AS members,
    c.last_seq, c.last_activity_at
FROM chats c
"""
_MEMBER_RECORDS = """
SELECT m.user_id, u.username, m.role, m.delivered_seq, m.read_seq
FROM members m JOIN users u ON u.id = m.user_id
WHERE m.chat_id = $1 ORDER BY m.pos
"""
#: One statement, so one snapshot.
_STORE_COUNTS = """
SELECT (SELECT count(*) FROM chats), m.n, m.bodies, i.n, i.oldest
FROM (SELECT count(*) AS n, count(raw) AS bodies FROM messages) m,
    (SELECT count(*) AS n, min(at) AS oldest FROM inbox) i
"""


def _record(r: asyncpg.Record) -> ChatRecord:
    return ChatRecord(
        id=r[0],
        kind=r[1],
        name=r[2],
        created_at=r[3],
        members=r[4],
        last_seq=r[5],
        last_activity_at=r[6],
    )


def direct_key(user_a: str, user_b: str) -> str:
    """The unique key of the direct chat between two users, whatever the order."""
    return ":".join(sorted((user_a, user_b)))


async def load_chat(conn: asyncpg.Connection, chat_id: str) -> ChatInfo | None:
    """Read a chat and its members (join order) in one statement."""
    row = await conn.fetchrow(_LOAD_CHAT, chat_id)
    if row is None:
        return None
    return ChatInfo(
        id=chat_id,
        kind=row["kind"],
        name=row["name"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        version=row["version"],
        encrypted=row["encrypted"],
        members=[Member(user=u, role=r) for u, r in zip(row["users"], row["roles"], strict=True)],
    )


async def append_to_users(
    conn: asyncpg.Connection, user_ids: list[str], raw: bytes, at: int
) -> list[Delivery]:
    """Append one event to the inbox of every device of these users."""
    devices: list[str] | None = await conn.fetchval(_DEVICES_OF, user_ids)
    if not devices:
        return []
    iseqs = {r[0]: r[1] for r in await conn.fetch(_APPEND, devices, raw, len(devices), at)}
    return [Delivery(d, iseqs[d], raw) for d in devices if d in iseqs]


class PgChats:
    """Chats and membership in PostgreSQL."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    async def get_chat(self, chat_id: str) -> ChatInfo | None:
        return await self._db.run(lambda conn: load_chat(conn, chat_id))

    async def find_direct(self, user_a: str, user_b: str) -> ChatInfo | None:
        async def q(conn: asyncpg.Connection) -> ChatInfo | None:
            chat_id = await conn.fetchval(
                "SELECT id FROM chats WHERE direct_key = $1", direct_key(user_a, user_b)
            )
            return None if chat_id is None else await load_chat(conn, chat_id)

        return await self._db.run(q)

    async def create_chat(self, chat: ChatInfo) -> tuple[ChatInfo, list[Delivery]]:
        async def tx(conn: asyncpg.Connection) -> tuple[ChatInfo, list[Delivery]]:
            key = None
            if chat.kind == "direct":
                a, b = chat.member_ids()
                key = direct_key(a, b)
            async with conn.transaction():
                # ON CONFLICT waits for a concurrent creator of the same pair, then yields.
                created = await conn.fetchval(
                    "INSERT INTO chats (id, kind, name, created_by, created_at, direct_key,"
                    " next_pos, last_activity_at, encrypted)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $5, $8)"
                    " ON CONFLICT (direct_key) DO NOTHING RETURNING true",
                    chat.id,
                    chat.kind,
                    chat.name,
                    chat.created_by,
                    chat.created_at,
                    key,
                    len(chat.members),
                    chat.encrypted,
                )
                if not created:
                    existing_id = await conn.fetchval(
                        "SELECT id FROM chats WHERE direct_key = $1", key
                    )
                    existing = await load_chat(conn, existing_id)
                    assert existing is not None
                    return existing, []
                await conn.execute(
                    _INSERT_MEMBERS,
                    chat.id,
                    [m.user for m in chat.members],
                    [m.role for m in chat.members],
                    0,
                    0,
                )
                event = ChatUpdate(
                    chat=chat,
                    change="created",
                    by=chat.created_by,
                    at=chat.created_at,
                    added=chat.member_ids(),
                )
                raw = encode_event(event)
                out = await append_to_users(conn, chat.member_ids(), raw, chat.created_at)
                if chat.kind == "group":  # a direct chat announces itself with its first message
                    invited = set(chat.member_ids()) - {chat.created_by}
                    await enqueue_invitations(conn, chat.id, out, invited, chat.created_at)
                return chat, out

        return await self._db.run(tx)

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
        async def tx(conn: asyncpg.Connection) -> tuple[ChatInfo, list[Delivery]]:
            async with conn.transaction():
                # compare-and-set on the version; the row lock orders us with sends
                row = await conn.fetchrow(
                    "UPDATE chats SET version = version + 1, next_pos = next_pos + $1"
                    " WHERE id = $2 AND version = $3 RETURNING last_seq, next_pos - $1 AS pos",
                    len(add),
                    chat_id,
                    expected_version,
                )
                if row is None:
                    if await conn.fetchval("SELECT true FROM chats WHERE id = $1", chat_id):
                        raise Conflict("chat changed concurrently; retry")
                    raise NotFound("no such chat")
                if add:
                    await conn.execute(
                        _INSERT_MEMBERS,
                        chat_id,
                        [m.user for m in add],
                        [m.role for m in add],
                        row["pos"],
                        row["last_seq"],
                    )
                    if row["last_seq"] > 0:  # marks start at the last seq: the past is seen
                        await conn.execute(
                            _LOG_JOINERS, chat_id, [m.user for m in add], row["last_seq"], at
                        )
                if remove:
                    await conn.execute(
                        "DELETE FROM members WHERE chat_id = $1 AND user_id = ANY($2::text[])",
                        chat_id,
                        remove,
                    )
                if promote:
                    await conn.execute(
                        "UPDATE members SET role = 'admin'"
                        " WHERE chat_id = $1 AND user_id = ANY($2::text[])",
                        chat_id,
                        promote,
                    )
                chat = await load_chat(conn, chat_id)
                assert chat is not None
                change: ChatChange = "left" if remove == [actor] and not add else "members"
                event = ChatUpdate(
                    chat=chat,
                    change=change,
                    by=actor,
                    at=at,
                    added=[m.user for m in add],
                    removed=list(remove),
                )
                users = [*chat.member_ids(), *remove]
                out = await append_to_users(conn, users, encode_event(event), at)
                await enqueue_invitations(conn, chat_id, out, {m.user for m in add}, at)
                return chat, out

        return await self._db.run(tx)

    async def shares_chat(self, user_id: str, others: list[str]) -> set[str]:
        if not others:
            return set()
        rows = await self._db.fetch(
            "SELECT DISTINCT o.user_id FROM members me JOIN members o ON o.chat_id = me.chat_id"
            " WHERE me.user_id = $1 AND o.user_id = ANY($2::text[])",
            user_id,
            others,
        )
        return {r[0] for r in rows}

    async def member_devices(self, chat_id: str) -> list[tuple[str, str]]:
        rows = await self._db.fetch(
            "SELECT m.user_id, d.id FROM members m JOIN devices d ON d.user_id = m.user_id"
            " WHERE m.chat_id = $1",
            chat_id,
        )
        return [(r[0], r[1]) for r in rows]

    async def count_chats(self, user_id: str) -> int:
        sql = "SELECT count(*) FROM members WHERE user_id = $1"
        return int(await self._db.fetchval(sql, user_id))

    async def list_chats(self, user_id: str) -> list[ChatSummary]:
        rows = await self._db.fetch(_LIST_CHATS, user_id)
        return [
            ChatSummary(
                id=r["id"],
                kind=r["kind"],
                name=r["name"],
                members=list(r["members"]),
                last_seq=r["last_seq"],
                last_activity_at=r["last_activity_at"],
                last_sender=r["last_sender"],
                last_preview=r["preview"],
                unread=r["unread"],
                encrypted=r["encrypted"],
            )
            for r in rows
        ]

    async def chat_records(self, limit: int, user_id: str | None = None) -> list[ChatRecord]:
        order = " ORDER BY c.last_activity_at DESC, c.id DESC LIMIT $1"
        if user_id is None:
            rows = await self._db.fetch(_RECORD + order, limit)
        else:
            mine = " WHERE c.id IN (SELECT chat_id FROM members WHERE user_id = $2)"
            rows = await self._db.fetch(_RECORD + mine + order, limit, user_id)
        return [_record(r) for r in rows]

    async def chat_record(self, chat_id: str) -> ChatRecord | None:
        row = await self._db.fetchrow(_RECORD + " WHERE c.id = $1", chat_id)
        return None if row is None else _record(row)

    async def member_records(self, chat_id: str) -> list[MemberRecord]:
        rows = await self._db.fetch(_MEMBER_RECORDS, chat_id)
        return [
            MemberRecord(user=r[0], username=r[1], role=r[2], delivered_seq=r[3], read_seq=r[4])
            for r in rows
        ]

    async def store_counts(self) -> StoreCounts:
        r = await self._db.fetchrow(_STORE_COUNTS)
        return StoreCounts(chats=r[0], messages=r[1], bodies=r[2], inbox=r[3], oldest_inbox_at=r[4])

    async def inbox_depth(self) -> InboxDepth:
        # one statement, one snapshot: a scan of the inbox (or of its index on `at`)
        r = await self._db.fetchrow("SELECT count(*), min(at) FROM inbox")
        return InboxDepth(entries=r[0], oldest_at=r[1])


_check: type[ChatStore] = PgChats
