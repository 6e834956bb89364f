"""Contract of the AttachmentStore port (see its docstrings in pigeon.ports), for every adapter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pigeon.adapters.store.postgres import attachments as pg_attachments
from pigeon.adapters.store.sqlite import attachments as sqlite_attachments
from pigeon.domain.errors import NotFound, RateLimited
from pigeon.domain.ids import new_id
from pigeon.domain.media import AttachmentRecord
from pigeon.domain.models import Member, User
from pigeon.ports import Store
from tests.contract.test_store import T0, chat, device, user

DIGEST = "ab" * 32
HOUR = 3_600_000


def record(owner: User, at: int = T0, **fields: Any) -> AttachmentRecord:
    return AttachmentRecord(
        id=new_id(),
        owner=owner.id,
        content_type="image/png",
        size=1234,
        sha256=DIGEST,
        created_at=at,
        **fields,
    )


async def create(store: Store, owner: User, at: int = T0, **fields: Any) -> AttachmentRecord:
    rec = record(owner, at, **fields)
    await store.attachments.create(rec, max_per_window=1000, window_start=0)
    return rec


async def test_create_and_get_round_trip(store: Store) -> None:
    a = await user(store, "a")
    plain = await create(store, a)
    assert await store.attachments.get(plain.id) == plain
    got = await store.attachments.get(plain.id)
    assert got is not None and got.filename is None and got.encrypted is False
    assert got.uploaded_at is None and got.meta == {}
    rich = await create(
        store,
        a,
        filename="holiday photo.png",
        encrypted=True,
        meta={"width": 640, "thumbnail": None, "nested": {"list": [1, "two"]}},
    )
    assert await store.attachments.get(rich.id) == rich
    assert await store.attachments.get(new_id()) is None


async def test_quota_counts_the_owners_attachments_in_the_window(store: Store) -> None:
    a, b = await user(store, "a"), await user(store, "b")
    window_start = T0 + HOUR
    await create(store, a, at=window_start - 1)  # before the window: does not count
    await create(store, b, at=window_start + 5)  # another owner: does not count
    for i in range(3):
        rec = record(a, window_start + i)  # at the window's start counts
        await store.attachments.create(rec, max_per_window=3, window_start=window_start)
    refused = record(a, window_start + 10)
    with pytest.raises(RateLimited) as info:
        await store.attachments.create(refused, max_per_window=3, window_start=window_start)
    assert info.value.retry_after > 0
    assert await store.attachments.get(refused.id) is None
    # b still may, and so may a once the window moved past their oldest one in it
    await store.attachments.create(
        record(b, window_start + 10), max_per_window=3, window_start=window_start
    )
    later = record(a, window_start + 10)
    await store.attachments.create(later, max_per_window=3, window_start=window_start + 1)
    assert await store.attachments.get(later.id) == later


async def test_quota_is_atomic(store: Store) -> None:
    a = await user(store, "a")
    results = await asyncio.gather(
        *(
            store.attachments.create(record(a, T0 + i), max_per_window=4, window_start=T0)
            for i in range(10)
        ),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 4
    assert all(isinstance(r, RateLimited) for r in results if r is not None)


async def test_mark_uploaded_sets_uploaded_at_once_and_replaces_meta(store: Store) -> None:
    a = await user(store, "a")
    rec = await create(store, a, meta={"old": True, "kept": "no"})
    first = await store.attachments.mark_uploaded(rec.id, T0 + 10, {"width": 3, "height": 4})
    assert first is not None
    assert first.uploaded_at == T0 + 10 and first.meta == {"width": 3, "height": 4}
    assert first.id == rec.id and first.sha256 == rec.sha256 and first.created_at == T0
    second = await store.attachments.mark_uploaded(rec.id, T0 + 20, {"thumbnail": None})
    assert second is not None and second.uploaded_at == T0 + 10
    assert second.meta == {"thumbnail": None}
    assert await store.attachments.get(rec.id) == second
    assert await store.attachments.mark_uploaded(new_id(), T0, {}) is None


async def test_share_is_idempotent(store: Store) -> None:
    a, b = await user(store, "a"), await user(store, "b")
    c = await chat(store, a, b)
    rec = await create(store, a)
    await store.attachments.share(rec.id, c.id)
    await store.attachments.share(rec.id, c.id)
    assert await store.attachments.may_read(b.id, rec.id)
    with pytest.raises(NotFound):
        await store.attachments.share(new_id(), c.id)


async def test_may_read_follows_ownership_shares_and_membership(store: Store) -> None:
    owner, member, later, stranger = [await user(store, n) for n in ("o", "m", "l", "s")]
    g = await chat(store, owner, member)
    other = await chat(store, owner, stranger)
    rec = await create(store, owner)
    assert await store.attachments.may_read(owner.id, rec.id)
    assert not await store.attachments.may_read(member.id, rec.id)  # not shared yet
    await store.attachments.share(rec.id, g.id)
    assert await store.attachments.may_read(owner.id, rec.id)
    assert await store.attachments.may_read(member.id, rec.id)
    assert not await store.attachments.may_read(stranger.id, rec.id)  # shares another chat
    assert not await store.attachments.may_read(later.id, rec.id)
    assert not await store.attachments.may_read(member.id, other.id)  # not an attachment
    assert not await store.attachments.may_read(member.id, new_id())
    # membership changes apply at once: a removed member loses access, an added one gains it
    g, _ = await store.chats.change_members(
        g.id, g.version, [Member(user=later.id)], [member.id], [], owner.id, T0 + 1
    )
    assert not await store.attachments.may_read(member.id, rec.id)
    assert await store.attachments.may_read(later.id, rec.id)
    # the owner keeps access even after leaving the chat it was shared into
    await store.chats.change_members(g.id, g.version, [], [owner.id], [], owner.id, T0 + 2)
    assert await store.attachments.may_read(owner.id, rec.id)


async def test_revoking_a_device_changes_nothing(store: Store) -> None:
    a, b = await user(store, "a"), await user(store, "b")
    da = await device(store, a)
    await device(store, b)
    c = await chat(store, a, b)
    rec = await create(store, a)
    await store.attachments.share(rec.id, c.id)
    assert await store.accounts.revoke_device(a.id, da.id)
    assert await store.attachments.get(rec.id) == rec
    assert await store.attachments.may_read(a.id, rec.id)
    assert await store.attachments.may_read(b.id, rec.id)


async def test_sweep_by_retention_and_by_never_shared_age(store: Store) -> None:
    a, b = await user(store, "a"), await user(store, "b")
    c = await chat(store, a, b)
    before, unshared_before = T0 + 10 * HOUR, T0 + 20 * HOUR
    expired_shared = await create(store, a, at=before - 1)
    expired_unshared = await create(store, a, at=T0)
    await store.attachments.share(expired_shared.id, c.id)
    abandoned = await create(store, a, at=unshared_before - 1)
    in_use = await create(store, a, at=before + 1)
    await store.attachments.share(in_use.id, c.id)
    fresh = await create(store, a, at=unshared_before)  # not yet old enough to be abandoned
    at_cut_off = await create(store, a, at=before)
    await store.attachments.share(at_cut_off.id, c.id)

    swept = await store.attachments.sweep(before, unshared_before)
    assert sorted(swept) == sorted([expired_shared.id, expired_unshared.id, abandoned.id])
    for gone in (expired_shared, expired_unshared, abandoned):
        assert await store.attachments.get(gone.id) is None
        assert not await store.attachments.may_read(b.id, gone.id)
    for kept in (in_use, fresh, at_cut_off):
        assert await store.attachments.get(kept.id) == kept
    assert await store.attachments.may_read(b.id, in_use.id)
    assert await store.attachments.sweep(before, unshared_before) == []
    # the share rows went with their attachments: the id can be shared again after re-creation
    again = AttachmentRecord(**{**_fields(expired_shared), "created_at": T0 + 30 * HOUR})
    await store.attachments.create(again, max_per_window=1000, window_start=0)
    assert not await store.attachments.may_read(b.id, again.id)


async def test_sweep_works_through_many_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (sqlite_attachments, pg_attachments):
        monkeypatch.setattr(module, "SWEEP_CHUNK", 4)
    a, b = await user(store, "a"), await user(store, "b")
    c = await chat(store, a, b)
    # several per millisecond (the cursor breaks ties by id), shared and not interleaved
    records = [record(a, T0 + i // 3) for i in range(30)]
    for rec in records:
        await store.attachments.create(rec, max_per_window=100, window_start=0)
    shared = [r.id for i, r in enumerate(records) if i % 5 in (1, 2)]
    unshared = [r.id for r in records if r.id not in shared]
    for attachment_id in shared:
        await store.attachments.share(attachment_id, c.id)
    assert sorted(await store.attachments.sweep(T0, T0 + 100)) == sorted(unshared)
    assert all([await store.attachments.may_read(b.id, s) for s in shared])
    assert sorted(await store.attachments.sweep(T0 + 100, T0)) == sorted(shared)


def _fields(rec: AttachmentRecord) -> dict[str, Any]:
    return {f: getattr(rec, f) for f in rec.__struct_fields__}
