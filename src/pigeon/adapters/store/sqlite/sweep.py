"""The SQLite retention sweep: what outlived the retention, found without an index on time.

An index on `at` would be written on the message path (an entry for every inbox row, inserted
with the row and deleted with its ack; one for every message) only for this hourly sweep: it
cost ~3% of the store path's instructions and a page of WAL per commit. The sweep finds the
same rows through orders the tables already keep:

- **messages** leave in insertion order: a rowid table without deletes but this sweep's, so
  its rowids ascend with the clock, and the expired rows are a prefix of the table.
- **inbox entries** leave per device: a device's `iseq` ascends with the clock, so its expired
  entries are a prefix of its primary-key range. The sweep walks the devices (by rowid, a
  bounded slice per chunk), and reads a device's entries only if its counters say it has some.
- the **receipt log** keeps its index on `at` (a row is written once per receipt and never
  deleted on the message path, so its index costs little).

A row behind a younger one (the clock stepped back between them) waits for the younger one, at
most by the step. Each chunk is one write job, bounded in rows read and deleted, so sends
interleave with a long sweep.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

#: Rows per table deleted by one chunk, and devices looked at by one chunk.
CHUNK = 2000


@dataclass
class SweepChunk:
    """What one chunk deleted, and where the walk over the devices goes on (None: done)."""

    messages: int
    entries: int
    receipts: int
    next_device: int | None

    @property
    def idle(self) -> bool:
        """Nothing left to delete in any table."""
        return self.messages == self.receipts == 0 and self.next_device is None


def sweep_chunk(conn: sqlite3.Connection, before: int, device_rowid: int | None) -> SweepChunk:
    """Delete one bounded chunk of what is older than `before`; the inboxes from the device
    after `device_rowid` on (None: their walk is over)."""
    messages = _expired_messages(conn, before)
    entries, next_device = (
        (0, None) if device_rowid is None else _expired_entries(conn, before, device_rowid)
    )
    receipts = conn.execute(
        "DELETE FROM receipt_log WHERE (chat_id, user_id, kind, seq) IN"
        " (SELECT chat_id, user_id, kind, seq FROM receipt_log WHERE at < ? LIMIT ?)",
        (before, CHUNK),
    ).rowcount
    return SweepChunk(messages, entries, receipts, next_device)


def forget_previews(conn: sqlite3.Connection, before: int) -> None:
    """The chat list's previews of chats quiet since before the cut-off (once per sweep: a
    scan of the chats)."""
    conn.execute(
        "UPDATE chats SET last_preview = NULL"
        " WHERE last_activity_at < ? AND last_preview IS NOT NULL",
        (before,),
    )


def _expired_prefix(rows: Iterable[tuple[int, int]], before: int) -> tuple[int | None, int]:
    """Of `(key, at)` rows in key order, the last key of the leading run older than `before`
    and that run's length (it stops reading at the first younger row)."""
    last = None
    n = 0
    for key, at in rows:
        if at >= before:
            break
        last, n = key, n + 1
    return last, n


def _expired_messages(conn: sqlite3.Connection, before: int) -> int:
    rows = conn.execute("SELECT rowid, at FROM messages ORDER BY rowid LIMIT ?", (CHUNK,))
    last, n = _expired_prefix(rows, before)
    if last is not None:
        conn.execute("DELETE FROM messages WHERE rowid <= ?", (last,))
    return n


def _expired_entries(conn: sqlite3.Connection, before: int, after: int) -> tuple[int, int | None]:
    """The expired entries of the devices after rowid `after`: (deleted, the rowid to go on
    after, None once every device was seen)."""
    devices = conn.execute(
        "SELECT rowid, id, next_iseq - 1 > acked_iseq FROM devices WHERE rowid > ?"
        " ORDER BY rowid LIMIT ?",
        (after, CHUNK),
    ).fetchall()
    if not devices:
        return 0, None
    budget = CHUNK
    for rowid, device_id, waiting in devices:
        if not waiting:  # entries exist only past the device's ack (`inbox.take` drops the rest)
            continue
        rows = conn.execute(
            "SELECT iseq, at FROM inbox WHERE device_id = ? ORDER BY iseq LIMIT ?",
            (device_id, budget),
        )
        last, n = _expired_prefix(rows, before)
        if last is None:
            continue
        conn.execute("DELETE FROM inbox WHERE device_id = ? AND iseq <= ?", (device_id, last))
        budget -= n
        if budget == 0:  # this device may have more: the next chunk starts with it again
            return CHUNK, rowid - 1
    return CHUNK - budget, devices[-1][0]
