"""PostgreSQL implementation of `PushStore`, and a `PushQueue` over the outbox table.

The outbox is the `push_outbox` trigger of migration 7 (push_schema.py): appending a message
entry to the inbox of a device with a target marks that device's row of the chat in `push_jobs`
pending, in the same transaction, as on SQLite. With `push.queue = "store"` that table is also
the queue of every node's worker; with `"rabbitmq"` (adapters/push/rabbitmq.py) it is the outbox
its relays claim from. Either way a claim leases due rows with one `UPDATE ... RETURNING` whose
rows are picked with `FOR UPDATE SKIP LOCKED`, so claimers on many nodes never get the same job
and never wait for each other (docs/architecture.md, "Push", says why clusters should use
RabbitMQ: a table queue puts polling and churn on the database every send waits on). Each port
call is one statement or one function call: one round trip.
"""

from __future__ import annotations

import asyncpg
import msgspec

from pigeon.adapters.store.postgres.db import PgDb
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

_GRACE = "coalesce((SELECT p.grace_ms FROM push_policy p), 0)"
_WINDOW = "coalesce((SELECT p.window_ms FROM push_policy p), 0)"

# The device's row is locked first (the lock order: devices, then their jobs): a send batch
# writing several of its jobs finishes first, instead of deadlocking with the delete, and sends
# after it see the target gone. A job such a send had just created is not seen by the delete
# (its snapshot is older): the worker finds no target and lets it go.
_SET_TARGET = """
WITH d AS MATERIALIZED (
    SELECT id FROM devices WHERE id = $1 FOR NO KEY UPDATE
), t AS (
    INSERT INTO push_targets (device_id, target, removed_reason, updated_at)
    SELECT d.id, $2, NULL, $3 FROM d
    ON CONFLICT (device_id) DO UPDATE SET target = excluded.target, removed_reason = NULL,
        updated_at = excluded.updated_at
), j AS (
    DELETE FROM push_jobs WHERE device_id = (SELECT d.id FROM d) AND $2::text IS NULL
)
SELECT 1
"""
_REMOVE_GONE = """
WITH d AS MATERIALIZED (
    SELECT id FROM devices WHERE id = $1 FOR NO KEY UPDATE
), r AS (
    UPDATE push_targets SET target = NULL, removed_reason = $3, updated_at = $4
    WHERE device_id = (SELECT d.id FROM d) AND target = $2
    RETURNING device_id
), j AS (
    DELETE FROM push_jobs WHERE device_id = (SELECT r.device_id FROM r)
)
SELECT count(*) FROM r
"""
# The device, its target and setting, and whether its user is disabled; the newest message of
# others in the chat that it has not acked, up to `upto` (its sender's name and push preview);
# the user's unread messages in the chat and over all chats (the badge).
_CONTEXT = """
SELECT d.user_id, d.acked_iseq, t.target, u.push_names, u.disabled_at IS NOT NULL AS disabled,
       w.username AS sender_name, w.push_preview, w.waiting,
       coalesce(c.in_chat, 0)::bigint AS in_chat, coalesce(c.total, 0)::bigint AS total
FROM devices d
JOIN users u ON u.id = d.user_id
LEFT JOIN push_targets t ON t.device_id = d.id
LEFT JOIN LATERAL (
    SELECT s.username, m.push_preview, true AS waiting
    FROM inbox i
    JOIN messages m ON m.id = i.message_id
    JOIN users s ON s.id = m.sender
    WHERE i.device_id = d.id AND i.iseq > d.acked_iseq AND i.iseq <= $3
      AND m.chat_id = $2 AND m.sender <> d.user_id
    ORDER BY i.iseq DESC
    LIMIT 1
) w ON true
LEFT JOIN LATERAL (
    SELECT sum(ch.last_seq - me.read_seq) FILTER (WHERE ch.id = $2) AS in_chat,
           sum(ch.last_seq - me.read_seq) AS total
    FROM members me JOIN chats ch ON ch.id = me.chat_id
    WHERE me.user_id = d.user_id
) c ON true
WHERE d.id = $1
"""
# Forget a chunk of finished jobs whose window has passed, and lease up to $3 due ones. The
# push covers the device's entries that had their grace: a younger one may yet be acked by a
# connected device, and keeps the job pending when it is answered. Rows locked by a send or by
# another worker are skipped, not waited for.
_CLAIM = f"""
WITH forgotten AS (
    DELETE FROM push_jobs WHERE (device_id, chat_id) IN (
        SELECT f.device_id, f.chat_id FROM push_jobs f
        WHERE NOT f.pending AND f.pushed_at < $1 - {_WINDOW}
        LIMIT {_FORGET_CHUNK}
        FOR UPDATE SKIP LOCKED
    )
)
UPDATE push_jobs j SET
    leased_until = $2, due_at = $2, attempts = j.attempts + 1,
    last_iseq = coalesce((
        SELECT i.iseq FROM inbox i
        WHERE i.device_id = j.device_id AND i.at <= $1 - {_GRACE}
        ORDER BY i.iseq DESC
        LIMIT 1
    ), 0)
WHERE (j.device_id, j.chat_id) IN (
    SELECT q.device_id, q.chat_id FROM push_jobs q
    WHERE q.pending AND q.due_at <= $1
    ORDER BY q.due_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING j.device_id, j.chat_id, j.last_iseq, j.invite_iseq, j.attempts
"""
_ANSWER = "SELECT pigeon_push_answer($1, $2, $3, $4, $5, $6, $7, $8, $9)"
# Dead letters back into the queue, due at $2 (merged per job: an upsert may not touch a row
# twice). A job leased right now stays its worker's, whose push covers these.
_RETRY_DEAD = """
WITH taken AS (
    DELETE FROM push_dead WHERE $1::bigint[] IS NULL OR id = ANY($1::bigint[])
    RETURNING device_id, chat_id, invite_iseq
), queued AS (
    INSERT INTO push_jobs AS j (device_id, chat_id, pending, invite_iseq, due_at)
    SELECT t.device_id, t.chat_id, true, max(t.invite_iseq), $2 FROM taken t
    GROUP BY t.device_id, t.chat_id
    ON CONFLICT (device_id, chat_id) DO UPDATE SET
        pending = true,
        invite_iseq = greatest(j.invite_iseq, excluded.invite_iseq),
        pushed_at = 0,
        last_iseq = CASE WHEN j.leased_until > $2 THEN j.last_iseq ELSE 0 END,
        due_at = CASE WHEN j.leased_until > $2 THEN j.due_at ELSE excluded.due_at END
)
SELECT count(*) FROM taken
"""
_DROP_DEAD = """
WITH taken AS (
    DELETE FROM push_dead WHERE $1::bigint[] IS NULL OR id = ANY($1::bigint[]) RETURNING 1
)
SELECT count(*) FROM taken
"""
# Invited devices' jobs (the trigger covers message entries only): $2/$3 the entries appended,
# $5 the invited users, whose devices get a job (if they have a target).
_INVITE = f"""
INSERT INTO push_jobs AS j (device_id, chat_id, pending, invite_iseq, due_at)
SELECT e.device, $1, true, e.iseq, $4 + {_GRACE}
FROM unnest($2::text[], $3::bigint[]) AS e(device, iseq)
JOIN devices d ON d.id = e.device AND d.user_id = ANY($5::text[])
JOIN push_targets t ON t.device_id = e.device AND t.target IS NOT NULL
ON CONFLICT (device_id, chat_id) DO UPDATE SET
    invite_iseq = excluded.invite_iseq,
    due_at = CASE WHEN j.pending THEN j.due_at
                  ELSE greatest(excluded.due_at, j.pushed_at + {_WINDOW}) END,
    pending = true
"""


async def enqueue_invitations(
    conn: asyncpg.Connection,
    chat_id: str,
    deliveries: list[Delivery],
    invited: set[str],
    at: int,
) -> None:
    """Inside the transaction that appended them (which holds the devices' locks): the invited
    users' devices' entries are pushed like messages. Devices without a target are skipped."""
    if not invited or not deliveries:
        return
    await conn.execute(
        _INVITE,
        chat_id,
        [d.device for d in deliveries],
        [d.iseq for d in deliveries],
        at,
        sorted(invited),
    )


class PgPush:
    """Push targets and the privacy setting in PostgreSQL."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    async def set_target(self, device_id: str, target: PushTarget | None, at: int) -> None:
        raw = None if target is None else msgspec.json.encode(target).decode()
        await self._db.execute(_SET_TARGET, device_id, raw, at)

    async def target_status(self, device_id: str) -> tuple[PushTarget | None, str | None]:
        row = await self._db.fetchrow(
            "SELECT target, removed_reason FROM push_targets WHERE device_id = $1", device_id
        )
        if row is None:
            return None, None
        raw: str | None = row["target"]
        return (None if raw is None else _decode_target(raw)), row["removed_reason"]

    async def remove_gone(self, device_id: str, target: PushTarget, reason: str, at: int) -> bool:
        raw = msgspec.json.encode(target).decode()
        return bool(await self._db.fetchval(_REMOVE_GONE, device_id, raw, reason, at))

    async def set_show_names(self, user_id: str, show: bool) -> None:
        await self._db.execute("UPDATE users SET push_names = $2 WHERE id = $1", user_id, show)

    async def context(self, device_id: str, chat_id: str, upto: int) -> PushContext | None:
        row = await self._db.fetchrow(_CONTEXT, device_id, chat_id, upto)
        if row is None:
            return None
        raw: str | None = row["target"]
        waiting = bool(row["waiting"])
        return PushContext(
            target=None if raw is None else _decode_target(raw),
            user_id=row["user_id"],
            waiting=waiting,
            count=min(max(0, row["in_chat"]), MAX_COUNT),
            acked_iseq=row["acked_iseq"],
            unread=max(0, row["total"]),
            sender_name=row["sender_name"] if waiting and row["push_names"] else None,
            preview=row["push_preview"] if waiting else None,
            disabled=row["disabled"],
        )


class PgPushQueue:
    """The push queue of a PostgreSQL cluster for now: `push_jobs`, leased by every node's
    worker with `FOR UPDATE SKIP LOCKED`.

    A pending row's `due_at` is when it may be claimed (its grace and window are in it, and a
    lease or a retry moves it), so a claim reads one range of a partial index.
    """

    def __init__(self, db: PgDb) -> None:
        self._db = db

    async def configure(self, grace: float, window: float) -> None:
        await self._db.execute(
            "INSERT INTO push_policy (id, grace_ms, window_ms) VALUES (1, $1, $2)"
            " ON CONFLICT (id) DO UPDATE SET grace_ms = excluded.grace_ms,"
            " window_ms = excluded.window_ms",
            int(grace * 1000),
            int(window * 1000),
        )

    async def claim(self, now: int, limit: int, visibility: float) -> list[PushJob]:
        lease = now + int(visibility * 1000)
        rows = await self._db.fetch(_CLAIM, now, lease, limit)
        return [
            PushJob(
                device=r["device_id"],
                chat=r["chat_id"],
                last_iseq=r["last_iseq"],
                invite_iseq=r["invite_iseq"],
                attempts=r["attempts"],
                lease=lease,
            )
            for r in rows
        ]

    async def next_due(self) -> int | None:
        when = await self._db.fetchval("SELECT min(due_at) FROM push_jobs WHERE pending")
        return None if when is None else int(when)

    async def done(self, job: PushJob, now: int, pushed: bool) -> None:
        await self._answer(job, now, pushed, None)

    async def retry(self, job: PushJob, due_at: int, error: str) -> None:
        await self._db.execute(
            "UPDATE push_jobs SET leased_until = 0, due_at = $1"
            " WHERE device_id = $2 AND chat_id = $3 AND leased_until = $4",
            due_at,
            job.device,
            job.chat,
            job.lease,
        )

    async def dead(self, job: PushJob, error: str, now: int) -> None:
        await self._answer(job, now, False, error[:500])

    async def extend(self, job: PushJob, until: int) -> PushJob | None:
        extended = await self._db.fetchval(
            "UPDATE push_jobs SET leased_until = $1, due_at = $1, attempts = $2"
            " WHERE device_id = $3 AND chat_id = $4 AND leased_until = $5 RETURNING 1",
            until,
            job.attempts,
            job.device,
            job.chat,
            job.lease,
        )
        return None if extended is None else msgspec.structs.replace(job, lease=until)

    async def depth(self, now: int) -> PushQueueDepth:
        # one statement over the partial index `push_jobs_due` (pending rows only); a leased
        # job's due_at is its lease's end, so it is pending and not due
        r = await self._db.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE due_at <= $1),"
            " min(due_at) FILTER (WHERE due_at <= $1) FROM push_jobs WHERE pending",
            now,
        )
        return PushQueueDepth(pending=r[0], due=r[1], oldest_due_at=r[2])

    async def _answer(self, job: PushJob, now: int, pushed: bool, error: str | None) -> None:
        await self._db.fetchval(
            _ANSWER,
            job.device,
            job.chat,
            job.lease,
            now,
            pushed,
            error,
            job.invite_iseq,
            job.attempts,
            MAX_DEAD_LETTERS,
        )

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        rows = await self._db.fetch(
            "SELECT id, device_id, chat_id, attempts, error, failed_at FROM push_dead"
            " ORDER BY id LIMIT $1",
            limit,
        )
        return [
            DeadLetter(
                id=r["id"],
                device=r["device_id"],
                chat=r["chat_id"],
                attempts=r["attempts"],
                error=r["error"],
                failed_at=r["failed_at"],
            )
            for r in rows
        ]

    async def retry_dead(self, ids: list[int] | None, now: int) -> int:
        if ids == []:
            return 0
        return int(await self._db.fetchval(_RETRY_DEAD, ids, now))

    async def drop_dead(self, ids: list[int] | None) -> int:
        if ids == []:
            return 0
        return int(await self._db.fetchval(_DROP_DEAD, ids))


_check_store: type[PushStore] = PgPush
_check_queue: type[PushQueue] = PgPushQueue
_check_stats: type[PushQueueStats] = PgPushQueue
