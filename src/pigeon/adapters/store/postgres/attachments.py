"""PostgreSQL implementation of `AttachmentStore`.

Attachments are a cold path next to messages: plain statements through `PgDb` (asyncpg prepares
and caches each constant statement per connection), and one short client-side transaction for
`create`. Its quota is made exact across nodes by a transaction-level advisory lock on the owner
taken before counting: two creations by one owner queue on it, so neither counts without the
other's row. Readability is a join (shares x `members`), so it follows membership changes with
nothing to update here.

Lock interplay: `share` inserts a row whose foreign key takes a KEY SHARE lock on the attachment
(and on the chat, compatible with the message path's NO KEY UPDATE locks). The sweep locks what it
deletes FOR UPDATE SKIP LOCKED: an attachment being shared or marked uploaded right now is left for
the next sweep, and a share that comes after the sweep locked its attachment waits for it and then
fails (`Conflict`) instead of leaving a share of a deleted attachment.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from pigeon.adapters.store import attachment_rows as rows
from pigeon.adapters.store.postgres.db import PgDb
from pigeon.domain.errors import NotFound
from pigeon.domain.media import AttachmentRecord, refuse_if_over_quota
from pigeon.ports import AttachmentStore

#: Attachments examined per statement of a sweep (other writes interleave between chunks).
SWEEP_CHUNK = 2000
#: First key of the two-key advisory locks on owners ("at" in ASCII), so that they never meet
#: another use of advisory locks (the migration lock is a one-key lock: another key space).
QUOTA_LOCK_CLASS = 0x6174


_LOCK_OWNER = "SELECT pg_advisory_xact_lock($1, hashtext($2))"
# The owner's `max_per_window`-th newest attachment in the window: if there is one, the quota is
# used up until the window moves past it.
_BLOCKING = """
SELECT created_at FROM attachments WHERE owner = $1 AND created_at >= $2
ORDER BY created_at DESC LIMIT 1 OFFSET $3
"""
_INSERT = f"""
INSERT INTO attachments ({rows.COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)
"""
_GET = f"SELECT {rows.COLS} FROM attachments WHERE id = $1"
_MARK_UPLOADED = f"""
UPDATE attachments SET uploaded_at = coalesce(uploaded_at, $2), meta = $3::jsonb
WHERE id = $1 RETURNING {rows.COLS}
"""
# True if the attachment exists (shared now or before), False if not (nothing inserted).
_SHARE = """
WITH a AS (SELECT id FROM attachments WHERE id = $1),
ins AS (
    INSERT INTO attachment_chats (attachment_id, chat_id) SELECT id, $2 FROM a
    ON CONFLICT DO NOTHING
)
SELECT EXISTS (SELECT 1 FROM a)
"""
_MAY_READ = """
SELECT EXISTS (SELECT 1 FROM attachments WHERE id = $1 AND owner = $2)
    OR EXISTS (SELECT 1 FROM attachment_chats s JOIN members m ON m.chat_id = s.chat_id
               WHERE s.attachment_id = $1 AND m.user_id = $2)
"""
# One chunk: the next candidates in (created_at, id) order after the cursor ($3, $4), read
# without locks; of those, the ones a rule condemns (past retention $2, or past the cut-off $1
# and never shared), locked SKIP LOCKED and rechecked; their shares, then themselves, deleted.
# Returns the deleted ids, the number of candidates and the last one (the next cursor).
_SWEEP = """
WITH c AS (
    SELECT id, created_at FROM attachments
    WHERE created_at < $1 AND (created_at, id) > ($3, $4)
    ORDER BY created_at, id LIMIT $5
), doomed AS (
    SELECT a.id FROM attachments a
    WHERE a.id IN (SELECT id FROM c) AND a.created_at < $1 AND (a.created_at < $2
        OR NOT EXISTS (SELECT 1 FROM attachment_chats s WHERE s.attachment_id = a.id))
    FOR UPDATE SKIP LOCKED
), s AS (
    DELETE FROM attachment_chats WHERE attachment_id IN (SELECT id FROM doomed)
), d AS (
    DELETE FROM attachments WHERE id IN (SELECT id FROM doomed) RETURNING id
), last AS (
    SELECT created_at, id FROM c ORDER BY created_at DESC, id DESC LIMIT 1
)
SELECT array(SELECT id FROM d) AS ids, (SELECT count(*) FROM c) AS examined,
    (SELECT created_at FROM last) AS last_at, (SELECT id FROM last) AS last_id
"""


class PgAttachments:
    """Attachment records and their shares into chats, in PostgreSQL."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    async def create(
        self, record: AttachmentRecord, *, max_per_window: int, window_start: int
    ) -> None:
        async def tx(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                blocking_at = None
                if max_per_window > 0:
                    await conn.execute(_LOCK_OWNER, QUOTA_LOCK_CLASS, record.owner)
                    blocking_at = await conn.fetchval(
                        _BLOCKING, record.owner, window_start, max_per_window - 1
                    )
                refuse_if_over_quota(blocking_at, max_per_window, window_start)
                await conn.execute(
                    _INSERT,
                    record.id,
                    record.owner,
                    record.content_type,
                    record.size,
                    record.sha256,
                    record.filename,
                    record.encrypted,
                    record.created_at,
                    record.uploaded_at,
                    rows.encode_meta(record.meta),
                )

        await self._db.run(tx)

    async def get(self, attachment_id: str) -> AttachmentRecord | None:
        row = await self._db.fetchrow(_GET, attachment_id)
        return None if row is None else rows.record(row)

    async def mark_uploaded(
        self, attachment_id: str, at: int, meta: dict[str, Any]
    ) -> AttachmentRecord | None:
        row = await self._db.fetchrow(_MARK_UPLOADED, attachment_id, at, rows.encode_meta(meta))
        return None if row is None else rows.record(row)

    async def share(self, attachment_id: str, chat_id: str) -> None:
        if not await self._db.fetchval(_SHARE, attachment_id, chat_id):
            raise NotFound("no such attachment")

    async def may_read(self, user_id: str, attachment_id: str) -> bool:
        return bool(await self._db.fetchval(_MAY_READ, attachment_id, user_id))

    async def sweep(self, before: int, unshared_before: int) -> list[str]:
        deleted: list[str] = []
        cut_off = max(before, unshared_before)
        after = rows.BEFORE_ALL
        while True:
            row = await self._db.fetchrow(_SWEEP, cut_off, before, *after, SWEEP_CHUNK)
            deleted += row["ids"]
            if row["examined"] < SWEEP_CHUNK:
                return deleted
            after = (row["last_at"], row["last_id"])


_check: type[AttachmentStore] = PgAttachments
