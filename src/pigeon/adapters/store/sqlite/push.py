"""SQLite implementation of `PushStore`, and the embedded `PushQueue` over the same database.

The outbox is the `push_outbox` trigger (schema migration 5): appending a message entry to the
inbox of a device with a target marks that device's row of the chat in `push_jobs` pending, in
the same transaction. On one node that table is the queue as well, so no relay is needed: a
worker leases due rows with one `UPDATE ... RETURNING`, and a lease that runs out makes a row
claimable again. A row is one device and one chat, and a flag: entries that come while it is
pending write nothing, which is the coalescing (a burst of 50 messages is one write and one
push), and what the push says is counted from the inbox when it is sent.
"""

from __future__ import annotations

import sqlite3

import msgspec

from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.domain.events import Delivery
from pigeon.domain.push import MAX_COUNT, PushTarget
from pigeon.ports import (
    DeadLetter,
    PushContext,
    PushJob,
    PushQueue,
    PushQueueDepth,
    PushQueueStats,
    PushStore,
)

_decode_target = msgspec.json.Decoder(PushTarget).decode
#: Dead letters kept at most (the oldest are dropped): clients can make pushes fail.
MAX_DEAD_LETTERS = 10_000
#: Rows of finished jobs forgotten per claim, once their coalescing window has passed.
_FORGET_CHUNK = 500


def enqueue_invitations(
    conn: sqlite3.Connection, chat_id: str, deliveries: list[Delivery], at: int
) -> None:
    """Inside the transaction that appended them: the invited devices' entries are pushed like
    messages (the trigger covers message entries only). Devices without a target are skipped."""
    conn.executemany(
        "INSERT INTO push_jobs (device_id, chat_id, pending, invite_iseq, due_at)"
        " SELECT device_id, ?, 1, ?, ? + (SELECT grace_ms FROM push_policy) FROM push_targets"
        " WHERE device_id = ? AND target IS NOT NULL"
        " ON CONFLICT (device_id, chat_id) DO UPDATE SET invite_iseq = excluded.invite_iseq,"
        f" due_at = CASE WHEN pending = 0 THEN {_READY_AFTER_IDLE} ELSE due_at END, pending = 1",
        [(chat_id, d.iseq, at, d.device) for d in deliveries],
    )


#: When a job that was idle may be claimed: its grace, and the window since its last push.
_READY_AFTER_IDLE = "max(excluded.due_at, pushed_at + (SELECT window_ms FROM push_policy))"
#: The newest message of others in the chat that the device has not acked, up to an iseq: its
#: sender's name and push preview. None: nothing of this chat waits for the device.
_NEWEST = (
    "SELECT u.username, m.push_preview FROM inbox i JOIN messages m ON m.id = i.message_id"
    " JOIN users u ON u.id = m.sender"
    " WHERE i.device_id = ? AND i.iseq > ? AND i.iseq <= ? AND m.chat_id = ? AND m.sender != ?"
    " ORDER BY i.iseq DESC LIMIT 1"
)
#: The user's unread messages in the chat, and over all chats (the badge).
_UNREAD = (
    "SELECT coalesce(sum(CASE WHEN c.id = ? THEN c.last_seq - m.read_seq END), 0),"
    " coalesce(sum(c.last_seq - m.read_seq), 0)"
    " FROM members m JOIN chats c ON c.id = m.chat_id WHERE m.user_id = ?"
)
#: After a job is answered: does the chat have entries past what the job covered?
_STILL_PENDING = (
    "invite_iseq > last_iseq OR EXISTS (SELECT 1 FROM inbox i JOIN messages m"
    " ON m.id = i.message_id WHERE i.device_id = push_jobs.device_id"
    " AND i.iseq > push_jobs.last_iseq AND m.chat_id = push_jobs.chat_id)"
)


class SqlitePush:
    """Push targets and the privacy setting in SQLite."""

    def __init__(self, db: SqliteDb) -> None:
        self._db = db

    async def set_target(self, device_id: str, target: PushTarget | None, at: int) -> None:
        raw = None if target is None else msgspec.json.encode(target).decode()

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO push_targets (device_id, target, removed_reason, updated_at)"
                " SELECT id, ?, NULL, ? FROM devices WHERE id = ?"
                " ON CONFLICT (device_id) DO UPDATE SET target = excluded.target,"
                " removed_reason = NULL, updated_at = excluded.updated_at",
                (raw, at, device_id),
            )
            if target is None:  # nothing left to push to: its queued jobs go too
                conn.execute("DELETE FROM push_jobs WHERE device_id = ?", (device_id,))

        await self._db.write(tx)

    async def target_status(self, device_id: str) -> tuple[PushTarget | None, str | None]:
        def q(conn: sqlite3.Connection) -> tuple[PushTarget | None, str | None]:
            row = conn.execute(
                "SELECT target, removed_reason FROM push_targets WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if row is None:
                return None, None
            return (None if row[0] is None else _decode_target(row[0])), row[1]

        return await self._db.read(q)

    async def remove_gone(self, device_id: str, target: PushTarget, reason: str, at: int) -> bool:
        raw = msgspec.json.encode(target).decode()

        def tx(conn: sqlite3.Connection) -> bool:
            removed = conn.execute(
                "UPDATE push_targets SET target = NULL, removed_reason = ?, updated_at = ?"
                " WHERE device_id = ? AND target = ? RETURNING 1",
                (reason, at, device_id, raw),
            ).fetchone()
            if removed:
                conn.execute("DELETE FROM push_jobs WHERE device_id = ?", (device_id,))
            return removed is not None

        return await self._db.write(tx)

    async def set_show_names(self, user_id: str, show: bool) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE users SET push_names = ? WHERE id = ?", (int(show), user_id)
            )
        )

    async def context(self, device_id: str, chat_id: str, upto: int) -> PushContext | None:
        def q(conn: sqlite3.Connection) -> PushContext | None:
            row = conn.execute(
                "SELECT d.user_id, d.acked_iseq, t.target, u.push_names, u.disabled_at"
                " FROM devices d"
                " JOIN users u ON u.id = d.user_id"
                " LEFT JOIN push_targets t ON t.device_id = d.id WHERE d.id = ?",
                (device_id,),
            ).fetchone()
            if row is None:
                return None
            user_id, acked, raw, names, disabled_at = row
            args = (device_id, acked, upto, chat_id, user_id)
            newest = conn.execute(_NEWEST, args).fetchone()
            in_chat, unread = conn.execute(_UNREAD, (chat_id, user_id)).fetchone()
            return PushContext(
                target=None if raw is None else _decode_target(raw),
                user_id=user_id,
                waiting=newest is not None,
                count=min(max(0, in_chat), MAX_COUNT),
                acked_iseq=acked,
                unread=max(0, unread),
                sender_name=newest[0] if newest and names else None,
                preview=newest[1] if newest else None,
                disabled=disabled_at is not None,
            )

        return await self._db.read(q)


class SqlitePushQueue:
    """The embedded push queue: the `push_jobs` outbox table, leased row by row.

    A pending row's `due_at` is when it may be claimed (its grace and window are in it, and a
    lease or a retry moves it), so a claim reads one range of a partial index.
    """

    def __init__(self, db: SqliteDb) -> None:
        self._db = db

    async def configure(self, grace: float, window: float) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE push_policy SET grace_ms = ?, window_ms = ?",
                (int(grace * 1000), int(window * 1000)),
            )
        )

    async def claim(self, now: int, limit: int, visibility: float) -> list[PushJob]:
        lease = now + int(visibility * 1000)

        def tx(conn: sqlite3.Connection) -> list[PushJob]:
            conn.execute(
                "DELETE FROM push_jobs WHERE (device_id, chat_id) IN (SELECT device_id, chat_id"
                " FROM push_jobs WHERE pending = 0"
                " AND pushed_at < ? - (SELECT window_ms FROM push_policy) LIMIT ?)",
                (now, _FORGET_CHUNK),
            )
            # The push covers the entries that had their grace: a newer one may yet be acked
            # by a connected device, and keeps the job pending for later (see `_answer`).
            rows = conn.execute(
                "UPDATE push_jobs SET leased_until = ?, due_at = ?, attempts = attempts + 1,"
                " last_iseq = coalesce((SELECT iseq FROM inbox WHERE device_id ="
                " push_jobs.device_id AND at <= ? - (SELECT grace_ms FROM push_policy)"
                " ORDER BY iseq DESC LIMIT 1), 0)"
                " WHERE (device_id, chat_id) IN (SELECT device_id, chat_id FROM push_jobs"
                " WHERE pending = 1 AND due_at <= ? ORDER BY due_at LIMIT ?)"
                " RETURNING device_id, chat_id, last_iseq, invite_iseq, attempts",
                (lease, lease, now, now, limit),
            ).fetchall()
            return [
                PushJob(device=d, chat=c, last_iseq=i, invite_iseq=v, attempts=a, lease=lease)
                for d, c, i, v, a in rows
            ]

        return await self._db.write(tx)

    async def next_due(self) -> int | None:
        def q(conn: sqlite3.Connection) -> int | None:
            (when,) = conn.execute("SELECT min(due_at) FROM push_jobs WHERE pending = 1").fetchone()
            return None if when is None else int(when)

        return await self._db.read(q)

    async def done(self, job: PushJob, now: int, pushed: bool) -> None:
        await self._db.write(lambda conn: _answer(conn, job, now, pushed))

    async def retry(self, job: PushJob, due_at: int, error: str) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE push_jobs SET leased_until = 0, due_at = ?"
                " WHERE device_id = ? AND chat_id = ? AND leased_until = ?",
                (due_at, job.device, job.chat, job.lease),
            )
        )

    async def dead(self, job: PushJob, error: str, now: int) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if _answer(conn, job, now, pushed=False):
                conn.execute(
                    "INSERT INTO push_dead (device_id, chat_id, invite_iseq, attempts, error,"
                    " failed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (job.device, job.chat, job.invite_iseq, job.attempts, error[:500], now),
                )
                conn.execute(  # bounded: the oldest letters go first
                    "DELETE FROM push_dead WHERE id <= (SELECT max(id) FROM push_dead) - ?",
                    (MAX_DEAD_LETTERS,),
                )

        await self._db.write(tx)

    async def extend(self, job: PushJob, until: int) -> PushJob | None:
        extended = await self._db.write(
            lambda conn: conn.execute(
                "UPDATE push_jobs SET leased_until = ?, due_at = ?, attempts = ?"
                " WHERE device_id = ? AND chat_id = ? AND leased_until = ? RETURNING 1",
                (until, until, job.attempts, job.device, job.chat, job.lease),
            ).fetchone()
        )
        return None if extended is None else msgspec.structs.replace(job, lease=until)

    async def depth(self, now: int) -> PushQueueDepth:
        def q(conn: sqlite3.Connection) -> PushQueueDepth:
            pending, due, oldest = conn.execute(  # the partial index `push_jobs_due` covers it
                "SELECT count(*), coalesce(sum(due_at <= ?), 0),"
                " min(CASE WHEN due_at <= ? THEN due_at END) FROM push_jobs WHERE pending = 1",
                (now, now),
            ).fetchone()
            return PushQueueDepth(pending=pending, due=due, oldest_due_at=oldest)

        return await self._db.read(q)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        def q(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                "SELECT id, device_id, chat_id, attempts, error, failed_at FROM push_dead"
                " ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                DeadLetter(id=i, device=d, chat=c, attempts=a, error=e, failed_at=f)
                for i, d, c, a, e, f in rows
            ]

        return await self._db.read(q)

    async def retry_dead(self, ids: list[int] | None, now: int) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            moved = 0
            for device, chat, invite_iseq in _take_dead(conn, ids):
                conn.execute(
                    "INSERT INTO push_jobs (device_id, chat_id, pending, invite_iseq, due_at)"
                    " SELECT id, ?, 1, ?, ? FROM devices WHERE id = ?"
                    # a job leased right now stays its worker's (whose push covers these)
                    " ON CONFLICT (device_id, chat_id) DO UPDATE SET pending = 1,"
                    " invite_iseq = max(invite_iseq, excluded.invite_iseq), pushed_at = 0,"
                    " last_iseq = CASE WHEN leased_until > ? THEN last_iseq ELSE 0 END,"
                    " due_at = CASE WHEN leased_until > ? THEN due_at ELSE excluded.due_at END",
                    (chat, invite_iseq, now, device, now, now),
                )
                moved += 1
            return moved

        return await self._db.write(tx)

    async def drop_dead(self, ids: list[int] | None) -> int:
        return await self._db.write(lambda conn: len(_take_dead(conn, ids)))


def _answer(conn: sqlite3.Connection, job: PushJob, now: int, pushed: bool) -> bool:
    """End the job's lease: idle again, or still pending if entries of the chat came after
    what it covered (due after a grace from `now`, and the window if it was pushed). False if
    the lease was no longer this job's."""
    pushed_at = "CASE WHEN ? THEN ? ELSE pushed_at END"
    answered = conn.execute(
        f"UPDATE push_jobs SET pending = CASE WHEN {_STILL_PENDING} THEN 1 ELSE 0 END,"
        " invite_iseq = CASE WHEN invite_iseq > last_iseq THEN invite_iseq ELSE 0 END,"
        " attempts = 0, leased_until = 0,"
        " due_at = max(? + (SELECT grace_ms FROM push_policy),"
        f" {pushed_at} + (SELECT window_ms FROM push_policy)),"
        f" pushed_at = {pushed_at}"
        " WHERE device_id = ? AND chat_id = ? AND leased_until = ? RETURNING 1",
        (now, pushed, now, pushed, now, job.device, job.chat, job.lease),
    ).fetchone()
    return answered is not None


def _take_dead(conn: sqlite3.Connection, ids: list[int] | None) -> list[tuple[str, str, int]]:
    """Delete the named dead letters (all if None) and return what they held."""
    if ids == []:
        return []
    if ids is None:
        sql, args = "DELETE FROM push_dead", []
    else:
        sql = f"DELETE FROM push_dead WHERE id IN ({','.join('?' * len(ids))})"
        args = list(ids)
    rows = conn.execute(f"{sql} RETURNING device_id, chat_id, invite_iseq", args)
    return [(d, c, v) for d, c, v in rows]


_check_store: type[PushStore] = SqlitePush
_check_queue: type[PushQueue] = SqlitePushQueue
_check_stats: type[PushQueueStats] = SqlitePushQueue
