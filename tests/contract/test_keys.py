"""Contract of the KeyStore port (device keys, claims, device-list announcements, to-device
messages), for every store adapter; and claims racing on several stores over one database."""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from pigeon.adapters.store.postgres import PostgresStore
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.domain.errors import BadRequest, Conflict, NotFound, TooManyKeys
from pigeon.domain.events import Delivery, DeviceList, KeysExhausted, ToDevice, decode_event
from pigeon.domain.keys import DeviceIdentity, E2EEnvelope, OneTimeKey
from pigeon.domain.models import Device, User
from pigeon.ports import Store
from tests.contract.test_store import T0, chat, device, send_req, user
from tests.support.postgres import empty_database

_serial = itertools.count(1)


def b64(size: int) -> str:
    """A distinct base64 value of `size` bytes (vodozemac's unpadded form)."""
    n = next(_serial)
    return base64.b64encode(n.to_bytes(8, "big") * (size // 8)).decode().rstrip("=")


def identity() -> DeviceIdentity:
    return DeviceIdentity(curve25519=b64(32), ed25519=b64(32), bundle="{}", signature=b64(64))


def otk(key_id: str) -> OneTimeKey:
    return OneTimeKey(id=key_id, key=b64(32), signature=b64(64))


async def published(store: Store, u: User, n: int = 0, fallback: bool = False) -> Device:
    """A device of `u` with identity keys, `n` one-time keys and maybe a fallback key."""
    d = await device(store, u)
    keys = [otk(f"k{i:03}") for i in range(n)]
    await store.keys.upload(d, identity(), keys, otk("fb") if fallback else None, 100, T0)
    return d


async def events(store: Store, d: Device) -> list[object]:
    page = await store.messages.read_inbox(d.id, 0, 1000)
    return [decode_event(e.raw) for e in page.entries]


async def test_identity_keys_are_published_once_and_never_change(store: Store) -> None:
    u = await user(store, "alice")
    d = await device(store, u)
    mine = identity()
    counts, _ = await store.keys.upload(d, mine, [], None, 100, T0)
    assert (counts.one_time_keys, counts.fallback_key, counts.fallback_used) == (0, False, False)
    await store.keys.upload(d, mine, [], None, 100, T0)  # the same again: harmless
    with pytest.raises(Conflict):
        await store.keys.upload(d, identity(), [], None, 100, T0)
    (listed,) = await store.keys.query([u.id])
    assert (listed.user, listed.device, listed.identity) == (u.id, d.id, mine)


async def test_keys_need_published_identity_keys_and_an_existing_device(store: Store) -> None:
    u = await user(store, "alice")
    d = await device(store, u)
    with pytest.raises(BadRequest):
        await store.keys.upload(d, None, [otk("a")], None, 100, T0)
    with pytest.raises(BadRequest):
        await store.keys.upload(d, None, [], otk("fb"), 100, T0)
    gone = Device(id=d.id[:-4] + "ZZZZ", user_id=u.id, name="x", created_at=T0)
    with pytest.raises(NotFound):
        await store.keys.upload(gone, identity(), [], None, 100, T0)
    assert (await store.keys.counts(d.id)).one_time_keys == 0


async def test_one_time_keys_are_counted_capped_and_uploaded_idempotently(store: Store) -> None:
    u = await user(store, "alice")
    d = await published(store, u, n=3)
    counts, _ = await store.keys.upload(d, None, [otk("k000"), otk("k100")], None, 5, T0)
    assert counts.one_time_keys == 4  # k000 was held already
    with pytest.raises(TooManyKeys):
        await store.keys.upload(d, None, [otk("x1"), otk("x2")], None, 5, T0)
    assert (await store.keys.counts(d.id)).one_time_keys == 4  # nothing of it was kept
    counts, _ = await store.keys.upload(d, None, [], otk("fb"), 5, T0)
    assert (counts.fallback_key, counts.fallback_used) == (True, False)


async def test_a_claim_takes_one_time_keys_then_the_fallback_key(store: Store) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    bob = await published(store, b, n=2, fallback=True)
    bare = await device(store, b)  # no keys at all
    gone = bare.id[:-4] + "ZZZZ"
    first, told = await store.keys.claim([bob.id, bare.id, gone], T0)
    second, _ = await store.keys.claim([bob.id], T0)
    assert told == []
    assert [(k.device, k.id, k.fallback) for k in first + second] == [
        (bob.id, "k000", False),
        (bob.id, "k001", False),
    ]
    assert first[0].user == b.id
    counts = await store.keys.counts(bob.id)
    assert (counts.one_time_keys, counts.fallback_used) == (0, False)
    third, told = await store.keys.claim([bob.id], T0 + 1)
    fourth, again = await store.keys.claim([bob.id], T0 + 2)
    assert [(k.id, k.fallback) for k in third + fourth] == [("fb", True), ("fb", True)]
    assert (await store.keys.counts(bob.id)).fallback_used
    # the device is told once that its one-time keys ran out
    assert [d.device for d in told] == [bob.id] and again == []
    assert await events(store, bob) == [KeysExhausted(at=T0 + 1)]
    await store.keys.upload(bob, None, [], otk("fb2"), 100, T0)  # a new fallback key
    assert not (await store.keys.counts(bob.id)).fallback_used
    _, told = await store.keys.claim([bob.id], T0 + 3)  # the new one, used: told again
    assert [d.device for d in told] == [bob.id]
    assert await store.keys.owners([bob.id, gone]) == {bob.id: b.id}
    del a


async def test_a_fallback_only_claim_takes_no_one_time_key_and_tells_no_one(
    store: Store,
) -> None:
    b, c = await user(store, "bob"), await user(store, "carol")
    bob = await published(store, b, n=2, fallback=True)
    carol = await published(store, c, n=2, fallback=True)
    bare = await published(store, c, n=2)  # one-time keys, no fallback key
    claimed, told = await store.keys.claim(
        [bob.id, carol.id, bare.id], T0, fallback_only=frozenset({bob.id, bare.id})
    )
    # bob's fallback key, carol's first one-time key; the device without one is left out
    assert [(k.user, k.device, k.id, k.fallback) for k in claimed] == [
        (b.id, bob.id, "fb", True),
        (c.id, carol.id, "k000", False),
    ]
    assert told == []
    counts = await store.keys.counts(bob.id)  # nothing taken, not marked used
    assert (counts.one_time_keys, counts.fallback_key, counts.fallback_used) == (2, True, False)
    assert (await store.keys.counts(bare.id)).one_time_keys == 2
    again, _ = await store.keys.claim([bob.id], T0, fallback_only=frozenset({bob.id}))
    assert [(k.id, k.fallback) for k in again] == [("fb", True)]  # as often as asked
    # everyone else still gets one-time keys, and when they run out the device is told once
    first, _ = await store.keys.claim([bob.id], T0)
    second, _ = await store.keys.claim([bob.id], T0)
    assert [(k.id, k.fallback) for k in first + second] == [("k000", False), ("k001", False)]
    last, told = await store.keys.claim([bob.id], T0 + 1)
    assert [(k.id, k.fallback) for k in last] == [("fb", True)]
    assert [d.device for d in told] == [bob.id]
    assert await events(store, bob) == [KeysExhausted(at=T0 + 1)]


async def test_keys_go_with_their_device(store: Store) -> None:
    u = await user(store, "alice")
    d = await published(store, u, n=2, fallback=True)
    other = await device(store, u)
    assert await store.accounts.revoke_device(u.id, d.id)
    assert await store.keys.claim([d.id], T0) == ([], [])
    assert [k.device for k in await store.keys.query([u.id])] == [other.id]
    counts = await store.keys.counts(d.id)
    assert (counts.one_time_keys, counts.fallback_key) == (0, False)


async def test_query_lists_devices_by_user_with_or_without_keys(store: Store) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    a1 = await published(store, a)
    a2 = await device(store, a)
    b1 = await published(store, b)
    listed = await store.keys.query([b.id, a.id, "01ARZ3NDEKTSV4RRFFQ69G5FAV"])
    # by user in the order asked, then oldest device first (same time: by id)
    assert [(k.user, k.device, k.identity is None) for k in listed] == [
        (b.id, b1.id, False),
        *sorted([(a.id, a1.id, False), (a.id, a2.id, True)]),
    ]


async def test_announcements_reach_chat_partners_and_own_devices_only(store: Store) -> None:
    a, b, c, stranger = [await user(store, n) for n in ("alice", "bob", "carol", "eve")]
    a1, a2 = await device(store, a), await device(store, a)
    b1, c1, s1 = await device(store, b), await device(store, c), await device(store, stranger)
    await chat(store, a, b, kind="direct")
    await chat(store, a, b, c)
    before = {d.id: len(await events(store, d)) for d in (a1, a2, b1, c1, s1)}
    deliveries = await store.keys.announce(a.id, a1.id, "removed", T0 + 5)
    assert sorted(d.device for d in deliveries) == sorted([a2.id, b1.id, c1.id])  # once each
    for d in (a2, b1, c1):
        (event,) = (await events(store, d))[before[d.id] :]
        assert event == DeviceList(user=a.id, device=a1.id, change="removed", at=T0 + 5)
    assert len(await events(store, a1)) == before[a1.id]
    assert len(await events(store, s1)) == before[s1.id]


async def test_publishing_identity_keys_is_announced_with_them(store: Store) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    b1 = await device(store, b)
    await chat(store, a, b, kind="direct")
    a1 = await device(store, a)
    _, deliveries = await store.keys.upload(a1, identity(), [], None, 100, T0 + 7)
    assert [d.device for d in deliveries] == [b1.id]
    assert (await events(store, b1))[-1] == DeviceList(
        user=a.id, device=a1.id, change="keys", at=T0 + 7
    )
    _, again = await store.keys.upload(a1, None, [otk("k")], None, 100, T0 + 8)
    assert again == []


async def test_to_device_payloads_go_into_the_named_inboxes(store: Store) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    a1, b1, b2 = await device(store, a), await device(store, b), await device(store, b)
    gone = b2.id[:-4] + "ZZZZ"
    deliveries = await store.keys.to_device(
        a1, [(b1.id, "for b1"), (gone, "lost"), (b2.id, "for b2")], T0 + 9
    )
    assert sorted((d.device, d.iseq) for d in deliveries) == sorted([(b1.id, 1), (b2.id, 1)])
    for d, payload in ((b1, "for b1"), (b2, "for b2")):
        (event,) = await events(store, d)
        assert event == ToDevice(sender=a.id, sender_device=a1.id, payload=payload, at=T0 + 9)
    assert not await store.messages.ack(b1, 1, T0 + 10)  # acked like any entry, no receipt
    assert await events(store, b1) == []


# -- claims racing on several stores over one database ------------------------------------

KEYS = 40
CLAIMERS = 3
CLAIMS_EACH = 20  # 60 claims for 40 keys: 20 must get the fallback key


@pytest.fixture(params=["sqlite", "postgres"])
async def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[Store]]:
    """Stores on one database, as the processes of `--workers N` (SQLite) or the nodes of a
    cluster (PostgreSQL) have: each with its own connections (and SQLite writer thread)."""
    stores: list[Store]
    if request.param == "sqlite":
        stores = [SqliteStore(tmp_path / "race.db", synchronous="NORMAL") for _ in range(CLAIMERS)]
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        stores = [PostgresStore(dsn, min_connections=1, max_connections=8) for _ in range(CLAIMERS)]
    for s in stores:  # one after the other: the first one migrates
        await s.open()
    if request.param == "postgres":
        await empty_database(dsn)
    yield stores
    await asyncio.gather(*(s.aclose() for s in stores))


async def test_concurrent_claimers_never_get_the_same_one_time_key(nodes: list[Store]) -> None:
    setup = nodes[0]
    b = await user(setup, "bob")
    bob = await published(setup, b, n=KEYS, fallback=True)
    start = asyncio.Event()
    told: list[Delivery] = []

    async def claimer(node: Store) -> list[tuple[str, bool]]:
        await start.wait()
        claims = await asyncio.gather(*(node.keys.claim([bob.id], T0) for _ in range(CLAIMS_EACH)))
        told.extend(d for _, deliveries in claims for d in deliveries)
        return [(k.id, k.fallback) for claimed, _ in claims for k in claimed]

    racing = [asyncio.create_task(claimer(node)) for node in nodes]
    start.set()
    taken = [k for got in await asyncio.gather(*racing) for k in got]
    one_time = [key_id for key_id, fallback in taken if not fallback]
    assert len(taken) == CLAIMERS * CLAIMS_EACH  # every claim got a key
    assert sorted(one_time) == [f"k{i:03}" for i in range(KEYS)]  # each key exactly once
    assert [k for k in taken if k[1]] == [("fb", True)] * (CLAIMERS * CLAIMS_EACH - KEYS)
    assert (await setup.keys.counts(bob.id)).one_time_keys == 0
    assert len(told) == 1  # the fallback key's first hand-out, told once whoever won


async def test_concurrent_uploads_of_one_device_respect_the_cap(nodes: list[Store]) -> None:
    """Uploads of one device on several nodes at once: the cap counts every upload's keys,
    not only those of its own transaction."""
    d = await published(nodes[0], await user(nodes[0], "alice"))
    start = asyncio.Event()

    async def upload(i: int, node: Store) -> bool:
        await start.wait()
        keys = [otk(f"n{i}-{k:02}") for k in range(40)]
        try:
            await node.keys.upload(d, None, keys, None, 100, T0)
        except TooManyKeys:
            return False
        return True

    racing = [asyncio.create_task(upload(i, node)) for i, node in enumerate(nodes)]
    start.set()
    accepted = sum(await asyncio.gather(*racing))
    held = (await nodes[0].keys.counts(d.id)).one_time_keys
    assert held == 40 * accepted <= 100
    assert accepted == 2  # two uploads of 40 fit under 100, a third would not


# -- encrypted messages: the envelope is stored, delivered and erased as a body is --------


async def test_an_envelope_travels_and_is_erased_like_a_body(store: Store) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    a1, b1 = await device(store, a), await device(store, b)
    c = await chat(store, a, b, kind="direct")
    sealed = E2EEnvelope(
        algorithm="m.megolm.v1.aes-sha2", sender_key=b64(32), session_id="s1", ciphertext=b64(96)
    )
    req = msgspec.structs.replace(send_req(c, a1, "unused"), body=None, preview=None, e2e=sealed)
    result = await store.messages.send(req)
    assert result.message.e2e == sealed and result.message.body is None
    (delivery,) = result.deliveries
    assert decode_event(delivery.raw) == result.message
    page = await store.messages.read_inbox(b1.id, 0, 100)
    assert decode_event(page.entries[-1].raw) == result.message
    counts = await store.chats.store_counts()
    assert counts.bodies == 1
    await store.messages.ack(b1, page.entries[-1].iseq, T0 + 5)
    assert (await store.chats.store_counts()).bodies == 0  # erased with the body's rules
