"""The append protocol: how anything puts events into device inboxes on DynamoDB.

Why it exists: a DynamoDB transaction holds 100 items, and one event (a group message, a chat
update) may need 300 inbox entries plus 300 counter updates. So an append is a sequence of
idempotent steps around a *commit record* in the messages table, and what a reader may see is
governed by *reservations* in each device's inbox head (docs/architecture.md, "DynamoDB store",
"The message commit"):

1. the record is written `st = "pending"` with its payload and targets (with `extra`, the
   change that causes the events, in the same transaction: all or nothing);
2. each target device's head hands out the next iseq and records who holds it, in one
   conditional update (`reserve`);
3. a record holding its chat's lock releases it;
4. the entries are written at their reserved (device, iseq), BatchWrite of 25, and the
   push jobs of devices whose head says `push` made pending (a message's);
5. the record commits (`REMOVE st`, `placed` = where its entries are);
6. the reservations are released.

Readers never look past the lowest open reservation of a head (`barrier`), so nothing of a
pending record is ever shown and no gap is ever seen; `roll_forward` runs steps 2-6 for any
pending record (a retry, a reader at the barrier, the chat's next sender, `recover`), as often
as it is called, with the same result. The chats and keys sub-stores use `append_events` (or
`append_many`); the messages sub-store writes its own record (the message) and calls
`roll_forward`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from pigeon.adapters.store.dynamodb import push
from pigeon.adapters.store.dynamodb.codec import (
    PK,
    SK,
    Expr,
    Item,
    Value,
    encode,
    expires_at,
    int_of,
    key,
    key_num,
    num_key,
    opt_bytes,
    opt_int,
    opt_str,
    str_of,
)
from pigeon.adapters.store.dynamodb.db import (
    MAX_TRANSACTION_ITEMS,
    ConditionFailed,
    DynamoDb,
    TransactionCancelled,
)
from pigeon.adapters.store.dynamodb.keyspace import chat_key, head_key
from pigeon.adapters.store.dynamodb.tables import CHATS, INBOX, MESSAGES, TIME_SHARDS, shard
from pigeon.domain.errors import Unavailable
from pigeon.domain.events import Delivery
from pigeon.domain.ids import new_id
from pigeon.ports import Clock
from pigeon.services.clock import SystemClock

#: How long a pending record belongs to its writer before anyone may roll it forward (ms).
LEASE_MS = 5_000
DAY_MS = 86_400_000
PENDING = "pending"
#: The partition of the hours that hold commit records (what `sweep` walks).
HOURS = "H"
BY_TIME = MESSAGES.index("by_time")
_BATCH = 25

#: Tests only: called with the name of each step as it completes ("reserved", "unlocked",
#: "entries", "committed", "released"); raising there is a crash between two steps.
crash_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if crash_hook is not None:
        crash_hook(name)


@dataclass(frozen=True)
class Policy:
    """The time rules of the protocol: the clock (leases, expiry), the retention (the TTL
    of records and entries, counted from the write) and the lease of a pending record."""

    clock: Clock = field(default_factory=SystemClock)
    retention_ms: int = 30 * DAY_MS
    lease_ms: int = LEASE_MS

    def expires(self) -> int:
        return expires_at(self.clock.now_ms(), self.retention_ms)


class NewEvent(msgspec.Struct, frozen=True):
    """One event for `append_many`: its payload (the event's final JSON) for these devices.
    A deterministic `event_id` makes a retried append write nothing twice; "" draws one."""

    device_ids: list[str]
    payload: bytes
    event_id: str = ""


# -- keys -------------------------------------------------------------------------------------


def entry_key(device_id: str, iseq: int) -> Item:
    return key(f"D#{device_id}", num_key(iseq))


def head_item(device_id: str, user_id: str, *, push: bool = False) -> Item:
    """A new device's inbox head (the accounts sub-store writes it with the device): `res`
    must exist as a map for reservations to be set inside it."""
    values: dict[str, Value | None] = {
        "user": user_id,
        "next_iseq": 1,
        "acked_iseq": 0,
        "push": push,
        "res": {},
    }
    return head_key(device_id) | encode(values)


def event_ref(event_id: str) -> str:
    return f"E#{event_id}"


def record_key(ref: str) -> Item:
    if ref.startswith("E#"):
        return key(ref)
    pk, _, seq = ref.partition("/")
    return key(pk, num_key(int(seq)))


def ref_of(record: Item) -> str:
    pk = str_of(record, PK)
    return pk if pk.startswith("E#") else f"{pk}/{key_num(str_of(record, SK))}"


def hour_of(at: int) -> str:
    return datetime.fromtimestamp(at / 1000, UTC).strftime("%Y%m%d%H")


def time_index(record_id: str, at: int) -> dict[str, str]:
    """The `by_time` attributes of a commit record (sweep and recovery find it by them)."""
    return {
        BY_TIME.pk: f"T#{hour_of(at)}#{shard(record_id, TIME_SHARDS)}",
        BY_TIME.sk: f"{num_key(at)}#{record_id}",
    }


_hours_noted: set[tuple[str, str]] = set()


async def note_hour(db: DynamoDb, at: int) -> None:
    """Record that the hour of `at` holds commit records (once per hour and process), so that
    `sweep` queries the hours that exist instead of every hour of the retention."""
    hour = hour_of(at)
    if (db.prefix, hour) not in _hours_noted:
        await db.put(MESSAGES, key(HOURS, hour))
        _hours_noted.add((db.prefix, hour))


def forget_hour(db: DynamoDb, hour: str) -> None:
    _hours_noted.discard((db.prefix, hour))


# -- reading heads ----------------------------------------------------------------------------


def reservations(head: Item) -> dict[str, int]:
    """Record reference -> reserved iseq, of one head."""
    res = head.get("res", {}).get("M", {})
    return {ref: int(v["N"]) for ref, v in res.items()}


def barrier(head: Item) -> int:
    """The lowest iseq a reader may not see yet: the lowest reservation, or the next iseq."""
    res = reservations(head)
    return min(res.values()) if res else int_of(head, "next_iseq")


def placed_of(record: Item) -> dict[str, int]:
    placed = record.get("placed", {}).get("M", {})
    return {device: int(v["N"]) for device, v in placed.items()}


def targets_of(record: Item) -> list[str]:
    return [str(v["S"]) for v in record.get("targets", {}).get("L", [])]


def is_pending(record: Item) -> bool:
    return "st" in record


# -- the steps --------------------------------------------------------------------------------


async def _reserve_one(db: DynamoDb, ref: str, device_id: str) -> tuple[int, bool] | None:
    """The device's iseq for the record, and whether its head says `push` (it has a push
    target); None without a head."""
    expr = Expr()
    nxt, slot = expr.name("next_iseq"), expr.path("res", ref)
    try:
        new = await db.update(
            INBOX,
            head_key(device_id),
            f"SET {nxt} = {nxt} + {expr.value(1)}, {slot} = {nxt}",
            expr,
            condition=f"attribute_exists({expr.name(PK)}) AND attribute_not_exists({slot})",
            returns="ALL_NEW",
            idempotent=True,
        )
    except ConditionFailed as exc:
        if exc.item is None:
            return None  # no head: a revoked device
        new = exc.item
    iseq = reservations(new).get(ref)
    return None if iseq is None else (iseq, bool(new.get("push", {}).get("BOOL")))


async def reserve(
    db: DynamoDb, ref: str, device_ids: Sequence[str]
) -> tuple[dict[str, int], list[str]]:
    """Step 2: the iseq each target device holds for the record (taking one if it holds
    none), in target order, and the devices whose head says `push`; devices without a head
    (revoked) are left out."""
    got = await asyncio.gather(*(_reserve_one(db, ref, d) for d in device_ids))
    held = {d: r for d, r in zip(device_ids, got, strict=True) if r is not None}
    return {d: i for d, (i, _) in held.items()}, [d for d, (_, p) in held.items() if p]


async def _mark_pushes(db: DynamoDb, record: Item, device_ids: list[str]) -> None:
    """Step 4's push outbox: a message's devices with a push target get their job (chat,
    device) pending. Events' pushes (invitations) are their writers' (chats)."""
    pk = str_of(record, PK)
    if not device_ids or not pk.startswith("C#"):
        return
    rules = await push.policy(db)
    at = int_of(record, "at")
    await asyncio.gather(*(push.mark_pending(db, d, pk[2:], at, rules=rules) for d in device_ids))


async def release(db: DynamoDb, ref: str, device_ids: Iterable[str]) -> None:
    """Step 6: drop the record's reservation from these heads (idempotent)."""

    async def one(device_id: str) -> None:
        expr = Expr()
        with contextlib.suppress(ConditionFailed):  # no head: the device was revoked
            await db.update(
                INBOX,
                head_key(device_id),
                f"REMOVE {expr.path('res', ref)}",
                expr,
                condition=f"attribute_exists({expr.name(PK)})",
                idempotent=True,
            )

    await asyncio.gather(*(one(d) for d in device_ids))


async def release_chat_lock(db: DynamoDb, chat_id: str, holder: str) -> None:
    """Step 3: free the chat for its next writer, if `holder` still holds it."""
    expr = Expr()
    lock = expr.name("lock")
    with contextlib.suppress(ConditionFailed):
        await db.update(
            CHATS,
            chat_key(chat_id),
            f"REMOVE {lock}, {expr.name('lock_until')}",
            expr,
            condition=f"{lock} = {expr.value(holder)}",
            idempotent=True,
        )


def _entry(record: Item, device_id: str, iseq: int, expires: int) -> Item:
    pk = str_of(record, PK)
    values: dict[str, Any] = {"rec": ref_of(record), "at": int_of(record, "at"), "expires": expires}
    if pk.startswith("C#"):
        values |= {"chat": pk[2:], "seq": key_num(str_of(record, SK))}
    else:
        values["raw"] = opt_bytes(record, "raw")
    return entry_key(device_id, iseq) | encode(values)


async def _commit(db: DynamoDb, record: Item, placed: dict[str, int]) -> bool:
    """Step 5: True if this call committed the record, False if someone else had."""
    expr = Expr()
    st = expr.name("st")
    removes = [st, expr.name("lease"), expr.name("lock_chat")]
    if not placed:  # nobody waits for it: no body to keep
        removes += [expr.name("raw"), expr.name("push_preview")]
    update = (
        f"SET {expr.name('placed')} = {expr.value(dict(placed))},"
        f" {expr.name('pending')} = {expr.value(len(placed))} REMOVE {', '.join(removes)}"
    )
    try:
        await db.update(
            MESSAGES,
            record_key(ref_of(record)),
            update,
            expr,
            condition=f"{st} = {expr.value(PENDING)}",
            idempotent=True,
        )
    except ConditionFailed as exc:
        return bool(exc.retried and exc.item is not None and placed_of(exc.item) == placed)
    return True


async def _drop_strays(db: DynamoDb, ref: str, strays: dict[str, int]) -> None:
    """Reservations taken after the record committed (a late roll-forward): their entries go
    (nobody saw them: the barrier held) and so do the reservations, leaving a hole in the
    device's iseqs, which the contract reads as acked."""
    await db.batch_write(INBOX, deletes=[entry_key(d, i) for d, i in strays.items()])
    await release(db, ref, strays)


async def roll_forward(
    db: DynamoDb,
    record: Item,
    policy: Policy,
    *,
    unlocked: Callable[[], None] | None = None,
) -> list[Delivery]:
    """Steps 2-6 for a pending record, by anyone, any number of times (concurrently too).
    Returns the deliveries if this call committed it, [] if it was committed by another.
    `unlocked` is called once the record's chat lock is released (step 3)."""
    if not is_pending(record):
        return []
    ref = ref_of(record)
    reserved, pushers = await reserve(db, ref, targets_of(record))
    _step("reserved")
    lock_chat = opt_str(record, "lock_chat")
    if lock_chat is not None:
        await release_chat_lock(db, lock_chat, str_of(record, "id"))
    if unlocked is not None:
        unlocked()
    _step("unlocked")
    expires = policy.expires()
    entries = [_entry(record, d, i, expires) for d, i in reserved.items()]
    for start in range(0, len(entries), _BATCH):
        await db.batch_write(INBOX, puts=entries[start : start + _BATCH])
        _step("entries")
    await _mark_pushes(db, record, pushers)
    if not await _commit(db, record, reserved):
        stored = await db.get(MESSAGES, record_key(ref))
        placed = placed_of(stored) if stored is not None else {}
        strays = {d: i for d, i in reserved.items() if placed.get(d) != i}
        if strays:
            await _drop_strays(db, ref, strays)
        return []
    _step("committed")
    await release(db, ref, reserved)
    _step("released")
    raw = opt_bytes(record, "raw") or b""
    return [Delivery(d, i, raw) for d, i in reserved.items()]


async def heal(db: DynamoDb, device_id: str, head: Item, policy: Policy) -> int:
    """The barrier of a head after healing what holds it: reservations of committed (or
    vanished) records are released, pending records past their lease rolled forward; a
    pending record within its lease keeps the barrier."""
    res = reservations(head)
    if not res:
        return int_of(head, "next_iseq")
    records = {ref_of(r): r for r in await db.batch_get(MESSAGES, map(record_key, res))}
    now = policy.clock.now_ms()
    held: list[int] = []
    for ref, iseq in sorted(res.items(), key=lambda kv: kv[1]):
        record = records.get(ref)
        if record is None or not is_pending(record):
            placed = placed_of(record) if record is not None else {}
            if placed.get(device_id) == iseq:
                await release(db, ref, [device_id])
            else:
                await _drop_strays(db, ref, {device_id: iseq})
        elif (opt_int(record, "lease") or 0) <= now:
            try:
                await roll_forward(db, record, policy)
            except Unavailable:
                held.append(iseq)
        else:
            held.append(iseq)
    return min(held) if held else int_of(head, "next_iseq")


# -- the append protocol for events -----------------------------------------------------------


def event_record(event: NewEvent, event_id: str, at: int, policy: Policy) -> Item:
    values: dict[str, Any] = {
        "id": event_id,
        "raw": event.payload,
        "targets": list(dict.fromkeys(event.device_ids)),
        "st": PENDING,
        "lease": policy.clock.now_ms() + policy.lease_ms,
        "at": at,
        "expires": policy.expires(),
    }
    return key(event_ref(event_id)) | encode(values | time_index(event_id, at))


async def append_events(
    db: DynamoDb,
    device_ids: Sequence[str],
    payload: bytes,
    at: int,
    *,
    policy: Policy | None = None,
    event_id: str = "",
    extra: Sequence[dict[str, Any]] = (),
) -> list[Delivery]:
    """Append one event (`payload`, its final JSON) to each device's inbox, exactly once,
    never half-shown, and return the deliveries to push. `extra` are transaction items (made
    with `db.tx_put`/`tx_update`...) written atomically with the event's record: the change
    that causes the event. A failing condition among them raises `TransactionCancelled`
    (indexes as in `extra`) and appends nothing. With a deterministic `event_id`, a repeated
    call writes nothing twice (and returns [] once the first has committed)."""
    return await append_many(
        db, [NewEvent(list(device_ids), payload, event_id)], at, policy=policy, extra=extra
    )


async def append_many(
    db: DynamoDb,
    events: Sequence[NewEvent],
    at: int,
    *,
    policy: Policy | None = None,
    extra: Sequence[dict[str, Any]] = (),
) -> list[Delivery]:
    """`append_events` for several events caused by one change (`extra`): the change and the
    records of the first `100 - len(extra)` events are one transaction; further records are
    written after it (idempotently), before any is rolled forward."""
    rules = policy or Policy()
    records = [event_record(e, e.event_id or new_id(), at, rules) for e in events if e.device_ids]
    if not records and not extra:
        return []
    if records:
        await note_hour(db, at)
    puts = [db.tx_put(MESSAGES, r, f"attribute_not_exists({PK})") for r in records]
    first = [*extra, *puts][:MAX_TRANSACTION_ITEMS]
    try:
        await db.transact_write(first)
    except TransactionCancelled as exc:
        if any(i < len(extra) for i in exc.failed) or not records:
            raise
        # Every record of the first transaction exists: this append was made before (a
        # retry with deterministic ids). Finish what it left pending.
        return await _resume(db, records, rules)
    for record in records[len(first) - len(extra) :]:
        with contextlib.suppress(ConditionFailed):
            await db.put(MESSAGES, record, condition=f"attribute_not_exists({PK})")
    done = await asyncio.gather(*(roll_forward(db, r, rules) for r in records))
    return [d for part in done for d in part]


async def _resume(db: DynamoDb, records: list[Item], policy: Policy) -> list[Delivery]:
    stored = {
        ref_of(r): r for r in await db.batch_get(MESSAGES, [record_key(ref_of(r)) for r in records])
    }
    out: list[Delivery] = []
    for record in records:
        found = stored.get(ref_of(record))
        if found is None:
            try:
                await db.put(MESSAGES, record, condition=f"attribute_not_exists({PK})")
                found = record
            except ConditionFailed as exc:
                found = exc.item
        if found is not None:
            out += await roll_forward(db, found, policy)
    return out
