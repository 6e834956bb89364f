"""Contract of the Store port (see the docstrings in pigeon.ports), for every adapter."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from pigeon.domain.errors import Conflict, Forbidden, NotFound, TooManyDevices
from pigeon.domain.events import ChatUpdate, Message, ReadState, Receipt, decode_event
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, Device, Member, User
from pigeon.ports import SendRequest, Store

_tokens = itertools.count()
T0 = 1_700_000_000_000


async def user(store: Store, name: str) -> User:
    u = User(id=new_id(), username=name, created_at=T0)
    await store.accounts.create_user(u, "hash")
    return u


async def device(store: Store, u: User, max_devices: int = 3) -> Device:
    d = Device(id=new_id(), user_id=u.id, name="d", created_at=T0)
    await store.accounts.add_device(d, f"token{next(_tokens)}".encode(), max_devices)
    return d


async def chat(store: Store, *members: User, kind: str = "group") -> ChatInfo:
    info = ChatInfo(
        id=new_id(),
        kind=kind,
        name=None if kind == "direct" else "g",  # type: ignore[arg-type]
        created_by=members[0].id,
        created_at=T0,
        members=[
            Member(user=m.id, role="admin" if i == 0 else "member") for i, m in enumerate(members)
        ],
    )
    created, _ = await store.chats.create_chat(info)
    return created


def send_req(c: ChatInfo, sender: Device, body: str = "hi", cmid: str | None = None) -> SendRequest:
    return SendRequest(
        message_id=new_id(),
        chat=c.id,
        sender=sender.user_id,
        sender_device=sender.id,
        cmid=cmid or new_id(),
        at=T0 + 1,
        body=body,
        attachment=None,
        preview=body,
    )


async def events(store: Store, d: Device, after: int = 0) -> list[tuple[int, object]]:
    page = await store.messages.read_inbox(d.id, after, 1000)
    return [(e.iseq, decode_event(e.raw)) for e in page.entries]


async def test_usernames_are_unique_case_insensitively(store: Store) -> None:
    await user(store, "Alice")
    with pytest.raises(Conflict):
        await user(store, "alice")
    found = await store.accounts.user_by_name("ALICE")
    assert found is not None and found.username == "Alice"
    creds = await store.accounts.credentials("alice")
    assert creds is not None and creds.password_hash == "hash"


async def test_device_limit_is_atomic(store: Store) -> None:
    u = await user(store, "many")
    results = await asyncio.gather(
        *(device(store, u, max_devices=3) for _ in range(6)), return_exceptions=True
    )
    assert sum(isinstance(r, Device) for r in results) == 3
    assert sum(isinstance(r, TooManyDevices) for r in results) == 3
    assert len(await store.accounts.list_devices(u.id)) == 3


async def test_token_lookup_and_revocation(store: Store) -> None:
    u = await user(store, "rev")
    d = Device(id=new_id(), user_id=u.id, name="phone", created_at=T0)
    await store.accounts.add_device(d, b"secret-hash", 3)
    assert await store.accounts.device_by_token(b"secret-hash") == d
    other = await user(store, "other")
    assert not await store.accounts.revoke_device(other.id, d.id)  # not theirs
    assert await store.accounts.revoke_device(u.id, d.id)
    assert await store.accounts.device_by_token(b"secret-hash") is None


async def test_one_direct_chat_per_pair(store: Store) -> None:
    a, b = await user(store, "a1"), await user(store, "b1")
    first = await chat(store, a, b, kind="direct")
    second = await chat(store, b, a, kind="direct")
    assert first.id == second.id
    assert (await store.chats.find_direct(b.id, a.id)) == first


async def test_send_assigns_gap_free_seq_and_iseq(store: Store) -> None:
    a, b = await user(store, "a2"), await user(store, "b2")
    da, db1, db2 = await device(store, a), await device(store, b), await device(store, b)
    da2 = await device(store, a)
    c = await chat(store, a, b)
    results = await asyncio.gather(
        *(store.messages.send(send_req(c, da, f"m{i}")) for i in range(30))
    )
    assert sorted(r.message.seq for r in results) == list(range(1, 31))
    for d in (db1, db2, da2):  # every other device, incl. the sender's own other device
        evs = await events(store, d)
        assert [i for i, _ in evs] == list(range(1, 32))  # chat_update + 30 messages
        seqs = [e.seq for _, e in evs if isinstance(e, Message)]
        assert seqs == list(range(1, 31))
    assert [e for _, e in await events(store, da) if isinstance(e, Message)] == []


async def test_resend_of_a_cmid_is_idempotent(store: Store) -> None:
    a, b = await user(store, "a3"), await user(store, "b3")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    first = await store.messages.send(send_req(c, da, cmid="same"))
    again = await store.messages.send(send_req(c, da, cmid="same"))
    assert again.duplicate and not first.duplicate and again.deliveries == []
    assert (again.message.id, again.message.seq) == (first.message.id, first.message.seq)
    assert len([e for _, e in await events(store, db) if isinstance(e, Message)]) == 1


async def test_send_checks_membership(store: Store) -> None:
    a, b, m = await user(store, "a4"), await user(store, "b4"), await user(store, "m4")
    dm = await device(store, m)
    await device(store, a)
    c = await chat(store, a, b)
    with pytest.raises(Forbidden):
        await store.messages.send(send_req(c, dm))
    with pytest.raises(NotFound):
        await store.messages.send(
            SendRequest(
                message_id=new_id(),
                chat=new_id(),
                sender=m.id,
                sender_device=dm.id,
                cmid="x",
                at=T0,
                body="x",
                attachment=None,
                preview=None,
            )
        )


async def test_ack_drops_entries_sends_receipts_and_frees_bodies(store: Store) -> None:
    a, b = await user(store, "a5"), await user(store, "b5")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    await store.messages.ack(da, 1, T0)  # alice acks her chat_update
    sent = [await store.messages.send(send_req(c, da, f"m{i}")) for i in range(3)]
    assert [d.device for s in sent for d in s.deliveries] == [db.id] * 3
    deliveries = await store.messages.ack(db, 3, T0 + 5)  # chat_update + 2 messages
    receipts = [decode_event(d.raw) for d in deliveries]
    assert [d.device for d in deliveries] == [da.id]
    (r,) = receipts
    assert isinstance(r, Receipt) and (r.kind, r.seq, r.user, r.all_seq) == (
        "delivered",
        2,
        b.id,
        2,
    )
    assert [i for i, _ in await events(store, db)] == [4]
    assert await store.messages.ack(db, 3, T0 + 6) == []  # idempotent
    page = await store.messages.read_inbox(db.id, 0, 10)
    assert (page.head, page.acked) == (4, 3)
    _, members = await store.messages.receipts(a.id, c.id, sent[0].message.id)
    assert members[0].delivered_at == T0 + 5 and members[0].read_at is None


async def test_mark_read_is_monotonic_and_syncs_other_devices(store: Store) -> None:
    a, b = await user(store, "a6"), await user(store, "b6")
    da, db1, db2 = await device(store, a), await device(store, b), await device(store, b)
    c = await chat(store, a, b)
    for i in range(3):
        await store.messages.send(send_req(c, da, f"m{i}"))
    out = await store.messages.mark_read(db1, c.id, 99, T0 + 9)  # capped at last seq
    by_device = {d.device: decode_event(d.raw) for d in out}
    receipt, state = by_device[da.id], by_device[db2.id]
    assert isinstance(receipt, Receipt) and (receipt.kind, receipt.seq) == ("read", 3)
    assert isinstance(state, ReadState) and state.seq == 3
    assert db1.id not in by_device
    assert await store.messages.mark_read(db1, c.id, 2, T0 + 10) == []
    outsider = await device(store, await user(store, "o6"))
    with pytest.raises(Forbidden):
        await store.messages.mark_read(outsider, c.id, 1, T0)
    with pytest.raises(Forbidden):
        await store.messages.receipts(outsider.user_id, c.id, new_id())


async def test_group_receipts_aggregate(store: Store) -> None:
    a, b, c_ = await user(store, "a7"), await user(store, "b7"), await user(store, "c7")
    da, db, dc = await device(store, a), await device(store, b), await device(store, c_)
    g = await chat(store, a, b, c_)
    await store.messages.send(send_req(g, da))
    first = decode_event((await store.messages.ack(db, 2, T0))[0].raw)
    assert isinstance(first, Receipt) and first.all_seq == 0
    second = decode_event((await store.messages.ack(dc, 2, T0))[0].raw)
    assert isinstance(second, Receipt) and second.all_seq == 1


async def test_membership_compare_and_set(store: Store) -> None:
    a, b, n = await user(store, "a8"), await user(store, "b8"), await user(store, "n8")
    da, dn = await device(store, a), await device(store, n)
    g = await chat(store, a, b)
    await store.messages.send(send_req(g, da))
    updated, deliveries = await store.chats.change_members(
        g.id, g.version, [Member(user=n.id)], [b.id], [], a.id, T0
    )
    assert updated.member_ids() == [a.id, n.id] and updated.version == g.version + 1
    update = decode_event(deliveries[-1].raw)
    assert isinstance(update, ChatUpdate) and update.added == [n.id] and update.removed == [b.id]
    with pytest.raises(Conflict):
        await store.chats.change_members(g.id, g.version, [], [n.id], [], a.id, T0)
    # the newcomer's marks start at the current seq: nothing unread from before
    (summary,) = await store.chats.list_chats(n.id)
    assert summary.unread == 0 and summary.last_seq == 1
    assert [i for i, _ in await events(store, dn)] == [1]


async def test_revoking_a_device_releases_its_inbox(store: Store) -> None:
    a, b = await user(store, "a9"), await user(store, "b9")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    sent = await store.messages.send(send_req(c, da))
    assert await store.accounts.revoke_device(b.id, db.id)
    page = await store.messages.read_inbox(db.id, 0, 10)
    assert page.entries == []
    message, _ = await store.messages.receipts(a.id, c.id, sent.message.id)
    assert message.body is None  # nobody is waiting for it any more


async def test_sweep_deletes_what_is_older(store: Store) -> None:
    a, b = await user(store, "a10"), await user(store, "b10")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    old = await store.messages.send(send_req(c, da, "old"))
    stats = await store.messages.sweep(T0 + 2)
    assert stats.messages == 1 and stats.inbox_entries >= 2
    with pytest.raises(NotFound):
        await store.messages.receipts(a.id, c.id, old.message.id)
    page = await store.messages.read_inbox(db.id, 0, 10)
    assert page.entries == [] and page.head == 2


async def test_presence_settings_and_chat_partners(store: Store) -> None:
    a, b, c_ = await user(store, "a11"), await user(store, "b11"), await user(store, "c11")
    da = await device(store, a)
    db = await device(store, b)
    g = await chat(store, a, b)
    assert await store.chats.shares_chat(a.id, [b.id, c_.id]) == {b.id}
    assert sorted(await store.chats.member_devices(g.id)) == sorted([(a.id, da.id), (b.id, db.id)])
    assert await store.accounts.presence_settings([a.id]) == {a.id: ("chats", None)}
    await store.accounts.set_visibility(a.id, "nobody")
    await store.accounts.set_last_seen(a.id, 50)
    await store.accounts.set_last_seen(a.id, 40)  # never backwards
    assert await store.accounts.presence_settings([a.id, "missing"]) == {a.id: ("nobody", 50)}


async def test_a_quick_reply_still_owes_read_receipts(store: Store) -> None:
    a, b = await user(store, "a12"), await user(store, "b12")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    await store.messages.send(send_req(c, da, "question"))
    reply = await store.messages.send(send_req(c, db, "answer"))  # before b acked seq 1
    receipts = [decode_event(d.raw) for d in reply.deliveries if d.device == da.id]
    assert [(r.kind, r.user, r.seq) for r in receipts if isinstance(r, Receipt)] == [
        ("read", b.id, 2)
    ]


async def test_the_sender_may_see_receipts_after_leaving(store: Store) -> None:
    a, b, m = await user(store, "a13"), await user(store, "b13"), await user(store, "m13")
    da = await device(store, a)
    await device(store, m)
    g = await chat(store, a, b, m)
    sent = await store.messages.send(send_req(g, da))
    await store.chats.change_members(g.id, g.version, [], [a.id], [b.id], a.id, T0)
    message, members = await store.messages.receipts(a.id, g.id, sent.message.id)
    assert message.id == sent.message.id and {x.user for x in members} == {b.id, m.id}
    outsider = await user(store, "o13")
    with pytest.raises(Forbidden):  # no existence leak for others
        await store.messages.receipts(outsider.id, g.id, sent.message.id)


async def test_an_inbox_page_stops_at_its_byte_budget(store: Store) -> None:
    a, b = await user(store, "a_pg"), await user(store, "b_pg")
    da, dbb = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    for i in range(6):
        await store.messages.send(send_req(c, da, str(i) * 1000))
    everything = await store.messages.read_inbox(dbb.id, 0, 100)
    sizes = [len(e.raw) for e in everything.entries]
    assert len(sizes) == 7  # the chat_update, then 6 messages of ~1 kB
    budget = sum(sizes[:3]) + 10  # fits three entries, not four
    page = await store.messages.read_inbox(dbb.id, 0, 100, max_bytes=budget)
    assert [e.iseq for e in page.entries] == [1, 2, 3]
    assert (page.head, page.acked) == (everything.head, everything.acked)
    tiny = await store.messages.read_inbox(dbb.id, 3, 100, max_bytes=1)  # one entry at least
    assert [e.iseq for e in tiny.entries] == [4]
    capped = await store.messages.read_inbox(dbb.id, 0, 2, max_bytes=10**9)  # limit still holds
    assert [e.iseq for e in capped.entries] == [1, 2]


async def test_a_message_nobody_receives_leaves_no_preview(store: Store) -> None:
    a, b = await user(store, "a_np"), await user(store, "b_np")  # b has no device yet
    da = await device(store, a)
    c = await chat(store, a, b, kind="direct")
    await store.messages.send(send_req(c, da, "secret for nobody"))
    (summary,) = await store.chats.list_chats(a.id)
    assert summary.last_preview is None and summary.last_seq == 1
    await device(store, b)
    await store.messages.send(send_req(c, da, "now bob has a phone"))
    (summary,) = await store.chats.list_chats(a.id)
    assert summary.last_preview == "now bob has a phone"


async def test_a_member_added_later_counts_as_having_seen_the_past(store: Store) -> None:
    a, b, n = await user(store, "a_late"), await user(store, "b_late"), await user(store, "n_late")
    da, dbb = await device(store, a), await device(store, b)
    g = await chat(store, a, b)
    sent = await store.messages.send(send_req(g, da))
    await store.messages.ack(dbb, 100, T0 + 5)  # b received it at T0 + 5
    await store.chats.change_members(g.id, g.version, [Member(user=n.id)], [], [], a.id, T0 + 7)
    _, members = await store.messages.receipts(a.id, g.id, sent.message.id)
    by_user = {m.user: (m.delivered_at, m.read_at) for m in members}
    assert by_user[b.id] == (T0 + 5, None)
    assert by_user[n.id] == (T0 + 7, T0 + 7)  # joined after it: seen as of joining


async def test_an_invite_is_spent_once_and_only_by_a_registration_that_succeeds(
    store: Store,
) -> None:
    await store.accounts.add_invites([b"code-1", b"code-old"], T0, T0 + 1000)
    taken = User(id=new_id(), username="inv_taken", created_at=T0)
    await store.accounts.create_user(taken, "hash")
    again = User(id=new_id(), username="inv_taken", created_at=T0)
    with pytest.raises(Conflict):  # a refused registration spends nothing
        await store.accounts.create_user(again, "hash", b"code-1", T0 + 1)
    first = User(id=new_id(), username="inv_first", created_at=T0)
    await store.accounts.create_user(first, "hash", b"code-1", T0 + 1)
    second = User(id=new_id(), username="inv_second", created_at=T0)
    with pytest.raises(Forbidden):  # spent
        await store.accounts.create_user(second, "hash", b"code-1", T0 + 2)
    with pytest.raises(Forbidden):  # expired
        await store.accounts.create_user(second, "hash", b"code-old", T0 + 1000)
    with pytest.raises(Forbidden):  # unknown
        await store.accounts.create_user(second, "hash", b"nope", T0 + 2)
    assert await store.accounts.credentials("inv_second") is None


async def test_count_chats_counts_memberships(store: Store) -> None:
    a, b, c = await user(store, "a_cnt"), await user(store, "b_cnt"), await user(store, "c_cnt")
    assert await store.chats.count_chats(a.id) == 0
    await chat(store, a, b)
    await chat(store, a, c)
    assert (await store.chats.count_chats(a.id), await store.chats.count_chats(b.id)) == (2, 1)
