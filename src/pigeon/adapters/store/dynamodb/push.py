"""DynamoDB implementation of `PushStore`, and the push queue over its outbox of jobs.

Why it exists: a push must survive the node that committed the message, so the job is written
by the message's commit (the outbox), and on one store node it is also the queue, with no
relay. Items of the `push` table (docs/architecture.md, "DynamoDB store", push):

- target `P#<device>` / `#`: target (JSON), removed_reason, updated_at; the device's inbox head
  says `push` while it has one, so the message path learns it from its reservation's answer;
- job `P#<device>` / `J#<chat>`: a flag per device and chat (`pending` 0/1), last_iseq,
  invite_iseq, due_at, attempts, leased_until, pushed_at; while pending it carries the `due`
  index keys (`due_pk = Q#<shard(device, 16)>`, `due_sk = num_key(due_at)#<device>#<chat>`);
- policy `POLICY` / `#` (grace_ms, window_ms); dead letters `X` / `num_key(id)`, ids from the
  `ADD` counter `X#id` / `#`.

`mark_pending` is the outbox write that the append protocol (`inbox.py`) calls for a message
entry (or an invitation) to a device whose head said `push`: one conditional write that does
nothing more for a job already pending, which is the coalescing of a burst.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

from pigeon.adapters.store.dynamodb.codec import (
    EXPIRES,
    PK,
    SK,
    Expr,
    Item,
    encode,
    expires_at,
    int_of,
    is_live,
    key,
    num_key,
    opt_int,
    opt_str,
    str_of,
)
from pigeon.adapters.store.dynamodb.db import ConditionFailed, DynamoDb, TransactionCancelled
from pigeon.adapters.store.dynamodb.keyspace import (
    device_key,
    head_key,
    message_key,
    target_key,
    user_key,
)
from pigeon.adapters.store.dynamodb.tables import (
    ACCOUNTS,
    CHATS,
    DUE_SHARDS,
    INBOX,
    MESSAGES,
    PUSH,
    shard,
)
from pigeon.domain.push import MAX_COUNT, PushTarget
from pigeon.ports import (
    Clock,
    DeadLetter,
    PushContext,
    PushJob,
    PushQueue,
    PushQueueDepth,
    PushQueueStats,
    PushStore,
)
from pigeon.services.clock import SystemClock

DUE = PUSH.index("due")
BY_USER = CHATS.index("by_user")
#: Dead letters kept at most (the oldest are dropped): clients can make pushes fail.
MAX_DEAD_LETTERS = 10_000
_POLICY = key("POLICY")
_DEAD = "X"
_DEAD_IDS = key("X#id")
_ATTEMPTS = 16
#: Pending jobs read by one Scan of `due` at most; more, and each shard is queried.
_SCAN_LIMIT = 100

_decode_target = msgspec.json.Decoder(PushTarget).decode


def _job_key(device_id: str, chat_id: str) -> Item:
    return key(f"P#{device_id}", f"J#{chat_id}")


def _due_keys(expr: Expr, device_id: str, chat_id: str, due_at: int) -> str:
    """`SET` clauses of the `due` index keys of a pending job."""
    pk = expr.value(f"Q#{shard(device_id, DUE_SHARDS)}")
    sk = expr.value(f"{num_key(due_at)}#{device_id}#{chat_id}")
    return f"{expr.name(DUE.pk)} = {pk}, {expr.name(DUE.sk)} = {sk}"


def _due_of(item: Item) -> tuple[int, str, str]:
    """(due_at, device, chat) of an item of the `due` index."""
    return int(str_of(item, DUE.sk)[:20]), str_of(item, PK)[2:], str_of(item, SK)[2:]


def _int(item: Item, name: str) -> int:
    return opt_int(item, name) or 0


async def policy(db: DynamoDb) -> tuple[int, int]:
    """The queue's (grace, window) in ms (`configure`); no grace and no window before that."""
    item = await db.get(PUSH, _POLICY)
    return (0, 0) if item is None else (int_of(item, "grace_ms"), int_of(item, "window_ms"))


async def mark_pending(
    db: DynamoDb,
    device_id: str,
    chat_id: str,
    at: int,
    *,
    invite_iseq: int = 0,
    rules: tuple[int, int] | None = None,
) -> None:
    """The outbox: an entry of `chat_id` (a message, or with `invite_iseq` an invitation) was
    appended at `at` to a device with a target. An idle job becomes pending, due after the
    grace (and the window since its last push); a pending one stays as it is (one write per
    burst), but a job leased right now notes `more` so that its answer keeps it pending.
    `rules` is `policy(db)` if the caller read it already (one read per message)."""
    grace, window = rules or await policy(db)
    job = _job_key(device_id, chat_id)
    due = at + grace
    for _ in range(_ATTEMPTS):
        expr = Expr()
        pending, pushed = expr.name("pending"), expr.name("pushed_at")
        sets = [
            f"{pending} = {expr.value(1)}",
            f"{expr.name('due_at')} = {expr.value(due)}",
            _due_keys(expr, device_id, chat_id, due),
        ]
        if invite_iseq:
            sets.append(f"{expr.name('invite_iseq')} = {expr.value(invite_iseq)}")
        try:
            await db.update(
                PUSH,
                job,
                f"SET {', '.join(sets)} REMOVE {expr.name(EXPIRES)}",
                expr,
                condition=f"attribute_not_exists({pending}) OR ({pending} = {expr.value(0)} AND"
                f" (attribute_not_exists({pushed}) OR {pushed} <= {expr.value(due - window)}))",
                idempotent=True,
            )
            return
        except ConditionFailed as exc:
            stored = exc.item
        if stored is None:
            continue
        if _int(stored, "pending"):
            await _note_more(db, job, stored, invite_iseq)
            return
        due = max(due, _int(stored, "pushed_at") + window)  # within the window: later


async def _note_more(db: DynamoDb, job: Item, stored: Item, invite_iseq: int) -> None:
    """A pending job got another entry: nothing to write unless it is leased (its answer must
    know) or the entry is an invitation."""
    if not invite_iseq and not _int(stored, "leased_until"):
        return
    expr = Expr()
    sets = [f"{expr.name('more')} = {expr.value(1)}"]
    if invite_iseq:
        sets.append(f"{expr.name('invite_iseq')} = {expr.value(invite_iseq)}")
    with contextlib.suppress(ConditionFailed):  # answered and forgotten meanwhile
        await db.update(
            PUSH,
            job,
            f"SET {', '.join(sets)}",
            expr,
            condition=f"attribute_exists({expr.name(PK)})",
            idempotent=True,
        )


async def _drain_jobs(db: DynamoDb, device_id: str) -> None:
    """Delete the device's jobs (its target was removed)."""
    expr = Expr()
    jobs = await db.query_items(
        PUSH,
        f"{expr.name(PK)} = {expr.value(f'P#{device_id}')}"
        f" AND begins_with({expr.name(SK)}, {expr.value('J#')})",
        expr,
        consistent=True,
    )
    if jobs:
        await db.batch_write(PUSH, deletes=[key(str_of(j, PK), str_of(j, SK)) for j in jobs])


class DynamoPush:
    """Push targets and the privacy setting on DynamoDB; `context` reads the device's inbox,
    its user's chats and the messages waiting (items of the other sub-stores, read as the
    design lays them out)."""

    def __init__(self, db: DynamoDb, clock: Clock | None = None) -> None:
        self._db = db
        self._clock = clock or SystemClock()

    async def set_target(self, device_id: str, target: PushTarget | None, at: int) -> None:
        db = self._db
        item = target_key(device_id) | encode(
            {
                "target": None if target is None else msgspec.json.encode(target).decode(),
                "updated_at": at,
            }
        )
        if not await self._write_target(device_id, db.tx_put(PUSH, item), target is not None):
            return
        if target is None:  # nothing left to push to: its queued jobs go too
            await _drain_jobs(db, device_id)

    async def _write_target(self, device_id: str, write: dict[str, Any], push: bool) -> bool:
        """`write` (of the target) with the head's `push` flag, if the device exists."""
        db = self._db
        expr = Expr()
        head = db.tx_update(
            INBOX,
            head_key(device_id),
            f"SET {expr.name('push')} = {expr.value(push)}",
            expr,
            f"attribute_exists({expr.name(PK)})",
        )
        try:
            await db.transact_write([write, head])
        except TransactionCancelled as exc:
            if 1 in exc.failed:  # no such device (revoked)
                return False
            raise
        return True

    async def target_status(self, device_id: str) -> tuple[PushTarget | None, str | None]:
        item = await self._db.get(PUSH, target_key(device_id))
        if item is None:
            return None, None
        raw = opt_str(item, "target")
        return (None if raw is None else _decode_target(raw)), opt_str(item, "removed_reason")

    async def remove_gone(self, device_id: str, target: PushTarget, reason: str, at: int) -> bool:
        db = self._db
        expr = Expr()
        name = expr.name("target")
        write = db.tx_update(
            PUSH,
            target_key(device_id),
            f"SET {expr.name('removed_reason')} = {expr.value(reason)},"
            f" {expr.name('updated_at')} = {expr.value(at)} REMOVE {name}",
            expr,
            f"{name} = {expr.value(msgspec.json.encode(target).decode())}",
        )
        try:
            if not await self._write_target(device_id, write, False):
                return False
        except TransactionCancelled:  # another target registered meanwhile
            return False
        await _drain_jobs(db, device_id)
        return True

    async def set_show_names(self, user_id: str, show: bool) -> None:
        expr = Expr()
        with contextlib.suppress(ConditionFailed):
            await self._db.update(
                ACCOUNTS,
                user_key(user_id),
                f"SET {expr.name('push_names')} = {expr.value(show)}",
                expr,
                condition=f"attribute_exists({expr.name(PK)})",
                idempotent=True,
            )

    async def context(self, device_id: str, chat_id: str, upto: int) -> PushContext | None:
        db = self._db
        pointer = await db.get(ACCOUNTS, device_key(device_id))
        head = await db.get(INBOX, head_key(device_id))
        if pointer is None or head is None:
            return None
        user_id = str_of(pointer, "user")
        user = await db.get(ACCOUNTS, user_key(user_id))
        if user is None:
            return None
        target_item = await db.get(PUSH, target_key(device_id))
        raw = None if target_item is None else opt_str(target_item, "target")
        acked = _int(head, "acked_iseq")
        newest = await self._newest(device_id, chat_id, user_id, acked, upto)
        in_chat, unread = await self._unread(user_id, chat_id)
        sender_name = None
        if newest is not None and bool(user.get("push_names", {}).get("BOOL")):
            sender = await db.get(ACCOUNTS, user_key(str_of(newest, "sender")))
            sender_name = None if sender is None else str_of(sender, "username")
        return PushContext(
            target=None if raw is None else _decode_target(raw),
            user_id=user_id,
            waiting=newest is not None,
            count=min(max(0, in_chat), MAX_COUNT),
            acked_iseq=acked,
            unread=max(0, unread),
            sender_name=sender_name,
            preview=None if newest is None else opt_str(newest, "push_preview"),
            disabled=opt_int(user, "disabled_at") is not None,
        )

    async def _newest(
        self, device_id: str, chat_id: str, user_id: str, acked: int, upto: int
    ) -> Item | None:
        """The newest message of others in the chat waiting in the device's inbox (unacked, up
        to `upto`): its message item, or None."""
        if upto <= acked:
            return None
        db = self._db
        now = self._clock.now_ms()
        expr = Expr()
        async for page in db.query(
            INBOX,
            f"{expr.name(PK)} = {expr.value(f'D#{device_id}')} AND {expr.name(SK)}"
            f" BETWEEN {expr.value(num_key(acked + 1))} AND {expr.value(num_key(upto))}",
            expr,
            where=f"{expr.name('chat')} = {expr.value(chat_id)}"
            f" AND attribute_exists({expr.name('seq')})",
            forward=False,
            consistent=True,
        ):
            for entry in page:
                message = await db.get(MESSAGES, message_key(chat_id, int_of(entry, "seq")))
                if message is None or not is_live(message, now):
                    continue
                if str_of(message, "sender") != user_id:
                    return message
        return None

    async def _unread(self, user_id: str, chat_id: str) -> tuple[int, int]:
        """The user's unread messages in the chat, and over all their chats."""
        db = self._db
        expr = Expr()
        memberships = await db.query_items(
            CHATS, f"{expr.name(BY_USER.pk)} = {expr.value(user_id)}", expr, index=BY_USER
        )
        chats = [str_of(m, PK) for m in memberships]
        members = await db.batch_get(CHATS, [key(c, f"M#{user_id}") for c in chats])
        heads = await db.batch_get(CHATS, [key(c) for c in chats])
        last = {str_of(h, PK): _int(h, "last_seq") for h in heads if "st" not in h}
        in_chat = unread = 0
        for member in members:
            chat = str_of(member, PK)
            if chat not in last:
                continue
            n = last[chat] - _int(member, "read_seq")
            unread += n
            if chat == f"C#{chat_id}":
                in_chat = n
        return in_chat, unread


class DynamoPushQueue:
    """The embedded push queue on DynamoDB: the jobs of the `push` table, claimed through the
    sparse `due` index and leased each by a conditional update (one worker per job)."""

    def __init__(self, db: DynamoDb) -> None:
        self._db = db

    async def configure(self, grace: float, window: float) -> None:
        item = _POLICY | encode({"grace_ms": int(grace * 1000), "window_ms": int(window * 1000)})
        await self._db.put(PUSH, item)

    async def _due(self, upto: int | None, limit: int | None) -> list[tuple[int, str, str]]:
        """(due_at, device, chat) of pending jobs due by `upto` (all if None), earliest
        first, at most `limit` per shard (all of them when they fit one Scan)."""
        few = await self._scan_due()
        if few is not None:
            due = sorted(j for j in few if upto is None or j[0] <= upto)
            return due if limit is None else due[: limit * DUE_SHARDS]
        out: list[tuple[int, str, str]] = []
        for n in range(DUE_SHARDS):
            expr = Expr()
            condition = f"{expr.name(DUE.pk)} = {expr.value(f'Q#{n}')}"
            if upto is not None:
                condition += f" AND {expr.name(DUE.sk)} < {expr.value(num_key(upto + 1))}"
            items = await self._db.query_items(
                PUSH, condition, expr, index=DUE, limit=limit, page_size=limit
            )
            out += map(_due_of, items)
        return sorted(out)

    async def _scan_due(self) -> list[tuple[int, str, str]] | None:
        """Every pending job, if there are at most `_SCAN_LIMIT`: one Scan of the sparse `due`
        index (which holds the pending jobs only), else None (the shards are queried). A
        worker polls the queue a few times a second: idle, this is one call for an empty
        page, where a Query of each shard made 16."""
        page = await self._db.call(
            "scan",
            idempotent=True,
            TableName=self._db.name(PUSH),
            IndexName=DUE.name,
            Limit=_SCAN_LIMIT,
        )
        if page.get("LastEvaluatedKey"):
            return None
        return [_due_of(i) for i in page.get("Items", [])]

    async def claim(self, now: int, limit: int, visibility: float) -> list[PushJob]:
        if limit <= 0:
            return []
        lease = now + int(visibility * 1000)
        grace, _ = await policy(self._db)
        covered: dict[str, int] = {}
        jobs: list[PushJob] = []
        for _, device, chat in await self._due(now, limit):
            if len(jobs) == limit:
                break
            if device not in covered:
                covered[device] = await self._newest_with_grace(device, now - grace)
            job = await self._lease(device, chat, now, lease, covered[device])
            if job is not None:
                jobs.append(job)
        return jobs

    async def _newest_with_grace(self, device_id: str, by: int) -> int:
        """The device's newest visible inbox entry appended by `by` (0 if none): what a push
        claimed now covers (a younger one may yet be acked by a connected device)."""
        db = self._db
        head = await db.get(INBOX, head_key(device_id))
        if head is None:
            return 0
        reserved = [int(v["N"]) for v in head.get("res", {}).get("M", {}).values()]
        barrier = min(reserved, default=_int(head, "next_iseq"))
        if barrier <= 1:
            return 0
        expr = Expr()
        found = await db.query_items(
            INBOX,
            f"{expr.name(PK)} = {expr.value(f'D#{device_id}')} AND {expr.name(SK)}"
            f" BETWEEN {expr.value(num_key(1))} AND {expr.value(num_key(barrier - 1))}",
            expr,
            where=f"{expr.name('at')} <= {expr.value(by)}",
            forward=False,
            consistent=True,
            limit=1,
        )
        return int(str_of(found[0], SK)) if found else 0

    async def _lease(
        self, device: str, chat: str, now: int, lease: int, last_iseq: int
    ) -> PushJob | None:
        """Take one due job's lease, if no other worker took it first."""
        db = self._db
        item = await db.get(PUSH, _job_key(device, chat))
        if item is None or not _int(item, "pending") or _int(item, "due_at") > now:
            return None
        attempts = _int(item, "attempts")
        expr = Expr()
        try:
            await db.update(
                PUSH,
                _job_key(device, chat),
                f"SET {expr.name('leased_until')} = {expr.value(lease)},"
                f" {expr.name('due_at')} = {expr.value(lease)},"
                f" {expr.name('attempts')} = {expr.value(attempts + 1)},"
                f" {expr.name('last_iseq')} = {expr.value(last_iseq)},"
                f" {_due_keys(expr, device, chat, lease)}",
                expr,
                condition=f"{expr.name('pending')} = {expr.value(1)}"
                f" AND {expr.name('due_at')} = {expr.value(_int(item, 'due_at'))}"
                f" AND {_int_is(expr, 'attempts', attempts)}",
                idempotent=True,
            )
        except ConditionFailed as exc:
            mine = exc.retried and exc.item is not None and _int(exc.item, "leased_until") == lease
            if not mine:
                return None
        return PushJob(
            device=device,
            chat=chat,
            last_iseq=last_iseq,
            invite_iseq=_int(item, "invite_iseq"),
            attempts=attempts + 1,
            lease=lease,
        )

    async def next_due(self) -> int | None:
        due = await self._due(None, 1)
        return due[0][0] if due else None

    async def done(self, job: PushJob, now: int, pushed: bool) -> None:
        await self._answer(job, now, pushed)

    async def _answer(self, job: PushJob, now: int, pushed: bool) -> bool:
        """End the job's lease: idle again, or still pending if entries of the chat came after
        what it covered (due after a grace from `now`, and the window if it was pushed). False
        if the lease was no longer this job's."""
        db = self._db
        grace, window = await policy(db)
        for _ in range(_ATTEMPTS):
            item = await db.get(PUSH, _job_key(job.device, job.chat))
            if item is None or _int(item, "leased_until") != job.lease:
                return False
            last, invite = _int(item, "last_iseq"), _int(item, "invite_iseq")
            more = "more" in item
            still = invite > last or more or await self._after(job.device, job.chat, last)
            pushed_at = now if pushed else _int(item, "pushed_at")
            due = max(now + grace, pushed_at + window)
            expr = Expr()
            sets = [
                f"{expr.name('pending')} = {expr.value(int(still))}",
                f"{expr.name('invite_iseq')} = {expr.value(invite if invite > last else 0)}",
                f"{expr.name('attempts')} = {expr.value(0)}",
                f"{expr.name('leased_until')} = {expr.value(0)}",
                f"{expr.name('due_at')} = {expr.value(due)}",
                f"{expr.name('pushed_at')} = {expr.value(pushed_at)}",
            ]
            removes = [expr.name("more")]
            if still:
                sets.append(_due_keys(expr, job.device, job.chat, due))
            else:  # idle: forgotten by TTL once its window has passed
                sets.append(
                    f"{expr.name(EXPIRES)} = {expr.value(expires_at(pushed_at, window) + 1)}"
                )
                removes += [expr.name(DUE.pk), expr.name(DUE.sk)]
            more_as_read = f"attribute_{'' if more else 'not_'}exists({expr.name('more')})"
            try:
                await db.update(
                    PUSH,
                    _job_key(job.device, job.chat),
                    f"SET {', '.join(sets)} REMOVE {', '.join(removes)}",
                    expr,
                    condition=f"{expr.name('leased_until')} = {expr.value(job.lease)}"
                    f" AND {_int_is(expr, 'invite_iseq', invite)} AND {more_as_read}",
                    idempotent=True,
                )
                return True
            except ConditionFailed:
                continue  # an entry or an invitation came meanwhile: look again
        return False

    async def _after(self, device_id: str, chat_id: str, last_iseq: int) -> bool:
        """Has the device a message entry of the chat after `last_iseq`?"""
        expr = Expr()
        found = await self._db.query_items(
            INBOX,
            f"{expr.name(PK)} = {expr.value(f'D#{device_id}')}"
            f" AND {expr.name(SK)} > {expr.value(num_key(last_iseq))}",
            expr,
            where=f"{expr.name('chat')} = {expr.value(chat_id)}"
            f" AND attribute_exists({expr.name('seq')})",
            consistent=True,
            limit=1,
        )
        return bool(found)

    async def retry(self, job: PushJob, due_at: int, error: str) -> None:
        expr = Expr()
        with contextlib.suppress(ConditionFailed):  # the lease is no longer this job's
            await self._db.update(
                PUSH,
                _job_key(job.device, job.chat),
                f"SET {expr.name('leased_until')} = {expr.value(0)},"
                f" {expr.name('due_at')} = {expr.value(due_at)},"
                f" {_due_keys(expr, job.device, job.chat, due_at)}",
                expr,
                condition=f"{expr.name('leased_until')} = {expr.value(job.lease)}",
                idempotent=True,
            )

    async def dead(self, job: PushJob, error: str, now: int) -> None:
        if not await self._answer(job, now, pushed=False):
            return
        db = self._db
        number = await db.add(PUSH, _DEAD_IDS, "n", must_exist=False)
        letter = key(_DEAD, num_key(number)) | encode(
            {
                "device": job.device,
                "chat": job.chat,
                "invite_iseq": job.invite_iseq,
                "attempts": job.attempts,
                "error": error[:500],
                "failed_at": now,
            }
        )
        await db.put(PUSH, letter)
        if number > MAX_DEAD_LETTERS:  # bounded: the oldest letters go first
            await db.delete(PUSH, key(_DEAD, num_key(number - MAX_DEAD_LETTERS)))

    async def extend(self, job: PushJob, until: int) -> PushJob | None:
        expr = Expr()
        try:
            await self._db.update(
                PUSH,
                _job_key(job.device, job.chat),
                f"SET {expr.name('leased_until')} = {expr.value(until)},"
                f" {expr.name('due_at')} = {expr.value(until)},"
                f" {expr.name('attempts')} = {expr.value(job.attempts)},"
                f" {_due_keys(expr, job.device, job.chat, until)}",
                expr,
                condition=f"{expr.name('leased_until')} = {expr.value(job.lease)}",
                idempotent=True,
            )
        except ConditionFailed as exc:
            mine = exc.retried and exc.item is not None and _int(exc.item, "leased_until") == until
            if not mine:
                return None
        return msgspec.structs.replace(job, lease=until)

    async def depth(self, now: int) -> PushQueueDepth:
        pending = await self._due(None, None)
        due = [at for at, _, _ in pending if at <= now]
        return PushQueueDepth(
            pending=len(pending), due=len(due), oldest_due_at=min(due, default=None)
        )

    async def _letters(self, limit: int | None = None) -> list[Item]:
        """Dead letters, oldest first, of devices that still exist."""
        db = self._db
        expr = Expr()
        out: list[Item] = []
        async for page in db.query(
            PUSH, f"{expr.name(PK)} = {expr.value(_DEAD)}", expr, consistent=True
        ):
            heads = await db.batch_get(INBOX, [head_key(str_of(i, "device")) for i in page])
            alive = {str_of(h, PK)[2:] for h in heads}
            out += [i for i in page if str_of(i, "device") in alive]
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        return [
            DeadLetter(
                id=int(str_of(i, SK)),
                device=str_of(i, "device"),
                chat=str_of(i, "chat"),
                attempts=int_of(i, "attempts"),
                error=str_of(i, "error"),
                failed_at=int_of(i, "failed_at"),
            )
            for i in await self._letters(limit)
        ]

    async def _take(self, ids: list[int] | None) -> list[Item]:
        """Delete the named dead letters (all if None) and return those that were there."""
        if ids == []:
            return []
        keys = (
            [key(str_of(i, PK), str_of(i, SK)) for i in await self._letters()]
            if ids is None
            else [key(_DEAD, num_key(i)) for i in ids]
        )
        taken = []
        for k in keys:
            old = await self._db.delete(PUSH, k, returns_old=True)
            if old is not None:
                taken.append(old)
        return taken

    async def retry_dead(self, ids: list[int] | None, now: int) -> int:
        moved = 0
        for letter in await self._take(ids):
            device = str_of(letter, "device")
            if await self._db.get(INBOX, head_key(device)) is None:
                continue  # revoked since
            await self._revive(device, str_of(letter, "chat"), _int(letter, "invite_iseq"), now)
            moved += 1
        return moved

    async def _revive(self, device: str, chat: str, invite_iseq: int, now: int) -> None:
        """A dead letter's job pending again, due at `now`; a job leased right now stays its
        worker's (whose push covers these)."""
        db = self._db
        for _ in range(_ATTEMPTS):
            item = await db.get(PUSH, _job_key(device, chat)) or {}
            leased = _int(item, "leased_until")
            expr = Expr()
            sets = [
                f"{expr.name('pending')} = {expr.value(1)}",
                f"{expr.name('invite_iseq')} ="
                f" {expr.value(max(invite_iseq, _int(item, 'invite_iseq')))}",
                f"{expr.name('pushed_at')} = {expr.value(0)}",
            ]
            if leased <= now:
                sets += [
                    f"{expr.name('last_iseq')} = {expr.value(0)}",
                    f"{expr.name('due_at')} = {expr.value(now)}",
                    _due_keys(expr, device, chat, now),
                ]
            lease_as_read = (
                f"{expr.name('leased_until')} = {expr.value(leased)}"
                if "leased_until" in item
                else f"attribute_not_exists({expr.name('leased_until')})"
            )
            try:
                await db.update(
                    PUSH,
                    _job_key(device, chat),
                    f"SET {', '.join(sets)} REMOVE {expr.name(EXPIRES)}",
                    expr,
                    condition=lease_as_read,
                    idempotent=True,
                )
                return
            except ConditionFailed:
                continue

    async def drop_dead(self, ids: list[int] | None) -> int:
        return len(await self._take(ids))


def _int_is(expr: Expr, attribute: str, value: int) -> str:
    """A condition that a number attribute is `value`, absent counting as 0."""
    name = expr.name(attribute)
    if value == 0:
        return f"(attribute_not_exists({name}) OR {name} = {expr.value(0)})"
    return f"{name} = {expr.value(value)}"


_check_store: type[PushStore] = DynamoPush
_check_queue: type[PushQueue] = DynamoPushQueue
_check_stats: type[PushQueueStats] = DynamoPushQueue
