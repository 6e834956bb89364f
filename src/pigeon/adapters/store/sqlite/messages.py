"""SQLite implementation of `MessageStore`: the message path."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from functools import partial

import msgspec

from pigeon.adapters.store.sqlite import inbox
from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.adapters.store.sqlite.sweep import forget_previews, sweep_chunk
from pigeon.domain.errors import Forbidden, NotFound
from pigeon.domain.events import (
    Delivery,
    InboxEntry,
    InboxPage,
    Message,
    ReadState,
    Receipt,
    ReceiptKind,
    encode_event,
)
from pigeon.domain.models import Device, MemberReceipt
from pigeon.ports import SendRequest, SendResult, SweepStats

_decode_message = msgspec.json.Decoder(Message).decode


def _message_from_row(row: tuple[str, str, int, str, str, str, int, bytes | None]) -> Message:
    mid, chat, seq, sender, device, cmid, at, raw = row
    if raw is not None:
        return _decode_message(raw)
    return Message(
        id=mid, chat=chat, seq=seq, sender=sender, sender_device=device, cmid=cmid, at=at
    )


_MESSAGE_COLS = "id, chat_id, seq, sender, sender_device, cmid, at, raw"


def _advance(
    conn: sqlite3.Connection, chat_id: str, user_id: str, kind: ReceiptKind, seq: int, at: int
) -> list[Delivery]:
    """Move the user's delivered (or read) mark in the chat up to `seq` and write receipts to
    the senders of the messages it passes. Never moves a mark backwards."""
    marks = {
        u: (d, r)
        for u, d, r in conn.execute(
            "SELECT user_id, delivered_seq, read_seq FROM members WHERE chat_id = ?", (chat_id,)
        )
    }
    if user_id not in marks:
        return []
    delivered, read = marks[user_id]
    old = delivered if kind == "delivered" else read
    if seq <= old:
        return []
    new_delivered = max(delivered, seq)
    new_read = read if kind == "delivered" else seq
    conn.execute(
        "UPDATE members SET delivered_seq = ?, read_seq = ? WHERE chat_id = ? AND user_id = ?",
        (new_delivered, new_read, chat_id, user_id),
    )
    conn.execute(
        "INSERT OR REPLACE INTO receipt_log (chat_id, user_id, kind, seq, at)"
        " VALUES (?, ?, ?, ?, ?)",
        (chat_id, user_id, kind, seq, at),
    )
    marks[user_id] = (new_delivered, new_read)
    # The members whose messages the mark passed, then their devices (a Python set rather than
    # DISTINCT, which SQLite answers with an ephemeral table).
    senders = {
        sender
        for (sender,) in conn.execute(
            "SELECT sender FROM messages WHERE chat_id = ? AND seq > ? AND seq <= ?",
            (chat_id, old, seq),
        )
        if sender != user_id and sender in marks  # one no longer a member is owed nothing
    }
    if not senders:
        return []
    devices: dict[str, list[inbox.Target]] = defaultdict(list)
    placeholders = ",".join("?" * len(senders))
    for sender, device_id, next_iseq in conn.execute(
        f"SELECT user_id, id, next_iseq FROM devices WHERE user_id IN ({placeholders})"
        " ORDER BY user_id, created_at, id",
        sorted(senders),
    ):
        devices[sender].append((device_id, next_iseq))
    out: list[Delivery] = []
    index = 0 if kind == "delivered" else 1
    for sender, targets in devices.items():
        others = [m[index] for u, m in marks.items() if u != sender]
        all_seq = min(others) if others else seq
        receipt = Receipt(chat=chat_id, user=user_id, kind=kind, seq=seq, all_seq=all_seq, at=at)
        out += inbox.append_to(conn, targets, encode_event(receipt), at)
    return out


class SqliteMessages:
    """Messages, inboxes and receipts in SQLite."""

    def __init__(self, db: SqliteDb) -> None:
        self._db = db

    async def send(self, req: SendRequest) -> SendResult:
        return await self._db.write(lambda conn: self._send(conn, req))

    @staticmethod
    def _send(conn: sqlite3.Connection, req: SendRequest) -> SendResult:
        dup = conn.execute(
            f"SELECT {_MESSAGE_COLS} FROM messages WHERE sender_device = ? AND cmid = ?",
            (req.sender_device, req.cmid),
        ).fetchone()
        if dup is not None:
            return SendResult(_message_from_row(dup), True, [])
        # The chat's counter, its members and their devices with their counters, in one read.
        rows = conn.execute(
            "SELECT c.last_seq, m.user_id, d.id, d.next_iseq, m.read_seq FROM chats c"
            " JOIN members m ON m.chat_id = c.id LEFT JOIN devices d ON d.user_id = m.user_id"
            " WHERE c.id = ? ORDER BY m.user_id, d.created_at, d.id",
            (req.chat,),
        ).fetchall()
        if not rows:
            raise NotFound("no such chat")
        sender_read = next((r for _, u, _, _, r in rows if u == req.sender), None)
        if sender_read is None:
            raise Forbidden("not a participant of this chat")
        targets = [(d, n) for _, _, d, n, _ in rows if d is not None and d != req.sender_device]
        seq = rows[0][0] + 1
        conn.execute(
            "UPDATE chats SET last_seq = ?, last_activity_at = ?, last_sender = ?,"
            " last_preview = ? WHERE id = ?",
            (seq, req.at, req.sender, req.preview if targets else None, req.chat),
        )
        message = req.message(seq)
        raw = encode_event(message)
        conn.execute(
            f"INSERT INTO messages ({_MESSAGE_COLS}, pending, push_preview)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message.id,
                req.chat,
                seq,
                req.sender,
                req.sender_device,
                req.cmid,
                req.at,
                raw if targets else None,
                len(targets),
                req.push_preview,
            ),
        )
        deliveries = inbox.append_to(conn, targets, raw, req.at, message.id)
        # The sender has read everything up to their own message. If that passes messages of
        # others (a quick reply before the ack), their senders get the read receipts they are
        # owed; otherwise moving the marks is all there is to do.
        if sender_read < seq - 1:
            deliveries += _advance(conn, req.chat, req.sender, "read", seq, req.at)
        else:
            conn.execute(
                "UPDATE members SET delivered_seq = ?, read_seq = ?"
                " WHERE chat_id = ? AND user_id = ?",
                (seq, seq, req.chat, req.sender),
            )
        return SendResult(message, False, deliveries)

    async def ack(self, device: Device, upto: int, at: int) -> list[Delivery]:
        def tx(conn: sqlite3.Connection) -> list[Delivery]:
            # Moved first (nothing to do if it was already there): one statement, not a read
            # and a write. Beyond the last entry handed out it stops at that entry.
            if not conn.execute(
                "UPDATE devices SET acked_iseq = min(?, next_iseq - 1)"
                " WHERE id = ? AND acked_iseq < ?",
                (upto, device.id, upto),
            ).rowcount:
                return []
            reached: dict[str, int] = {}
            for t in inbox.take(conn, device.id, upto).values():
                reached[t.chat_id] = max(t.seq, reached.get(t.chat_id, 0))
            out: list[Delivery] = []
            for chat_id, seq in reached.items():
                out += _advance(conn, chat_id, device.user_id, "delivered", seq, at)
            return out

        return await self._db.write(tx)

    async def mark_read(self, device: Device, chat_id: str, seq: int, at: int) -> list[Delivery]:
        def tx(conn: sqlite3.Connection) -> list[Delivery]:
            row = conn.execute(
                "SELECT c.last_seq, m.read_seq FROM chats c LEFT JOIN members m"
                " ON m.chat_id = c.id AND m.user_id = ? WHERE c.id = ?",
                (device.user_id, chat_id),
            ).fetchone()
            if row is None:
                raise NotFound("no such chat")
            last_seq, read_seq = row
            if read_seq is None:
                raise Forbidden("not a participant of this chat")
            upto = min(seq, last_seq)
            if upto <= read_seq:
                return []
            out = _advance(conn, chat_id, device.user_id, "read", upto, at)
            others = [t for t in inbox.targets_of(conn, [device.user_id]) if t[0] != device.id]
            state = encode_event(ReadState(chat=chat_id, seq=upto, at=at))
            return out + inbox.append_to(conn, others, state, at)

        return await self._db.write(tx)

    async def read_inbox(
        self, device_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> InboxPage:
        def q(conn: sqlite3.Connection) -> InboxPage:
            state = conn.execute(
                "SELECT next_iseq - 1, acked_iseq FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            if state is None:
                return InboxPage([], 0, 0)
            # An entry whose message lost its body mid-sweep is expiring: skip it in SQL, so
            # that LIMIT counts deliverable entries only.
            rows = conn.execute(
                "SELECT i.iseq, coalesce(i.payload, m.raw) FROM inbox i"
                " LEFT JOIN messages m ON m.id = i.message_id"
                " WHERE i.device_id = ? AND i.iseq > ?"
                " AND coalesce(i.payload, m.raw) IS NOT NULL"
                " ORDER BY i.iseq LIMIT ?",
                (device_id, after, limit),
            )
            entries: list[InboxEntry] = []
            size = 0
            for iseq, raw in rows:  # row by row: a page over budget is never all in memory
                if entries and max_bytes is not None and size + len(raw) > max_bytes:
                    break
                entries.append(InboxEntry(iseq, raw))
                size += len(raw)
            return InboxPage(entries, state[0], state[1])

        return await self._db.read(q)

    async def acked_iseq(self, device_id: str) -> int:
        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT acked_iseq FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            return 0 if row is None else int(row[0])

        return await self._db.read(q)

    async def receipts(
        self, user_id: str, chat_id: str, message_id: str
    ) -> tuple[Message, list[MemberReceipt]]:
        def q(conn: sqlite3.Connection) -> tuple[Message, list[MemberReceipt]]:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLS} FROM messages WHERE id = ? AND chat_id = ?",
                (message_id, chat_id),
            ).fetchone()
            # Its sender may always ask (also after leaving); anyone else must be a member,
            # checked before telling whether the message exists.
            if (row is None or row[3] != user_id) and not conn.execute(
                "SELECT 1 FROM members WHERE chat_id = ? AND user_id = ?", (chat_id, user_id)
            ).fetchone():
                raise Forbidden("not a participant of this chat")
            if row is None:
                raise NotFound("no such message in this chat")
            message = _message_from_row(row)
            out = []
            users = conn.execute(
                "SELECT user_id FROM members WHERE chat_id = ? AND user_id != ? ORDER BY pos",
                (chat_id, message.sender),
            ).fetchall()
            for (user,) in users:
                times = dict(
                    conn.execute(
                        "SELECT kind, min(at) FROM receipt_log WHERE chat_id = ? AND user_id = ?"
                        " AND seq >= ? GROUP BY kind",
                        (chat_id, user, message.seq),
                    ).fetchall()
                )
                read_at = times.get("read")
                delivered_at = times.get("delivered")
                if read_at is not None and (delivered_at is None or read_at < delivered_at):
                    delivered_at = read_at
                out.append(MemberReceipt(user=user, delivered_at=delivered_at, read_at=read_at))
            return message, out

        return await self._db.read(q)

    async def sweep(self, before: int) -> SweepStats:
        messages = entries = 0
        device: int | None = 0
        while True:
            chunk = await self._db.write(partial(sweep_chunk, before=before, device_rowid=device))
            messages += chunk.messages
            entries += chunk.entries
            device = chunk.next_device
            if chunk.idle:
                await self._db.write(partial(forget_previews, before=before))
                await self._db.truncate_wal()
                return SweepStats(messages, entries)
