"""SQLite implementation of `AttachmentStore`.

Writes run as jobs of the single writer (`SqliteDb.write`), so the quota check and the insert of
`create` can never interleave with another creation: the count is exact without any lock. Reads
(`get`, `may_read`) run on the reader pool. Readability is a join (shares x `members`), so it
follows membership changes with nothing to update here.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

from pigeon.adapters.store import attachment_rows as rows
from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.domain.errors import NotFound
from pigeon.domain.media import AttachmentRecord, refuse_if_over_quota
from pigeon.ports import AttachmentStore

#: Attachments examined per write job of a sweep (other writes interleave between chunks).
SWEEP_CHUNK = 2000

_MAY_READ = """
SELECT EXISTS (SELECT 1 FROM attachments WHERE id = ?1 AND owner = ?2)
    OR EXISTS (SELECT 1 FROM attachment_chats s JOIN members m ON m.chat_id = s.chat_id
               WHERE s.attachment_id = ?1 AND m.user_id = ?2)
"""
# The next chunk of sweep candidates in (created_at, id) order after the cursor, each with
# whether a rule condemns it: past retention, or past the unshared cut-off and never shared.
_SWEEP_CANDIDATES = """
SELECT id, created_at, created_at < ?2
    OR NOT EXISTS (SELECT 1 FROM attachment_chats s WHERE s.attachment_id = a.id)
FROM attachments a
WHERE created_at < ?1 AND (created_at, id) > (?3, ?4)
ORDER BY created_at, id LIMIT ?5
"""


class SqliteAttachments:
    """Attachment records and their shares into chats, in SQLite."""

    def __init__(self, db: SqliteDb) -> None:
        self._db = db

    async def create(
        self, record: AttachmentRecord, *, max_per_window: int, window_start: int
    ) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            row = None
            if max_per_window > 0:
                row = conn.execute(
                    "SELECT created_at FROM attachments WHERE owner = ? AND created_at >= ?"
                    " ORDER BY created_at DESC LIMIT 1 OFFSET ?",
                    (record.owner, window_start, max_per_window - 1),
                ).fetchone()
            refuse_if_over_quota(None if row is None else row[0], max_per_window, window_start)
            conn.execute(
                f"INSERT INTO attachments ({rows.COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.owner,
                    record.content_type,
                    record.size,
                    record.sha256,
                    record.filename,
                    int(record.encrypted),
                    record.created_at,
                    record.uploaded_at,
                    rows.encode_meta(record.meta),
                ),
            )

        await self._db.write(tx)

    async def get(self, attachment_id: str) -> AttachmentRecord | None:
        def q(conn: sqlite3.Connection) -> AttachmentRecord | None:
            row = conn.execute(
                f"SELECT {rows.COLS} FROM attachments WHERE id = ?", (attachment_id,)
            ).fetchone()
            return None if row is None else rows.record(row)

        return await self._db.read(q)

    async def mark_uploaded(
        self, attachment_id: str, at: int, meta: dict[str, Any]
    ) -> AttachmentRecord | None:
        def tx(conn: sqlite3.Connection) -> AttachmentRecord | None:
            row = conn.execute(
                "UPDATE attachments SET uploaded_at = coalesce(uploaded_at, ?), meta = ?"
                f" WHERE id = ? RETURNING {rows.COLS}",
                (at, rows.encode_meta(meta), attachment_id),
            ).fetchone()
            return None if row is None else rows.record(row)

        return await self._db.write(tx)

    async def share(self, attachment_id: str, chat_id: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if not conn.execute(
                "SELECT 1 FROM attachments WHERE id = ?", (attachment_id,)
            ).fetchone():
                raise NotFound("no such attachment")
            conn.execute(
                "INSERT OR IGNORE INTO attachment_chats (attachment_id, chat_id) VALUES (?, ?)",
                (attachment_id, chat_id),
            )

        await self._db.write(tx)

    async def may_read(self, user_id: str, attachment_id: str) -> bool:
        def q(conn: sqlite3.Connection) -> bool:
            return bool(conn.execute(_MAY_READ, (attachment_id, user_id)).fetchone()[0])

        return await self._db.read(q)

    async def sweep(self, before: int, unshared_before: int) -> list[str]:
        deleted: list[str] = []
        after: tuple[int, str] | None = rows.BEFORE_ALL
        while after is not None:
            ids, after = await self._db.write(
                functools.partial(
                    _sweep_chunk, before=before, unshared=unshared_before, after=after
                )
            )
            deleted += ids
        return deleted


def _sweep_chunk(
    conn: sqlite3.Connection, *, before: int, unshared: int, after: tuple[int, str]
) -> tuple[list[str], tuple[int, str] | None]:
    """Examine the next bounded chunk of old attachments and delete the condemned ones with
    their shares. Returns their ids and where the next chunk starts (None: done)."""
    rows = conn.execute(
        _SWEEP_CANDIDATES,
        (max(before, unshared), before, after[0], after[1], SWEEP_CHUNK),
    ).fetchall()
    doomed = [(r[0],) for r in rows if r[2]]
    conn.executemany("DELETE FROM attachment_chats WHERE attachment_id = ?", doomed)
    conn.executemany("DELETE FROM attachments WHERE id = ?", doomed)
    last = (rows[-1][1], rows[-1][0]) if len(rows) == SWEEP_CHUNK else None
    return [d for (d,) in doomed], last


_check: type[AttachmentStore] = SqliteAttachments
