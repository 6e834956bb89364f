"""The DynamoDB `MessageStore` (adapters/store/dynamodb/messages.py, inbox.py) on moto: the
crash-safety of the send protocol (a crash between any two of its steps, then a retry or a
recovery). The Store contract itself runs on this store through tests/contract/conftest.py.

`_Seed` writes the items these tests need (users, devices with their inbox heads, chats with
their members and `ChatUpdate`s through the append protocol) directly with the design's keys,
so that these tests exercise the message path alone (the revocation test uses the real
`DynamoAccounts`, wired as `DynamoStore` wires it). The message tests that need membership
changes, chat lists or admin counts run with the real chats sub-store in
test_dynamodb_chats.py, the envelope test in test_dynamodb_keys.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import msgspec
import pytest

from pigeon.adapters.store.dynamodb import inbox
from pigeon.adapters.store.dynamodb.accounts import DynamoAccounts
from pigeon.adapters.store.dynamodb.codec import Expr, encode, key, num_key
from pigeon.adapters.store.dynamodb.db import DynamoDb, TransactionCancelled
from pigeon.adapters.store.dynamodb.inbox import Policy
from pigeon.adapters.store.dynamodb.messages import DynamoMessages
from pigeon.adapters.store.dynamodb.tables import ACCOUNTS, CHATS, INBOX, MESSAGES, PUSH
from pigeon.domain.events import ChatUpdate, Delivery, Message, decode_event, encode_event
from pigeon.domain.models import ChatInfo, Device, User
from tests.contract import test_store as contract
from tests.contract.test_store import T0, chat, device, events, send_req, user
from tests.support import dynamodb as support

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo


class ManualClock:
    """Real time plus `now` (ms) that the crash tests add to move past a lease. Real time goes
    on so that leases expire as they would in production."""

    def __init__(self) -> None:
        self.now = 0

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.now


class _SeedAccounts:
    """Test-only: users and devices as the accounts sub-store writes them."""

    def __init__(self, db: DynamoDb) -> None:
        self._db = db

    async def create_user(self, u: User, password_hash: str) -> None:
        await self._db.put(ACCOUNTS, key(f"U#{u.id}") | encode({"username": u.username}))

    async def add_device(self, d: Device, token_hash: bytes, max_devices: int) -> None:
        expr = Expr()
        await self._db.update(
            ACCOUNTS,
            key(f"U#{d.user_id}"),
            f"ADD {expr.name('device_ids')} {expr.value(frozenset({d.id}))}",
            expr,
        )
        await self._db.put(INBOX, inbox.head_item(d.id, d.user_id))


class _SeedChats:
    """Test-only: a chat, its members and its `ChatUpdate`s, as the chats sub-store will."""

    def __init__(self, db: DynamoDb, policy: Policy) -> None:
        self._db = db
        self._policy = policy

    async def create_chat(self, info: ChatInfo) -> tuple[ChatInfo, list[Delivery]]:
        roster = frozenset(info.member_ids())
        await self._db.put(
            CHATS,
            key(f"C#{info.id}")
            | encode({"kind": info.kind, "version": info.version, "last_seq": 0, "roster": roster}),
        )
        for pos, m in enumerate(info.members):
            values = {"role": m.role, "pos": pos, "delivered_seq": 0, "read_seq": 0}
            await self._db.put(CHATS, key(f"C#{info.id}", f"M#{m.user}") | encode(values))
        users = await self._db.batch_get(ACCOUNTS, [key(f"U#{u}") for u in sorted(roster)])
        devices = sorted(
            (u["pk"]["S"], d) for u in users for d in u.get("device_ids", {}).get("SS", [])
        )
        update = ChatUpdate(chat=info, change="created", by=info.created_by, at=info.created_at)
        out = await inbox.append_events(
            self._db,
            [d for _, d in devices],
            encode_event(update),
            info.created_at,
            policy=self._policy,
        )
        return info, out


class _Store:
    """What the imported contract tests use of a `Store`: real messages, seeded the rest."""

    def __init__(self, db: DynamoDb, policy: Policy) -> None:
        self.db = db
        self.accounts = _SeedAccounts(db)
        self.chats = _SeedChats(db, policy)
        # moto on two shared cores commits a message in tens of ms, not DynamoDB's few: 30
        # senders on one chat may wait longer for its lock than the production default.
        self.messages = DynamoMessages(db, policy, lock_wait_ms=60_000)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(dynamo: DynamoDb, clock: ManualClock) -> _Store:
    return _Store(dynamo, Policy(clock=clock))


class Crash(Exception):
    """A crash of the writer between two steps."""


@pytest.fixture
def crash_at() -> Iterator[list[str]]:
    """Name steps ("reserved", "unlocked", "entries#2", "committed"...) to crash after, once."""
    targets: list[str] = []
    seen: dict[str, int] = {}

    def hook(step: str) -> None:
        if not targets:
            return
        seen[step] = seen.get(step, 0) + 1
        for name in (step, f"{step}#{seen[step]}"):
            if name in targets:
                targets.remove(name)
                raise Crash(name)

    inbox.crash_hook = hook
    yield targets
    inbox.crash_hook = None


async def _group(store: _Store, users: int, per_user: int) -> tuple[ChatInfo, Device, list[Device]]:
    """A group whose sender has one device and every other member `per_user` devices (each
    device's inbox starts with the group's chat_update, iseq 1)."""
    members = [await user(store, f"u{i}") for i in range(users)]  # type: ignore[arg-type]
    sender = await device(store, members[0])  # type: ignore[arg-type]
    others = [await device(store, m) for m in members[1:] for _ in range(per_user)]  # type: ignore[arg-type]
    g = await chat(store, *members)  # type: ignore[arg-type]
    return g, sender, others


async def _messages(store: _Store, d: Device) -> list[tuple[int, int]]:
    """(iseq, seq) of the messages a reader of `d` sees, checking there is no gap."""
    page = await store.messages.read_inbox(d.id, 0, 1000)
    iseqs = [e.iseq for e in page.entries]
    assert iseqs == list(range(page.acked + 1, page.head + 1)), "a gap, or something past the head"
    return [
        (e.iseq, ev.seq) for e in page.entries if isinstance(ev := decode_event(e.raw), Message)
    ]


@pytest.mark.parametrize("step", ["reserved", "entries#1", "committed"])
async def test_a_send_crashed_between_steps_is_never_half_seen_and_a_retry_completes_it_once(
    store: _Store, crash_at: list[str], step: str
) -> None:
    g, sender, others = await _group(store, 14, 2)  # 26 target devices: two entry chunks
    req = send_req(g, sender, "crash", cmid="c1")  # type: ignore[arg-type]
    crash_at.append(step)
    with pytest.raises(Crash):
        await store.messages.send(req)
    for d in others:  # nothing of it is visible, nor any gap, wherever it stopped
        assert await _messages(store, d) == ([(2, 1)] if step == "committed" else [])
    retry = await store.messages.send(msgspec.structs.replace(req, message_id="other-id"))
    if step == "committed":  # it was complete: the retry is a duplicate
        assert retry.duplicate and retry.deliveries == []
    else:  # the retry finishes the crashed send: its deliveries, once per device
        assert not retry.duplicate and sorted(d.device for d in retry.deliveries) == sorted(
            d.id for d in others
        )
    assert retry.message.id == req.message_id and retry.message.seq == 1
    again = await store.messages.send(req)
    assert again.duplicate and again.message.seq == 1
    nxt = await store.messages.send(send_req(g, sender, "next"))  # type: ignore[arg-type]
    assert nxt.message.seq == 2
    for d in others:
        assert await _messages(store, d) == [(2, 1), (3, 2)]


async def test_a_crash_holding_the_chat_lock_is_rolled_forward_by_the_next_sender(
    store: _Store, crash_at: list[str], clock: ManualClock
) -> None:
    g, sender, others = await _group(store, 3, 2)
    crash_at.append("reserved")
    with pytest.raises(Crash):
        await store.messages.send(send_req(g, sender, "lost ok"))  # type: ignore[arg-type]
    for d in others:
        assert await _messages(store, d) == []  # readers wait at the reservation
    clock.now += inbox.LEASE_MS + 1  # the writer is dead: its lease passes
    nxt = await store.messages.send(send_req(g, others[0], "next"))  # type: ignore[arg-type]
    assert nxt.message.seq == 2
    assert await _messages(store, others[1]) == [(2, 1), (3, 2)]
    assert await _messages(store, sender) == [(2, 2)]  # the reply, then receipts: no gap


async def test_a_reader_heals_reservations_left_by_a_crash(
    store: _Store, crash_at: list[str], clock: ManualClock
) -> None:
    g, sender, others = await _group(store, 3, 1)
    crash_at.append("committed")  # committed, reservations never released
    with pytest.raises(Crash):
        await store.messages.send(send_req(g, sender, "a"))  # type: ignore[arg-type]
    assert await _messages(store, others[0]) == [(2, 1)]
    crash_at.append("entries")  # entries written, never committed
    with pytest.raises(Crash):
        await store.messages.send(send_req(g, sender, "b"))  # type: ignore[arg-type]
    assert await _messages(store, others[0]) == [(2, 1)]  # within the lease: it waits
    assert (await store.messages.ack(others[0], 99, T0)) != []  # capped below the barrier
    assert await store.messages.acked_iseq(others[0].id) == 2
    clock.now += inbox.LEASE_MS + 1
    assert await _messages(store, others[1]) == [(2, 1), (3, 2)]  # rolled forward once
    assert await _messages(store, others[0]) == [(3, 2)]
    head = await store.db.get(INBOX, inbox.head_key(others[1].id))
    assert head is not None and inbox.reservations(head) == {}


async def test_bodies_go_when_every_entry_is_acked(store: _Store) -> None:
    g, sender, others = await _group(store, 2, 2)
    sent = await store.messages.send(send_req(g, sender, "bye"))  # type: ignore[arg-type]
    record_key = key(f"C#{g.id}", num_key(1))
    await store.messages.ack(others[0], 2, T0)
    assert "raw" in (await store.db.get(inbox.MESSAGES, record_key) or {})
    await store.messages.ack(others[1], 2, T0)
    await store.messages.ack(others[1], 2, T0)  # again: pending drops once per entry
    record = await store.db.get(inbox.MESSAGES, record_key)
    assert record is not None and "raw" not in record and record["pending"]["N"] == "0"
    message, _ = await store.messages.receipts(sender.user_id, g.id, sent.message.id)
    assert message.body is None and message.seq == 1


async def test_events_appended_twice_with_one_id_are_delivered_once(store: _Store) -> None:
    _, _, others = await _group(store, 2, 2)
    ids = [d.id for d in others]
    policy = store.messages._policy
    raw = b'{"type":"x"}'
    first = await inbox.append_events(store.db, ids, raw, T0, policy=policy, event_id="e1")
    again = await inbox.append_events(store.db, ids, raw, T0, policy=policy, event_id="e1")
    assert sorted(d.device for d in first) == sorted(ids) and again == []
    for d in others:
        page = await store.messages.read_inbox(d.id, 0, 100)
        assert [e.iseq for e in page.entries] == [1, 2]  # the chat_update, the event


async def test_expired_entries_are_not_read(store: _Store, clock: ManualClock) -> None:
    g, sender, others = await _group(store, 2, 1)
    await store.messages.send(send_req(g, sender, "old"))  # type: ignore[arg-type]
    assert len(await events(store, others[0])) == 2  # type: ignore[arg-type]
    clock.now += Policy().retention_ms + 1000  # DynamoDB has not deleted it yet; reads filter
    assert await events(store, others[0]) == []  # type: ignore[arg-type]


async def test_a_message_marks_the_push_job_of_devices_whose_head_says_push(
    store: _Store,
) -> None:
    g, sender, (pushed, silent) = await _group(store, 2, 2)
    expr = Expr()
    await store.db.update(  # what DynamoPush.set_target does to the head
        INBOX, inbox.head_key(pushed.id), f"SET {expr.name('push')} = {expr.value(True)}", expr
    )
    sent = [await store.messages.send(send_req(g, sender, f"m{i}")) for i in range(2)]
    job = await store.db.get(PUSH, key(f"P#{pushed.id}", f"J#{g.id}"))
    assert job is not None and job["pending"]["N"] == "1"  # one job for the burst
    assert job["due_at"]["N"] == str(sent[0].message.at)  # no grace configured
    assert await store.db.get(PUSH, key(f"P#{silent.id}", f"J#{g.id}")) is None


async def test_revoking_a_device_releases_its_inbox(store: _Store) -> None:
    """The contract's test, with the real accounts sub-store wired as `DynamoStore` wires it
    (`release_inbox` from the messages)."""
    accounts = DynamoAccounts(store.db, store.messages.release_inbox)
    store.accounts = accounts  # type: ignore[assignment]
    await contract.test_revoking_a_device_releases_its_inbox(store)  # type: ignore[arg-type]


async def test_the_test_server_loses_no_write_to_a_cancelled_transaction(
    dynamo: DynamoDb,
) -> None:
    """The guard of tests/support/dynamodb.py's serialised moto. Threaded, moto puts back a
    cancelled transaction's snapshot of whole tables over the writes made meanwhile (about 1
    acknowledged put in 100 was lost here, and test_send_assigns_gap_free_seq_and_iseq failed
    1 run in 4: a chat's `last_seq` and message record, or its lock's release, undone)."""
    await dynamo.put(MESSAGES, key("taken"))
    stop = asyncio.Event()

    async def cancelled() -> None:
        while not stop.is_set():
            with contextlib.suppress(TransactionCancelled):
                await dynamo.transact_write(
                    [dynamo.tx_put(MESSAGES, key("taken"), "attribute_not_exists(pk)")]
                )

    spoilers = [asyncio.create_task(cancelled()) for _ in range(4)]
    try:
        for i in range(150):
            await dynamo.put(MESSAGES, key(f"w{i}"))
    finally:
        stop.set()
        await asyncio.gather(*spoilers)
    found = await dynamo.batch_get(MESSAGES, [key(f"w{i}") for i in range(150)])
    assert len(found) == 150


@pytest.fixture(autouse=True)
def _no_hook_leak() -> Iterator[None]:
    yield
    inbox.crash_hook = None
