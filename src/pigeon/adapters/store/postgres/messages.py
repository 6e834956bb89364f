"""PostgreSQL implementation of `MessageStore`: the message path.

`send` and `ack` go through group commit (batching.py): the calls in flight at once on this node
share one call of a server-side function (batch_functions.py; set-based since migration 9,
set_functions.py), one round trip and one commit.
`mark_read` is one call of its own function (functions.py). Reads are one statement each (one
snapshot). The send batch of migration 7 (push_schema.py) stores each message's push preview
with it.

Sends of one device commit in the order they were made (the gateway relies on it: a connection's
messages keep the order it issued them in). The SQLite store gets that from its single writer
queue; here batches in flight on separate pooled connections commit in any order, so the sends'
group commit is keyed by device: a device's sends may share a batch (batch order is call
order), but none leaves while a batch with an earlier one is in flight (a device has one
connection, on one node).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from pigeon.adapters.store.postgres.batching import GroupCommit
from pigeon.adapters.store.postgres.db import PgDb, translate
from pigeon.domain.errors import Forbidden, NotFound, PigeonError
from pigeon.domain.events import Delivery, InboxEntry, InboxPage, Message, encode_event
from pigeon.domain.models import Device, MemberReceipt
from pigeon.ports import MessageStore, SendRequest, SendResult, SweepStats

#: Rows per table and per statement of a retention sweep (sends interleave between chunks).
SWEEP_CHUNK = 2000

_decode_message = msgspec.json.Decoder(Message).decode
_SEQ_PLACEHOLDER = b'"seq":0,'

# o_status of pigeon_send / pigeon_mark_read
_DUPLICATE, _NO_CHAT, _NOT_MEMBER = 1, 2, 3

_SEND = "SELECT * FROM pigeon_send_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_ACK = "SELECT o_k, o_device, o_iseq, o_payload FROM pigeon_ack_batch($1, $2, $3)"
_MARK_READ = "SELECT * FROM pigeon_mark_read($1, $2, $3, $4, $5)"
_READ_INBOX = """
SELECT d.next_iseq - 1 AS head, d.acked_iseq AS acked, e.iseq, e.raw
FROM devices d
LEFT JOIN LATERAL (
    SELECT iseq, raw FROM (
        SELECT i.iseq, coalesce(i.payload, m.raw) AS raw,
               sum(octet_length(coalesce(i.payload, m.raw))) OVER (ORDER BY i.iseq) AS upto
        FROM inbox i LEFT JOIN messages m ON m.id = i.message_id
        WHERE i.device_id = d.id AND i.iseq > $2 AND coalesce(i.payload, m.raw) IS NOT NULL
        ORDER BY i.iseq
        LIMIT $3
    ) page
    -- what fits in the byte budget, and the first entry whatever its size
    WHERE upto <= $4 OR upto = octet_length(raw)
) e ON true
WHERE d.id = $1
ORDER BY e.iseq
"""
_RECEIPTS_MESSAGE = """
SELECT m.id, m.chat_id, m.seq, m.sender, m.sender_device, m.cmid, m.at, m.raw,
       EXISTS (SELECT 1 FROM members WHERE chat_id = $2 AND user_id = $3) AS member
FROM (SELECT 1) AS one LEFT JOIN messages m ON m.id = $1 AND m.chat_id = $2
"""
_RECEIPTS_MEMBERS = """
SELECT mb.user_id,
    (SELECT min(r.at) FROM receipt_log r WHERE r.chat_id = $1 AND r.user_id = mb.user_id
        AND r.kind = 'delivered' AND r.seq >= $3) AS delivered_at,
    (SELECT min(r.at) FROM receipt_log r WHERE r.chat_id = $1 AND r.user_id = mb.user_id
        AND r.kind = 'read' AND r.seq >= $3) AS read_at
FROM members mb WHERE mb.chat_id = $1 AND mb.user_id <> $2
ORDER BY mb.pos
"""
# One chunk per table: the oldest rows by the `at` index, locked with SKIP LOCKED (the sweep
# never waits for, nor deadlocks with, the message path: a row locked right now is left for the
# next chunk or sweep), then deleted by their tuple ids (a TID scan: no second index lookup, and
# no plan that scans the whole table to join the chunk back).
_SWEEP = """
WITH e AS (
    DELETE FROM inbox WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM inbox WHERE at < $1 ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED))
    RETURNING 1
), m AS (
    DELETE FROM messages WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM messages WHERE at < $1 ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED))
    RETURNING 1
), r AS (
    DELETE FROM receipt_log WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM receipt_log WHERE at < $1 ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED))
    RETURNING 1
)
SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM e), (SELECT count(*) FROM r)
"""


def split_at_seq(draft: Message) -> tuple[bytes, bytes]:
    """The message's JSON around its `seq` value (encoded with seq 0): the database puts the
    seq it assigns in between, so the body is encoded once, here."""
    head, mark, tail = encode_event(draft).partition(_SEQ_PLACEHOLDER)
    assert mark and draft.seq == 0, "seq follows type, id and chat, which are plain strings"
    return head + b'"seq":', b"," + tail


def _message_from_row(row: Any, sender: str, sender_device: str, cmid: str) -> Message:
    raw: bytes | None = row["o_dup_raw"]
    if raw is not None:
        return _decode_message(raw)
    return Message(
        id=row["o_dup_id"],
        chat=row["o_dup_chat"],
        seq=row["o_seq"],
        sender=sender,
        sender_device=sender_device,
        cmid=cmid,
        at=row["o_dup_at"],
    )


def _deliveries(devices: list[str] | None, iseqs: list[int] | None, raws: Any) -> list[Delivery]:
    if not devices or not iseqs:
        return []
    if isinstance(raws, bytes):
        return [Delivery(d, i, raws) for d, i in zip(devices, iseqs, strict=True)]
    return [Delivery(d, i, r) for d, i, r in zip(devices, iseqs, raws, strict=True)]


class _Send:
    """One send of a batch: its request, the message it drafts and its arguments' row."""

    __slots__ = ("args", "draft", "head", "req", "tail")

    def __init__(self, req: SendRequest) -> None:
        self.req = req
        self.draft = req.message(0)
        self.head, self.tail = split_at_seq(self.draft)
        # PostgreSQL text cannot hold NUL; the preview is only a display aid (the body, in
        # JSON, keeps it as \u0000).
        preview = req.preview.replace("\x00", "\ufffd") if req.preview else req.preview
        self.args = (
            req.message_id,
            req.chat,
            req.sender,
            req.sender_device,
            req.cmid,
            req.at,
            self.head,
            self.tail,
            preview,
            # kept only while the body is (erased with it: see push_schema.py); the service
            # refuses control characters in it, NUL included
            req.push_preview,
        )

    def result(self, row: Any) -> SendResult | PigeonError:
        req = self.req
        status = row["o_status"]
        if status == _DUPLICATE:
            original = _message_from_row(row, req.sender, req.sender_device, req.cmid)
            return SendResult(original, True, [])
        if status == _NO_CHAT:
            return NotFound("no such chat")
        if status == _NOT_MEMBER:
            return Forbidden("not a participant of this chat")
        seq: int = row["o_seq"]
        raw = b"%s%d%s" % (self.head, seq, self.tail)
        deliveries = _deliveries(row["o_devices"], row["o_iseqs"], raw)
        deliveries += _deliveries(
            row["o_extra_devices"], row["o_extra_iseqs"], row["o_extra_payloads"]
        )
        return SendResult(msgspec.structs.replace(self.draft, seq=seq), False, deliveries)


def _answer(send: _Send, row: Any) -> SendResult | Exception:
    if row is None:
        return PigeonError("the store gave no answer for this send")
    try:
        return send.result(row)
    except Exception as exc:
        return translate(exc)


class PgMessages:
    """Messages, inboxes and receipts in PostgreSQL."""

    def __init__(self, db: PgDb, *, max_inflight: int = 1, max_batch: int = 256) -> None:
        self._db = db
        #: The group commits of sends and acks (their counters serve metrics and tests).
        self.sends = GroupCommit(
            self._send_batch,
            max_batch=max_batch,
            max_inflight=max_inflight,
            key=lambda send: send.req.sender_device,
        )
        self.acks = GroupCommit(self._ack_batch, max_batch=max_batch, max_inflight=max_inflight)

    async def send(self, req: SendRequest) -> SendResult:
        return await self.sends.call(_Send(req))

    async def _send_batch(self, sends: Sequence[_Send]) -> list[SendResult | Exception]:
        columns = list(zip(*(s.args for s in sends), strict=True))
        # A unique violation means a concurrent retry of the same (device, cmid) committed
        # first: run again to find it and answer `duplicate`.
        rows = await self._db.fetch(_SEND, *columns, retry_unique=True)
        by_k = {row["o_k"]: row for row in rows}
        # committed: from here on each send gets its own answer, whatever happens to another's
        return [_answer(send, by_k.get(k)) for k, send in enumerate(sends, 1)]

    async def ack(self, device: Device, upto: int, at: int) -> list[Delivery]:
        return await self.acks.call((device.id, upto, at))

    async def _ack_batch(self, acks: Sequence[tuple[str, int, int]]) -> list[list[Delivery]]:
        devices, uptos, ats = zip(*acks, strict=True)
        out: list[list[Delivery]] = [[] for _ in acks]
        for k, device, iseq, payload in await self._db.fetch(_ACK, devices, uptos, ats):
            out[k - 1].append(Delivery(device, iseq, payload))
        return out

    async def mark_read(self, device: Device, chat_id: str, seq: int, at: int) -> list[Delivery]:
        row = await self._db.fetchrow(_MARK_READ, device.id, device.user_id, chat_id, seq, at)
        if row["o_status"] == _NO_CHAT:
            raise NotFound("no such chat")
        if row["o_status"] == _NOT_MEMBER:
            raise Forbidden("not a participant of this chat")
        return _deliveries(row["o_devices"], row["o_iseqs"], row["o_payloads"])

    async def read_inbox(
        self, device_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> InboxPage:
        budget = max_bytes if max_bytes is not None else 2**62
        rows = await self._db.fetch(_READ_INBOX, device_id, after, limit, budget)
        if not rows:
            return InboxPage([], 0, 0)
        entries = [InboxEntry(r["iseq"], r["raw"]) for r in rows if r["iseq"] is not None]
        return InboxPage(entries, rows[0]["head"], rows[0]["acked"])

    async def acked_iseq(self, device_id: str) -> int:
        value = await self._db.fetchval("SELECT acked_iseq FROM devices WHERE id = $1", device_id)
        return 0 if value is None else int(value)

    async def receipts(
        self, user_id: str, chat_id: str, message_id: str
    ) -> tuple[Message, list[MemberReceipt]]:
        async def q(conn: asyncpg.Connection) -> tuple[Message, list[MemberReceipt]]:
            row = await conn.fetchrow(_RECEIPTS_MESSAGE, message_id, chat_id, user_id)
            # Its sender may always ask (also after leaving); anyone else must be a member,
            # checked before telling whether the message exists.
            if (row["id"] is None or row["sender"] != user_id) and not row["member"]:
                raise Forbidden("not a participant of this chat")
            if row["id"] is None:
                raise NotFound("no such message in this chat")
            raw: bytes | None = row["raw"]
            message = (
                _decode_message(raw)
                if raw is not None
                else Message(
                    id=row["id"],
                    chat=row["chat_id"],
                    seq=row["seq"],
                    sender=row["sender"],
                    sender_device=row["sender_device"],
                    cmid=row["cmid"],
                    at=row["at"],
                )
            )
            out = []
            for user, delivered_at, read_at in await conn.fetch(
                _RECEIPTS_MEMBERS, chat_id, message.sender, message.seq
            ):
                if read_at is not None and (delivered_at is None or read_at < delivered_at):
                    delivered_at = read_at
                out.append(MemberReceipt(user=user, delivered_at=delivered_at, read_at=read_at))
            return message, out

        return await self._db.run(q)

    async def sweep(self, before: int) -> SweepStats:
        messages = entries = 0
        while True:
            row = await self._db.fetchrow(_SWEEP, before, SWEEP_CHUNK)
            n_messages, n_entries, n_other = row[0], row[1], row[2]
            messages += n_messages
            entries += n_entries
            if n_messages == n_entries == n_other == 0:
                return SweepStats(messages, entries)


_check: type[MessageStore] = PgMessages
