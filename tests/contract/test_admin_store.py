"""Contract of the store methods behind `pigeon admin` and disabled accounts (see the
docstrings of `AccountStore` and `ChatStore` in pigeon.ports), on every adapter."""

from __future__ import annotations

from pigeon.domain.ids import new_id
from pigeon.domain.models import Device, User
from pigeon.ports import AccountCounts, InboxDepth, Store, StoreCounts
from tests.contract.test_store import T0, chat, device, send_req, user


async def test_disabling_keeps_the_first_time_and_enabling_clears_it(store: Store) -> None:
    u = await user(store, "dis")
    d = Device(id=new_id(), user_id=u.id, name="phone", created_at=T0)
    await store.accounts.add_device(d, b"dis-token", 3)
    status = await store.accounts.device_status_by_token(b"dis-token")
    assert status is not None and (status.device, status.disabled_at) == (d, None)

    assert await store.accounts.set_disabled(u.id, T0 + 5)
    assert await store.accounts.set_disabled(u.id, T0 + 9)  # disabled already: kept as it was
    for status in (
        await store.accounts.device_status_by_token(b"dis-token"),
        await store.accounts.device_status(d.id),
    ):
        assert status is not None and (status.device, status.disabled_at) == (d, T0 + 5)
    record = await store.accounts.account("DIS")
    assert record is not None and (record.id, record.disabled_at, record.devices) == (
        u.id,
        T0 + 5,
        1,
    )
    # the device, its token and the credentials are kept: only the mark changes
    assert await store.accounts.device_by_token(b"dis-token") == d
    assert await store.accounts.credentials("dis") is not None

    assert await store.accounts.set_disabled(u.id, None)
    status = await store.accounts.device_status(d.id)
    assert status is not None and status.disabled_at is None
    assert not await store.accounts.set_disabled(new_id(), T0)  # no such user
    assert not await store.accounts.set_disabled(new_id(), None)


async def test_device_status_of_a_revoked_or_unknown_device_is_none(store: Store) -> None:
    u = await user(store, "gone")
    d = Device(id=new_id(), user_id=u.id, name="old", created_at=T0)
    await store.accounts.add_device(d, b"gone-token", 3)
    assert await store.accounts.revoke_device(u.id, d.id)
    assert await store.accounts.device_status(d.id) is None
    assert await store.accounts.device_status_by_token(b"gone-token") is None
    assert await store.accounts.device_status_by_token(b"never") is None


async def test_accounts_are_listed_in_name_order_in_pages(store: Store) -> None:
    names = ["bob", "Alice", "carol_2", "carol.1", "Dave", "carol-3"]
    users: dict[str, User] = {n: await user(store, n) for n in names}
    await device(store, users["bob"])
    await device(store, users["bob"])
    await store.accounts.set_disabled(users["Dave"].id, T0 + 1)

    everyone = await store.accounts.list_accounts(100)
    # case-folded names, bytewise: '-' < '.' < '_' (not a locale's order)
    assert [r.username for r in everyone] == [
        "Alice",
        "bob",
        "carol-3",
        "carol.1",
        "carol_2",
        "Dave",
    ]
    bob = everyone[1]
    assert (bob.id, bob.created_at, bob.devices, bob.disabled_at) == (
        users["bob"].id,
        T0,
        2,
        None,
    )
    assert everyone[-1].disabled_at == T0 + 1
    first = await store.accounts.list_accounts(2)
    assert [r.username for r in first] == ["Alice", "bob"]
    rest = await store.accounts.list_accounts(3, after="BOB")  # case-insensitive cursor
    assert [r.username for r in rest] == ["carol-3", "carol.1", "carol_2"]
    between = await store.accounts.list_accounts(10, after="carol")  # need not exist
    assert [r.username for r in between] == ["carol-3", "carol.1", "carol_2", "Dave"]
    assert await store.accounts.list_accounts(10, after="zzz") == []
    assert await store.accounts.account("nobody") is None

    counts = await store.accounts.account_counts()
    assert counts == AccountCounts(users=6, disabled=1, devices=2)


async def test_invites_are_listed_by_batch_without_spent_or_expired_ones(store: Store) -> None:
    await store.accounts.add_invites([b"a1", b"a2", b"a3"], T0, T0 + 1000)
    await store.accounts.add_invites([b"b1"], T0 + 1, T0 + 500)
    await store.accounts.add_invites([b"old"], T0 - 10, T0 + 10)
    await store.accounts.create_user(
        User(id=new_id(), username="invited", created_at=T0), "hash", b"a2", T0 + 20
    )
    batches = await store.accounts.list_invites(T0 + 20)
    assert [(b.created_at, b.expires_at, b.count) for b in batches] == [
        (T0 + 1, T0 + 500, 1),  # soonest expiry first
        (T0, T0 + 1000, 2),  # one of three spent
    ]
    assert await store.accounts.list_invites(T0 + 1000) == []


async def test_chat_records_newest_activity_first_and_by_member(store: Store) -> None:
    a, b, c = await user(store, "ra"), await user(store, "rb"), await user(store, "rc")
    da = await device(store, a)
    await device(store, b)
    older = await chat(store, a, b, kind="direct")
    group = await chat(store, a, b, c)
    solo = await chat(store, b, c)
    for i in range(2):  # the direct chat becomes the most recently active
        await store.messages.send(send_req(older, da, f"m{i}"))

    records = await store.chats.chat_records(10)
    assert [r.id for r in records] == [older.id, *sorted([group.id, solo.id], reverse=True)]
    first = records[0]
    assert (first.kind, first.name, first.members, first.last_seq, first.created_at) == (
        "direct",
        None,
        2,
        2,
        T0,
    )
    assert first.last_activity_at == T0 + 1
    assert [r.id for r in await store.chats.chat_records(1)] == [older.id]
    mine = await store.chats.chat_records(10, user_id=c.id)
    assert {r.id for r in mine} == {group.id, solo.id}
    assert {r.members for r in mine} == {3, 2}
    assert await store.chats.chat_records(10, user_id=new_id()) == []
    record = await store.chats.chat_record(group.id)
    assert record is not None and (record.kind, record.name, record.members) == ("group", "g", 3)
    assert await store.chats.chat_record(new_id()) is None


async def test_member_records_have_names_roles_and_marks(store: Store) -> None:
    a, b, c = await user(store, "Ma"), await user(store, "mb"), await user(store, "mc")
    da, db = await device(store, a), await device(store, b)
    group = await chat(store, a, b, c)
    for i in range(3):
        await store.messages.send(send_req(group, da, f"m{i}"))
    await store.messages.ack(db, 3, T0 + 5)  # the chat_update and two messages
    await store.messages.mark_read(db, group.id, 1, T0 + 6)

    members = await store.chats.member_records(group.id)
    assert [(m.user, m.username, m.role) for m in members] == [
        (a.id, "Ma", "admin"),
        (b.id, "mb", "member"),
        (c.id, "mc", "member"),
    ]
    assert [(m.delivered_seq, m.read_seq) for m in members[1:]] == [(2, 1), (0, 0)]
    assert await store.chats.member_records(new_id()) == []


async def test_store_counts(store: Store) -> None:
    empty = await store.chats.store_counts()
    assert empty == StoreCounts(chats=0, messages=0, bodies=0, inbox=0, oldest_inbox_at=None)
    a, b = await user(store, "ca"), await user(store, "cb")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)  # a chat_update in each device's inbox, at T0
    for i in range(3):
        await store.messages.send(send_req(c, da, f"m{i}"))  # one entry each, for db
    await store.messages.ack(db, 2, T0 + 5)  # its chat_update and the first message
    counts = await store.chats.store_counts()  # da: chat_update, receipt; db: two messages
    assert counts == StoreCounts(chats=1, messages=3, bodies=2, inbox=4, oldest_inbox_at=T0)
    await store.messages.ack(da, 1, T0 + 6)
    assert (await store.chats.store_counts()).oldest_inbox_at == T0 + 1


async def test_inbox_depth_counts_what_waits_for_an_ack_on_every_device(store: Store) -> None:
    """The read behind the `pigeon_inbox_*` gauges: the same figures as `store_counts`."""
    assert await store.chats.inbox_depth() == InboxDepth(entries=0, oldest_at=None)
    a, b = await user(store, "da"), await user(store, "db")
    da, db = await device(store, a), await device(store, b)
    await device(store, b)  # bob's second device: its entries wait throughout
    c = await chat(store, a, b)  # a chat_update in each device's inbox, at T0
    for i in range(2):
        sent = await store.messages.send(send_req(c, da, f"m{i}"))  # for db and db2
    assert await store.chats.inbox_depth() == InboxDepth(entries=7, oldest_at=T0)
    await store.messages.ack(db, max(d.iseq for d in sent.deliveries if d.device == db.id), T0)
    await store.messages.ack(da, 1, T0 + 7)  # its chat_update: db's receipt is newer
    depth = await store.chats.inbox_depth()
    counts = await store.chats.store_counts()
    assert (depth.entries, depth.oldest_at) == (counts.inbox, counts.oldest_inbox_at)
    assert depth.entries == 4  # db2: chat_update and two messages; da: db's receipt
    assert depth.oldest_at == T0
