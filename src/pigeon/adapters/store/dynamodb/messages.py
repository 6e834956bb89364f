"""DynamoDB implementation of `MessageStore`: the message path.

Why it exists: the seeds' store for the hot path (send, ack, read, receipts), with the same
guarantees as the SQL stores although DynamoDB has no transaction large enough for a group
message: seq is taken under the chat lock with the message, inbox entries follow the append
protocol of `inbox.py` (reservations, idempotent chunks, commit record), and readers and acks
never pass a head's lowest open reservation (docs/architecture.md, "DynamoDB store").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec

from pigeon.adapters.store.dynamodb import inbox
from pigeon.adapters.store.dynamodb.codec import (
    PK,
    SK,
    Expr,
    Item,
    Value,
    encode,
    int_of,
    is_live,
    key,
    key_num,
    live_filter,
    num_key,
    opt_bytes,
    opt_int,
    opt_str,
    str_of,
    strs_of,
)
from pigeon.adapters.store.dynamodb.db import ConditionFailed, DynamoDb, TransactionCancelled
from pigeon.adapters.store.dynamodb.inbox import NewEvent, Policy
from pigeon.adapters.store.dynamodb.keyspace import (
    chat_key,
    head_key,
    member_key,
    message_key,
    user_key,
)
from pigeon.adapters.store.dynamodb.tables import ACCOUNTS, CHATS, INBOX, MESSAGES, TIME_SHARDS
from pigeon.domain.errors import Forbidden, NotFound, Unavailable
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
from pigeon.ports import MessageStore, SendRequest, SendResult, SweepStats

_decode_message = msgspec.json.Decoder(Message).decode
#: The recovery turn: which node recovers now, until when, and from where (`recover_turn`).
_RECOVERY = key("W#recovery")
#: How far back recovery reads at most (and the first time).
_LOOKBACK_MS = 3_600_000
_ACK_CHUNK = 50
_MARK_ATTEMPTS = 8
#: The highest iseq a key can hold (`num_key`'s 20 digits).
_LAST_ISEQ = 10**20 - 1


class _ChatQueue:
    """This node's sends to one chat, taking the chat's lock one after the other: `lock` is
    held from before the chat is read until the send has released the chat's lock (or
    failed); `users` counts the sends holding or awaiting it (the queue goes at 0); `chat` is
    the chat item as the last send left it, if it knows (its successor's first read)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        self.chat: Item | None = None


class _Contended(Exception):
    """The chat moved between our read and our write: read again."""


def claim_key(device_id: str, cmid: str) -> Item:
    return key(f"K#{device_id}#{cmid}")


def pointer_key(message_id: str) -> Item:
    return key(f"M#{message_id}")


def _message_of(record: Item) -> Message:
    raw = opt_bytes(record, "raw")
    if raw is not None:
        return _decode_message(raw)
    return Message(
        id=str_of(record, "id"),
        chat=str_of(record, PK)[2:],
        seq=key_num(str_of(record, SK)),
        sender=str_of(record, "sender"),
        sender_device=str_of(record, "sender_device"),
        cmid=str_of(record, "cmid"),
        at=int_of(record, "at"),
    )


class DynamoMessages:
    """Messages, inboxes and receipts on DynamoDB."""

    def __init__(
        self,
        db: DynamoDb,
        policy: Policy | None = None,
        *,
        lock_wait_ms: int = 10_000,
    ) -> None:
        self._db = db
        self._policy = policy or Policy()
        self._lock_wait_ms = lock_wait_ms
        self._rng = random.Random()
        self._queues: dict[str, _ChatQueue] = {}

    # -- send -------------------------------------------------------------------------------------

    async def send(self, req: SendRequest) -> SendResult:
        queue = self._queues.get(req.chat) or self._queues.setdefault(req.chat, _ChatQueue())
        queue.users += 1
        try:
            # No timeout here: a send that gave up its place would be retried by its client
            # behind the same device's later sends, which would then commit before it. The
            # wait is bounded anyway, by the sends ahead, each bounded by `lock_wait_ms` and
            # its calls' retries (docs/architecture.md, "A node's sends to one chat queue").
            await queue.lock.acquire()
            released = False

            def release(chat: Item | None = None) -> None:  # once per send, however often called
                nonlocal released
                if not released:
                    released = True
                    queue.chat = chat
                    queue.lock.release()

            known, queue.chat = queue.chat, None
            try:
                return await self._send_queued(req, known, release)
            finally:
                release()
        finally:
            queue.users -= 1
            if not queue.users:
                del self._queues[req.chat]

    async def _send_queued(
        self, req: SendRequest, known: Item | None, unlocked: Callable[[Item | None], None]
    ) -> SendResult:
        """`send`, first of this node's sends to the chat: the others wait in its local
        queue, not by polling the chat's lock (which, with many senders in one hot chat,
        costs reads and cancelled transactions and starves the holder's own calls). `known`
        is the chat item as the previous send of the queue left it (None: read it); if it is
        stale, the first transaction's conditions say so and the chat is read again."""
        clock = self._policy.clock
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait_ms / 1000
        attempt = 0
        while True:
            chat = known or await self._db.get(CHATS, chat_key(req.chat))
            known = None
            holder = None if chat is None else opt_str(chat, "lock")
            if chat is None or "st" in chat or req.sender not in strs_of(chat, "roster"):
                done = await self._claimed(req)
                if done is not None:
                    return done
                if chat is None or "st" in chat:
                    raise NotFound("no such chat")
                raise Forbidden("not a participant of this chat")
            try:
                if holder is None:
                    return await self._send(req, chat, unlocked)
                if (opt_int(chat, "lock_until") or 0) <= clock.now_ms():
                    await self._break_lock(req.chat, holder, int_of(chat, "last_seq"))
                    continue
                # Locked: maybe by this very cmid, sent before by a writer that crashed.
                done = await self._claimed(req)
                if done is not None:
                    return done
            except _Contended:
                pass
            if loop.time() > deadline:
                raise Unavailable("the chat is busy")
            await asyncio.sleep(self._rng.uniform(0, min(0.2, 0.005 * 2 ** min(attempt, 6))))
            attempt += 1

    async def _claimed(self, req: SendRequest) -> SendResult | None:
        """The result of this cmid's earlier send, if there was one."""
        claimed = await self._db.get(MESSAGES, claim_key(req.sender_device, req.cmid))
        if claimed is None or not is_live(claimed, self._policy.clock.now_ms()):
            return None
        return await self._resume(claimed)

    async def _targets(self, roster: frozenset[str], sender_device: str) -> list[str]:
        users = await self._db.batch_get(ACCOUNTS, [user_key(u) for u in roster])
        pairs = sorted((str_of(u, PK)[2:], d) for u in users for d in strs_of(u, "device_ids"))
        return [d for _, d in pairs if d != sender_device]

    async def _send(
        self, req: SendRequest, chat: Item, unlocked: Callable[[Item | None], None]
    ) -> SendResult:
        db, policy = self._db, self._policy
        targets = await self._targets(strs_of(chat, "roster"), req.sender_device)
        last = opt_int(chat, "last_seq") or 0
        seq = last + 1
        message = req.message(seq)
        now, expires = policy.clock.now_ms(), policy.expires()
        values: dict[str, Value | None] = {
            "id": req.message_id,
            "sender": req.sender,
            "sender_device": req.sender_device,
            "cmid": req.cmid,
            "at": req.at,
            "expires": expires,
            "pending": 0,
        }
        if targets:
            values |= {
                "raw": encode_event(message),
                "push_preview": req.push_preview,
                "targets": list[Value](targets),
                "st": inbox.PENDING,
                "lease": now + policy.lease_ms,
                "lock_chat": req.chat,
            }
        record = (
            message_key(req.chat, seq)
            | encode(values)
            | encode(inbox.time_index(req.message_id, req.at))
        )
        pointer: dict[str, Value] = {
            "chat": req.chat,
            "seq": seq,
            "id": req.message_id,
            "expires": expires,
        }
        await inbox.note_hour(db, req.at)
        new = f"attribute_not_exists({PK})"
        try:
            await db.transact_write(
                [
                    self._take_seq(req, chat, seq, now, targets),
                    db.tx_put(MESSAGES, record, new),
                    db.tx_put(
                        MESSAGES, claim_key(req.sender_device, req.cmid) | encode(pointer), new
                    ),
                    db.tx_put(MESSAGES, pointer_key(req.message_id) | encode(pointer), new),
                ]
            )
        except TransactionCancelled as exc:
            claim = exc.reasons[2].item if len(exc.reasons) > 2 else None
            if 2 in exc.failed and claim is not None:
                return await self._resume(claim)  # this cmid was sent (maybe by this call)
            # 1 alone (a record at a seq the chat has not handed out) cannot happen on
            # DynamoDB; it did on a threaded moto that undid writes (architecture.md, "Where
            # moto differs"): read the chat again rather than fail the send.
            if 0 in exc.failed or 1 in exc.failed:
                raise _Contended from None
            raise
        # the chat as this send leaves it once unlocked: the next of the queue need not read it
        after = {k: v for k, v in chat.items() if k not in ("lock", "lock_until")}
        after["last_seq"] = {"N": str(seq)}
        if not targets:
            unlocked(after)  # written committed, without the chat lock
            deliveries = []
        else:
            deliveries = await inbox.roll_forward(
                db, record, policy, unlocked=lambda: unlocked(after)
            )
        deliveries += await self._sender_read(req.chat, req.sender, seq, req.at)
        return SendResult(message, False, deliveries)

    def _take_seq(
        self, req: SendRequest, chat: Item, seq: int, now: int, targets: list[str]
    ) -> dict[str, Any]:
        """Step 1's chat update: seq, activity, preview and (with targets) the chat lock, on
        condition the chat is as read and unlocked."""
        expr = Expr()
        last, version, lock = expr.name("last_seq"), expr.name("version"), expr.name("lock")
        sets = [
            f"{last} = {expr.value(seq)}",
            f"{expr.name('last_activity_at')} = {expr.value(req.at)}",
            f"{expr.name('last_sender')} = {expr.value(req.sender)}",
        ]
        removes = []
        preview = expr.name("last_preview")
        if targets and req.preview is not None:
            sets.append(f"{preview} = {expr.value(req.preview)}")
        else:
            removes.append(preview)
        if targets:
            sets += [
                f"{lock} = {expr.value(req.message_id)}",
                f"{expr.name('lock_until')} = {expr.value(now + self._policy.lease_ms)}",
            ]
        update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        prev = opt_int(chat, "last_seq")
        conditions = [
            f"attribute_not_exists({lock})",
            f"attribute_not_exists({last})" if prev is None else f"{last} = {expr.value(prev)}",
        ]
        v = opt_int(chat, "version")
        if v is not None:
            conditions.append(f"{version} = {expr.value(v)}")
        return self._db.tx_update(CHATS, chat_key(req.chat), update, expr, " AND ".join(conditions))

    async def _resume(self, claim: Item) -> SendResult:
        """A cmid already claimed: its message if committed (a duplicate), else finish it and
        return it as this send (its sender never got an `ok`)."""
        chat_id, seq = str_of(claim, "chat"), int_of(claim, "seq")
        record = await self._db.get(MESSAGES, message_key(chat_id, seq))
        if record is None:
            raise NotFound("the message of this cmid is gone")
        message = _message_of(record)
        if not inbox.is_pending(record):
            return SendResult(message, True, [])
        deliveries = await inbox.roll_forward(self._db, record, self._policy)
        deliveries += await self._sender_read(chat_id, message.sender, seq, message.at)
        return SendResult(message, False, deliveries)

    async def _break_lock(self, chat_id: str, holder: str, last_seq: int) -> None:
        """The lock's lease passed: finish its message (which frees the lock), or free it."""
        record = await self._db.get(MESSAGES, message_key(chat_id, last_seq))
        if record is not None and inbox.is_pending(record):
            await inbox.roll_forward(self._db, record, self._policy)
        await inbox.release_chat_lock(self._db, chat_id, holder)

    async def _sender_read(self, chat_id: str, sender: str, seq: int, at: int) -> list[Delivery]:
        """The sender has read everything up to their own message: the read receipts they owe
        (a quick reply), or just their marks."""
        member = await self._db.get(CHATS, member_key(chat_id, sender))
        if member is None:
            return []
        if (opt_int(member, "read_seq") or 0) < seq - 1:
            return await self._advance(chat_id, sender, "read", seq, at, "")
        expr = Expr()
        d, r = expr.name("delivered_seq"), expr.name("read_seq")
        s = expr.value(seq)
        with contextlib.suppress(ConditionFailed):
            await self._db.update(
                CHATS,
                member_key(chat_id, sender),
                f"SET {d} = {s}, {r} = {s}",
                expr,
                condition=f"{r} < {s} AND {d} <= {s}",
                idempotent=True,
            )
        return []

    # -- marks and receipts -----------------------------------------------------------------------

    async def _members(self, chat_id: str) -> list[Item]:
        expr = Expr()
        cond = (
            f"{expr.name(PK)} = {expr.value(f'C#{chat_id}')}"
            f" AND begins_with({expr.name(SK)}, {expr.value('M#')})"
        )
        return await self._db.query_items(CHATS, cond, expr, consistent=True)

    async def _devices_of(self, users: list[str]) -> dict[str, list[str]]:
        found = await self._db.batch_get(ACCOUNTS, [user_key(u) for u in users])
        return {str_of(u, PK)[2:]: sorted(strs_of(u, "device_ids")) for u in found}

    async def _senders(self, chat_id: str, after: int, upto: int, not_user: str) -> list[str]:
        expr = Expr()
        cond = (
            f"{expr.name(PK)} = {expr.value(f'C#{chat_id}')} AND {expr.name(SK)}"
            f" BETWEEN {expr.value(num_key(after + 1))} AND {expr.value(num_key(upto))}"
        )
        items = await self._db.query_items(MESSAGES, cond, expr, consistent=True)
        return sorted({s for i in items if (s := opt_str(i, "sender")) and s != not_user})

    async def _advance(
        self,
        chat_id: str,
        user_id: str,
        kind: ReceiptKind,
        seq: int,
        at: int,
        event_prefix: str,
        also: list[NewEvent] | None = None,
    ) -> list[Delivery]:
        """Move the user's delivered (or read) mark up to `seq`, with receipts to the senders of
        the messages it passes, in the append protocol: the mark, its receipt log and the
        receipts' records are one transaction (a mark that moved has sent its receipts).
        Never moves a mark backwards; a concurrent move is read again."""
        for _ in range(_MARK_ATTEMPTS):
            members = await self._members(chat_id)
            marks = {
                str_of(m, SK)[2:]: (opt_int(m, "delivered_seq") or 0, opt_int(m, "read_seq") or 0)
                for m in members
            }
            if user_id not in marks:
                return []
            delivered, read = marks[user_id]
            old = delivered if kind == "delivered" else read
            if seq <= old:
                return []
            marks[user_id] = (max(delivered, seq), read if kind == "delivered" else seq)
            senders = [s for s in await self._senders(chat_id, old, seq, user_id) if s in marks]
            devices = await self._devices_of(senders) if senders else {}
            index = 0 if kind == "delivered" else 1
            events = list(also or [])
            for sender in senders:
                others = [m[index] for u, m in marks.items() if u != sender]
                receipt = Receipt(
                    chat=chat_id,
                    user=user_id,
                    kind=kind,
                    seq=seq,
                    all_seq=min(others) if others else seq,
                    at=at,
                )
                event_id = f"{event_prefix}:{sender}" if event_prefix else ""
                events.append(NewEvent(devices.get(sender, []), encode_event(receipt), event_id))
            expr = Expr()
            d, r = expr.name("delivered_seq"), expr.name("read_seq")
            update = (
                f"SET {d} = {expr.value(marks[user_id][0])}, {r} = {expr.value(marks[user_id][1])}"
            )
            cond = f"({d} = {expr.value(delivered)} OR attribute_not_exists({d}))"
            cond += f" AND ({r} = {expr.value(read)} OR attribute_not_exists({r}))"
            log = key(f"R#{chat_id}#{user_id}", f"{kind}#{num_key(seq)}") | encode(
                {"at": at, "expires": self._policy.expires()}
            )
            extra = [
                self._db.tx_update(CHATS, member_key(chat_id, user_id), update, expr, cond),
                self._db.tx_put(MESSAGES, log),
            ]
            try:
                return await inbox.append_many(
                    self._db, events, at, policy=self._policy, extra=extra
                )
            except TransactionCancelled as exc:
                if 0 not in exc.failed:
                    raise
        raise Unavailable("receipt marks keep moving")

    # -- ack --------------------------------------------------------------------------------------

    async def ack(self, device: Device, upto: int, at: int) -> list[Delivery]:
        head = await self._db.get(INBOX, head_key(device.id))
        if head is None:
            return []
        acked = int_of(head, "acked_iseq")
        cap = min(upto, inbox.barrier(head) - 1)
        if cap <= acked:
            return []
        entries = await self._entries(device.id, 0, cap, live_only=False)
        reached: dict[str, int] = {}
        for entry in entries:
            chat = opt_str(entry, "chat")
            if chat is not None:
                reached[chat] = max(reached.get(chat, 0), int_of(entry, "seq"))
        out: list[Delivery] = []
        for chat_id, seq in reached.items():  # receipts first: a retried ack redoes them
            prefix = f"ack:{device.id}:{cap}:{chat_id}"
            out += await self._advance(chat_id, device.user_id, "delivered", seq, at, prefix)
        await self._delete_entries(device.id, cap, entries)
        expr = Expr()
        a = expr.name("acked_iseq")
        with contextlib.suppress(ConditionFailed):
            await self._db.update(
                INBOX,
                head_key(device.id),
                f"SET {a} = {expr.value(cap)}",
                expr,
                condition=f"attribute_exists({expr.name(PK)}) AND {a} < {expr.value(cap)}",
                idempotent=True,
            )
        return out

    async def release_inbox(self, device_id: str) -> None:
        """A revoked device's remaining entries (its head is gone with the revocation):
        deleted, each message's `pending` dropped once per entry and the bodies nobody awaits
        any more erased, as an ack does. `DynamoAccounts(release_inbox=)` calls it after the
        revocation's transaction; safe to repeat (each entry's decrement happens once)."""
        entries = await self._entries(device_id, 0, _LAST_ISEQ, live_only=False)
        await self._delete_entries(device_id, _LAST_ISEQ, entries)

    async def _entries(
        self, device_id: str, after: int, upto: int, *, live_only: bool, page: int | None = None
    ) -> list[Item]:
        expr = Expr()
        cond = (
            f"{expr.name(PK)} = {expr.value(f'D#{device_id}')} AND {expr.name(SK)}"
            f" BETWEEN {expr.value(num_key(after + 1))} AND {expr.value(num_key(upto))}"
        )
        where = live_filter(expr, self._policy.clock.now_ms()) if live_only else ""
        return await self._db.query_items(
            INBOX, cond, expr, where=where, consistent=True, limit=page, page_size=page
        )

    async def _delete_entries(self, device_id: str, cap: int, entries: list[Item]) -> None:
        """Delete acked entries, 50 a transaction with one `pending` decrement per message they
        name: each entry's decrement happens exactly once, whoever deletes it. Then erase the
        bodies nobody awaits any more."""
        for _ in range(_MARK_ATTEMPTS):
            if not entries:
                return
            retry = False
            for start in range(0, len(entries), _ACK_CHUNK):
                chunk = entries[start : start + _ACK_CHUNK]
                if not await self._delete_chunk(chunk):
                    retry = True
            if not retry:
                return
            entries = await self._entries(device_id, 0, cap, live_only=False)
        raise Unavailable("inbox entries keep moving")

    async def _delete_chunk(self, chunk: list[Item]) -> bool:
        counts: dict[str, int] = defaultdict(int)
        for entry in chunk:
            if opt_str(entry, "chat") is not None:
                counts[str_of(entry, "rec")] += 1
        skip: set[str] = set()
        for _ in range(3):
            items = []
            for entry in chunk:
                e = Expr()
                items.append(
                    self._db.tx_delete(
                        INBOX,
                        key(str_of(entry, PK), str_of(entry, SK)),
                        f"attribute_exists({e.name(PK)})",
                        e,
                    )
                )
            refs = [r for r in counts if r not in skip]
            for ref in refs:
                e = Expr()
                items.append(
                    self._db.tx_update(
                        MESSAGES,
                        inbox.record_key(ref),
                        f"ADD {e.name('pending')} {e.value(-counts[ref])}",
                        e,
                        f"attribute_exists({e.name(PK)})",
                    )
                )
            try:
                await self._db.transact_write(items)
            except TransactionCancelled as exc:
                if any(i < len(chunk) for i in exc.failed):
                    return False  # a concurrent ack took some: query again
                skip |= {refs[i - len(chunk)] for i in exc.failed}
                continue
            await asyncio.gather(*(self._erase(ref) for ref in refs))
            return True
        return False

    async def _erase(self, ref: str) -> None:
        """Drop a body once no entry awaits it, and the chat's preview if it quotes it."""
        expr = Expr()
        try:
            await self._db.update(
                MESSAGES,
                inbox.record_key(ref),
                f"REMOVE {expr.name('raw')}, {expr.name('push_preview')}",
                expr,
                condition=(
                    f"{expr.name('pending')} <= {expr.value(0)}"
                    f" AND attribute_exists({expr.name('raw')})"
                ),
                idempotent=True,
            )
        except ConditionFailed:
            return
        chat_pk, _, seq = ref.partition("/")
        await self._clear_preview(chat_pk[2:], int(seq))

    async def _clear_preview(self, chat_id: str, seq: int) -> None:
        expr = Expr()
        with contextlib.suppress(ConditionFailed):
            await self._db.update(
                CHATS,
                chat_key(chat_id),
                f"REMOVE {expr.name('last_preview')}",
                expr,
                condition=f"{expr.name('last_seq')} = {expr.value(seq)}",
                idempotent=True,
            )

    # -- read -------------------------------------------------------------------------------------

    async def mark_read(self, device: Device, chat_id: str, seq: int, at: int) -> list[Delivery]:
        chat = await self._db.get(CHATS, chat_key(chat_id))
        if chat is None or "st" in chat:
            raise NotFound("no such chat")
        member = await self._db.get(CHATS, member_key(chat_id, device.user_id))
        if member is None:
            raise Forbidden("not a participant of this chat")
        upto = min(seq, opt_int(chat, "last_seq") or 0)
        if upto <= (opt_int(member, "read_seq") or 0):
            return []
        devices = (await self._devices_of([device.user_id])).get(device.user_id, [])
        others = [d for d in devices if d != device.id]
        state = NewEvent(others, encode_event(ReadState(chat=chat_id, seq=upto, at=at)))
        return await self._advance(chat_id, device.user_id, "read", upto, at, "", [state])

    async def read_inbox(
        self, device_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> InboxPage:
        head = await self._db.get(INBOX, head_key(device_id))
        if head is None:
            return InboxPage([], 0, 0)
        visible = await inbox.heal(self._db, device_id, head, self._policy) - 1
        acked = int_of(head, "acked_iseq")
        out: list[InboxEntry] = []
        size = 0
        start = after
        while start < visible and len(out) < limit:
            batch = await self._entries(device_id, start, visible, live_only=True, page=limit)
            if not batch:
                break
            start = key_num(str_of(batch[-1], SK))
            for iseq, raw in await self._payloads(batch):
                if out and max_bytes is not None and size + len(raw) > max_bytes:
                    return InboxPage(out, visible, acked)
                out.append(InboxEntry(iseq, raw))
                size += len(raw)
                if len(out) >= limit:
                    break
        return InboxPage(out, visible, acked)

    async def _payloads(self, entries: list[Item]) -> list[tuple[int, bytes]]:
        """Each entry's payload: its own (events) or its message's body; entries whose body
        is gone (expiring, swept) are left out."""
        refs = {str_of(e, "rec") for e in entries if opt_str(e, "chat") is not None}
        now = self._policy.clock.now_ms()
        bodies: dict[str, bytes] = {}
        if refs:
            for record in await self._db.batch_get(MESSAGES, map(inbox.record_key, refs)):
                raw = opt_bytes(record, "raw")
                if raw is not None and is_live(record, now):
                    bodies[inbox.ref_of(record)] = raw
        out = []
        for entry in entries:
            raw = opt_bytes(entry, "raw") or bodies.get(str_of(entry, "rec"))
            if raw is not None:
                out.append((key_num(str_of(entry, SK)), raw))
        return out

    async def acked_iseq(self, device_id: str) -> int:
        head = await self._db.get(INBOX, head_key(device_id))
        return 0 if head is None else int_of(head, "acked_iseq")

    async def receipts(
        self, user_id: str, chat_id: str, message_id: str
    ) -> tuple[Message, list[MemberReceipt]]:
        now = self._policy.clock.now_ms()
        pointer = await self._db.get(MESSAGES, pointer_key(message_id))
        record = None
        if pointer is not None and is_live(pointer, now) and str_of(pointer, "chat") == chat_id:
            record = await self._db.get(MESSAGES, message_key(chat_id, int_of(pointer, "seq")))
            if record is not None and (inbox.is_pending(record) or not is_live(record, now)):
                record = None
        # Its sender may always ask (also after leaving); anyone else must be a member,
        # checked before telling whether the message exists.
        if (record is None or str_of(record, "sender") != user_id) and (
            await self._db.get(CHATS, member_key(chat_id, user_id)) is None
        ):
            raise Forbidden("not a participant of this chat")
        if record is None:
            raise NotFound("no such message in this chat")
        message = _message_of(record)
        members = sorted(
            (m for m in await self._members(chat_id) if str_of(m, SK)[2:] != message.sender),
            key=lambda m: opt_int(m, "pos") or 0,
        )
        times = await asyncio.gather(
            *(self._receipt_times(chat_id, str_of(m, SK)[2:], message.seq) for m in members)
        )
        return message, list(times)

    async def _receipt_times(self, chat_id: str, user: str, seq: int) -> MemberReceipt:
        found: dict[str, int | None] = {}
        for kind in ("delivered", "read"):
            expr = Expr()
            cond = (
                f"{expr.name(PK)} = {expr.value(f'R#{chat_id}#{user}')} AND {expr.name(SK)}"
                f" BETWEEN {expr.value(f'{kind}#{num_key(seq)}')} AND {expr.value(f'{kind}#:')}"
            )
            where = live_filter(expr, self._policy.clock.now_ms())
            items = await self._db.query_items(
                MESSAGES, cond, expr, where=where, limit=1, consistent=True
            )
            found[kind] = int_of(items[0], "at") if items else None
        read_at, delivered_at = found["read"], found["delivered"]
        if read_at is not None and (delivered_at is None or read_at < delivered_at):
            delivered_at = read_at
        return MemberReceipt(user=user, delivered_at=delivered_at, read_at=read_at)

    # -- retention --------------------------------------------------------------------------------

    async def sweep(self, before: int) -> SweepStats:
        messages = entries = 0
        last_hour = inbox.hour_of(before)
        expr = Expr()
        cond = (
            f"{expr.name(PK)} = {expr.value(inbox.HOURS)}"
            f" AND {expr.name(SK)} <= {expr.value(last_hour)}"
        )
        for hour_item in await self._db.query_items(MESSAGES, cond, expr, consistent=True):
            hour = str_of(hour_item, SK)
            complete = True
            for shard in range(TIME_SHARDS):
                m, e, left = await self._sweep_shard(f"T#{hour}#{shard}", before)
                messages, entries, complete = messages + m, entries + e, complete and not left
            if hour < last_hour and complete:
                await self._db.delete(MESSAGES, key(inbox.HOURS, hour))
                inbox.forget_hour(self._db, hour)
        return SweepStats(messages, entries)

    async def _sweep_shard(self, partition: str, before: int) -> tuple[int, int, bool]:
        """Sweep the records of one `by_time` partition older than `before`: (messages,
        entries deleted, whether pending records were left for recovery)."""
        ix = inbox.BY_TIME
        expr = Expr()
        cond = (
            f"{expr.name(ix.pk)} = {expr.value(partition)}"
            f" AND {expr.name(ix.sk)} < {expr.value(num_key(before))}"
        )
        messages = entries = 0
        left = False
        for found in await self._db.query_items(MESSAGES, cond, expr, index=ix):
            record = await self._db.get(MESSAGES, key(str_of(found, PK), str_of(found, SK)))
            if record is None:
                continue
            if inbox.is_pending(record):
                left = True
                continue
            m, e = await self._sweep_record(record)
            messages, entries = messages + m, entries + e
        return messages, entries, left

    async def _sweep_record(self, record: Item) -> tuple[int, int]:
        keys = [inbox.entry_key(d, i) for d, i in inbox.placed_of(record).items()]
        present = len(await self._db.batch_get(INBOX, keys)) if keys else 0
        if keys:
            await self._db.batch_write(INBOX, deletes=keys)
        pk = str_of(record, PK)
        if pk.startswith("E#"):
            await self._db.delete(MESSAGES, key(pk))
            return 0, present
        chat_id, seq = pk[2:], key_num(str_of(record, SK))
        await self._db.batch_write(
            MESSAGES,
            deletes=[
                claim_key(str_of(record, "sender_device"), str_of(record, "cmid")),
                pointer_key(str_of(record, "id")),
                message_key(chat_id, seq),
            ],
        )
        await self._clear_preview(chat_id, seq)
        return 1, present

    async def recover(self, since: int | None = None) -> int:
        """Roll forward every record written at or after `since` (ms; None: the last hour)
        still pending after its lease: the cold-path worker's job (`recovery.py`), for crashes
        that left no reservation for a reader to find and no later sender to break the chat's
        lock. Reads `by_time` from `since` (each hour's shards) and the records it names
        (eventually consistent: a record is looked at after its lease, seconds after its
        write); returns how many it finished."""
        now = self._policy.clock.now_ms()
        start = now - _LOOKBACK_MS if since is None else min(since, now)
        hours = sorted(
            {inbox.hour_of(t) for t in range(start, now, 3_600_000)} | {inbox.hour_of(now)}
        )
        found: list[Item] = []
        ix = inbox.BY_TIME
        for hour in hours:
            for shard in range(TIME_SHARDS):
                expr = Expr()
                cond = (
                    f"{expr.name(ix.pk)} = {expr.value(f'T#{hour}#{shard}')}"
                    f" AND {expr.name(ix.sk)} >= {expr.value(num_key(start))}"
                )
                found += await self._db.query_items(MESSAGES, cond, expr, index=ix)
        keys = [key(str_of(f, PK), str_of(f, SK)) for f in found]
        done = 0
        for record in await self._db.batch_get(MESSAGES, keys, consistent=False):
            if inbox.is_pending(record) and (opt_int(record, "lease") or 0) <= now:
                fresh = await self._db.get(MESSAGES, key(str_of(record, PK), str_of(record, SK)))
                if fresh is not None and inbox.is_pending(fresh):
                    await inbox.roll_forward(self._db, fresh, self._policy)
                    done += 1
        return done

    async def recover_turn(self, owner: str, hold_ms: int, overlap_ms: int) -> int | None:
        """One node's pass of recovery, if it is `owner`'s turn: the turn item
        (`_RECOVERY`) names one owner at a time, for `hold_ms` (renewed by each of its
        passes, taken over once it lapses), and holds the cursor, the start of the last pass
        minus `overlap_ms`, from which the next pass reads (the last hour the first time in a
        deployment). So the records are read by one node, about once, whatever the number of
        nodes. A cursor older than an hour (every node was down) counts as an hour ago.
        Returns how many records it finished, None if another owner holds the turn."""
        now = self._policy.clock.now_ms()
        expr = Expr()
        who, until = expr.name("owner"), expr.name("until")
        me = expr.value(owner)
        try:
            turn = await self._db.update(
                MESSAGES,
                _RECOVERY,
                f"SET {who} = {me}, {until} = {expr.value(now + hold_ms)}",
                expr,
                condition=(
                    f"attribute_not_exists({expr.name(PK)}) OR {who} = {me}"
                    f" OR {until} < {expr.value(now)}"
                ),
                returns="ALL_NEW",
                idempotent=True,
            )
        except ConditionFailed:
            return None
        cursor = opt_int(turn, "cursor")
        done = await self.recover(None if cursor is None else max(cursor, now - _LOOKBACK_MS))
        expr = Expr()
        with contextlib.suppress(ConditionFailed):  # the turn lapsed meanwhile: the next redoes
            await self._db.update(
                MESSAGES,
                _RECOVERY,
                f"SET {expr.name('cursor')} = {expr.value(now - overlap_ms)}",
                expr,
                condition=f"{expr.name('owner')} = {expr.value(owner)}",
                idempotent=True,
            )
        return done


_check: type[MessageStore] = DynamoMessages
