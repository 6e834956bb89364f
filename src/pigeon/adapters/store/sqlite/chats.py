"""SQLite implementation of `ChatStore`."""

from __future__ import annotations

import sqlite3

from pigeon.adapters.store.sqlite import inbox
from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.adapters.store.sqlite.push import enqueue_invitations
from pigeon.domain.errors import Conflict, NotFound
from pigeon.domain.events import ChatChange, ChatUpdate, Delivery, encode_event
from pigeon.domain.models import ChatInfo, ChatSummary, Member
from pigeon.ports import ChatRecord, InboxDepth, MemberRecord, StoreCounts


def direct_key(user_a: str, user_b: str) -> str:
    """The unique key of the direct chat between two users, whatever the order."""
    return ":".join(sorted((user_a, user_b)))


def load_chat(conn: sqlite3.Connection, chat_id: str) -> ChatInfo | None:
    """Read a chat and its members (join order) inside the caller's transaction."""
    row = conn.execute(
        "SELECT kind, name, created_by, created_at, version, encrypted FROM chats WHERE id = ?",
        (chat_id,),
    ).fetchone()
    if row is None:
        return None
    members = [
        Member(user=u, role=r)
        for u, r in conn.execute(
            "SELECT user_id, role FROM members WHERE chat_id = ? ORDER BY pos", (chat_id,)
        )
    ]
    return ChatInfo(
        id=chat_id,
        kind=row[0],
        name=row[1],
        created_by=row[2],
        created_at=row[3],
        version=row[4],
        members=members,
        encrypted=bool(row[5]),
    )


_KINDS = ("delivered", "read")

#: A chat's record for operators (`ChatRecord`), its member count included.
_RECORD = (
    "SELECT c.id, c.kind, c.name, c.created_at,"
    " (SELECT count(*) FROM members m WHERE m.chat_id = c.id), c.last_seq, c.last_activity_at"
    " FROM chats c"
)


def _record(r: tuple[str, str, str | None, int, int, int, int]) -> ChatRecord:
    return ChatRecord(
        id=r[0],
        kind=r[1],  # type: ignore[arg-type]
        name=r[2],
        created_at=r[3],
        members=r[4],
        last_seq=r[5],
        last_activity_at=r[6],
    )


class SqliteChats:
    """Chats and membership in SQLite."""

    def __init__(self, db: SqliteDb) -> None:
        self._db = db

    async def get_chat(self, chat_id: str) -> ChatInfo | None:
        return await self._db.read(lambda conn: load_chat(conn, chat_id))

    async def find_direct(self, user_a: str, user_b: str) -> ChatInfo | None:
        def q(conn: sqlite3.Connection) -> ChatInfo | None:
            row = conn.execute(
                "SELECT id FROM chats WHERE direct_key = ?", (direct_key(user_a, user_b),)
            ).fetchone()
            return None if row is None else load_chat(conn, row[0])

        return await self._db.read(q)

    async def create_chat(self, chat: ChatInfo) -> tuple[ChatInfo, list[Delivery]]:
        def tx(conn: sqlite3.Connection) -> tuple[ChatInfo, list[Delivery]]:
            key = None
            if chat.kind == "direct":
                a, b = chat.member_ids()
                key = direct_key(a, b)
                row = conn.execute("SELECT id FROM chats WHERE direct_key = ?", (key,)).fetchone()
                if row is not None:
                    existing = load_chat(conn, row[0])
                    assert existing is not None
                    return existing, []
            conn.execute(
                "INSERT INTO chats (id, kind, name, created_by, created_at, direct_key, next_pos,"
                " last_activity_at, encrypted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    chat.id,
                    chat.kind,
                    chat.name,
                    chat.created_by,
                    chat.created_at,
                    key,
                    len(chat.members),
                    chat.created_at,
                    chat.encrypted,
                ),
            )
            conn.executemany(
                "INSERT INTO members (chat_id, user_id, role, pos) VALUES (?, ?, ?, ?)",
                [(chat.id, m.user, m.role, i) for i, m in enumerate(chat.members)],
            )
            event = ChatUpdate(
                chat=chat,
                change="created",
                by=chat.created_by,
                at=chat.created_at,
                added=chat.member_ids(),
            )
            targets = inbox.targets_of(conn, chat.member_ids())
            out = inbox.append_to(conn, targets, encode_event(event), chat.created_at)
            if chat.kind == "group":  # a direct chat announces itself with its first message
                invited = set(chat.member_ids()) - {chat.created_by}
                _push_invitations(conn, chat.id, out, invited, chat.created_at)
            return chat, out

        return await self._db.write(tx)

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
        def tx(conn: sqlite3.Connection) -> tuple[ChatInfo, list[Delivery]]:
            row = conn.execute(
                "UPDATE chats SET version = version + 1, next_pos = next_pos + ?"
                " WHERE id = ? AND version = ? RETURNING last_seq, next_pos - ?",
                (len(add), chat_id, expected_version, len(add)),
            ).fetchone()
            if row is None:
                if conn.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone():
                    raise Conflict("chat changed concurrently; retry")
                raise NotFound("no such chat")
            last_seq, pos = row
            conn.executemany(
                "INSERT INTO members (chat_id, user_id, role, pos, delivered_seq, read_seq)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(chat_id, m.user, m.role, pos + i, last_seq, last_seq) for i, m in enumerate(add)],
            )
            if last_seq > 0:  # marks start at the last seq: the past counts as seen on joining
                conn.executemany(
                    "INSERT OR IGNORE INTO receipt_log (chat_id, user_id, kind, seq, at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(chat_id, m.user, k, last_seq, at) for m in add for k in _KINDS],
                )
            conn.executemany(
                "DELETE FROM members WHERE chat_id = ? AND user_id = ?",
                [(chat_id, u) for u in remove],
            )
            conn.executemany(
                "UPDATE members SET role = 'admin' WHERE chat_id = ? AND user_id = ?",
                [(chat_id, u) for u in promote],
            )
            chat = load_chat(conn, chat_id)
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
            targets = inbox.targets_of(conn, [*chat.member_ids(), *remove])
            out = inbox.append_to(conn, targets, encode_event(event), at)
            _push_invitations(conn, chat_id, out, {m.user for m in add}, at)
            return chat, out

        return await self._db.write(tx)

    async def shares_chat(self, user_id: str, others: list[str]) -> set[str]:
        def q(conn: sqlite3.Connection) -> set[str]:
            if not others:
                return set()
            marks = ",".join("?" * len(others))
            rows = conn.execute(
                "SELECT DISTINCT o.user_id FROM members me JOIN members o ON o.chat_id = me.chat_id"
                f" WHERE me.user_id = ? AND o.user_id IN ({marks})",
                [user_id, *others],
            )
            return {r[0] for r in rows}

        return await self._db.read(q)

    async def member_devices(self, chat_id: str) -> list[tuple[str, str]]:
        def q(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT m.user_id, d.id FROM members m JOIN devices d ON d.user_id = m.user_id"
                " WHERE m.chat_id = ?",
                (chat_id,),
            )
            return [(r[0], r[1]) for r in rows]

        return await self._db.read(q)

    async def count_chats(self, user_id: str) -> int:
        def q(conn: sqlite3.Connection) -> int:
            sql = "SELECT count(*) FROM members WHERE user_id = ?"
            return int(conn.execute(sql, (user_id,)).fetchone()[0])

        return await self._db.read(q)

    async def list_chats(self, user_id: str) -> list[ChatSummary]:
        def q(conn: sqlite3.Connection) -> list[ChatSummary]:
            rows = conn.execute(
                "SELECT c.id, c.kind, c.name, c.last_seq, c.last_activity_at, c.last_sender,"
                " c.last_preview, m.read_seq, c.encrypted"
                " FROM members m JOIN chats c ON c.id = m.chat_id"
                " WHERE m.user_id = ? ORDER BY c.last_activity_at DESC, c.id DESC",
                (user_id,),
            ).fetchall()
            out = []
            for cid, kind, name, last_seq, activity, sender, preview, read_seq, sealed in rows:
                (unread,) = conn.execute(
                    "SELECT count(*) FROM messages WHERE chat_id = ? AND seq > ? AND sender != ?",
                    (cid, read_seq, user_id),
                ).fetchone()
                members = [
                    r[0]
                    for r in conn.execute(
                        "SELECT user_id FROM members WHERE chat_id = ? ORDER BY pos", (cid,)
                    )
                ]
                out.append(
                    ChatSummary(
                        id=cid,
                        kind=kind,
                        name=name,
                        members=members,
                        last_seq=last_seq,
                        last_activity_at=activity,
                        last_sender=sender,
                        last_preview=preview,
                        unread=unread,
                        encrypted=bool(sealed),
                    )
                )
            return out

        return await self._db.read(q)

    async def chat_records(self, limit: int, user_id: str | None = None) -> list[ChatRecord]:
        def q(conn: sqlite3.Connection) -> list[ChatRecord]:
            order = " ORDER BY c.last_activity_at DESC, c.id DESC LIMIT ?"
            if user_id is None:
                rows = conn.execute(_RECORD + order, (limit,))
            else:
                mine = " WHERE c.id IN (SELECT chat_id FROM members WHERE user_id = ?)"
                rows = conn.execute(_RECORD + mine + order, (user_id, limit))
            return [_record(r) for r in rows]

        return await self._db.read(q)

    async def chat_record(self, chat_id: str) -> ChatRecord | None:
        def q(conn: sqlite3.Connection) -> ChatRecord | None:
            row = conn.execute(f"{_RECORD} WHERE c.id = ?", (chat_id,)).fetchone()
            return None if row is None else _record(row)

        return await self._db.read(q)

    async def member_records(self, chat_id: str) -> list[MemberRecord]:
        def q(conn: sqlite3.Connection) -> list[MemberRecord]:
            rows = conn.execute(
                "SELECT m.user_id, u.username, m.role, m.delivered_seq, m.read_seq"
                " FROM members m JOIN users u ON u.id = m.user_id"
                " WHERE m.chat_id = ? ORDER BY m.pos",
                (chat_id,),
            )
            return [
                MemberRecord(user=r[0], username=r[1], role=r[2], delivered_seq=r[3], read_seq=r[4])
                for r in rows
            ]

        return await self._db.read(q)

    async def store_counts(self) -> StoreCounts:
        def q(conn: sqlite3.Connection) -> StoreCounts:
            (chats,) = conn.execute("SELECT count(*) FROM chats").fetchone()
            messages, bodies = conn.execute("SELECT count(*), count(raw) FROM messages").fetchone()
            inbox, oldest = conn.execute("SELECT count(*), min(at) FROM inbox").fetchone()
            return StoreCounts(
                chats=chats, messages=messages, bodies=bodies, inbox=inbox, oldest_inbox_at=oldest
            )

        return await self._db.read(q)

    async def inbox_depth(self) -> InboxDepth:
        def q(conn: sqlite3.Connection) -> InboxDepth:
            # one snapshot, one scan of the inbox for both (no index on `at`: sweep.py)
            entries, oldest = conn.execute("SELECT count(*), min(at) FROM inbox").fetchone()
            return InboxDepth(entries=entries, oldest_at=oldest)

        return await self._db.read(q)


def _push_invitations(
    conn: sqlite3.Connection,
    chat_id: str,
    deliveries: list[Delivery],
    invited: set[str],
    at: int,
) -> None:
    """The invited users' devices get a push about the chat (see `enqueue_invitations`)."""
    if not invited:
        return
    marks = ",".join("?" * len(invited))
    theirs = {
        row[0]
        for row in conn.execute(f"SELECT id FROM devices WHERE user_id IN ({marks})", [*invited])
    }
    enqueue_invitations(conn, chat_id, [d for d in deliveries if d.device in theirs], at)
