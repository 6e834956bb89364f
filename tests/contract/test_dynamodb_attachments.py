"""What only the DynamoDB store's `DynamoAttachments` does, against moto (the
`AttachmentStore` contract itself runs on this store through tests/contract/conftest.py)."""

from __future__ import annotations

import pytest

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.adapters.store.dynamodb.codec import key
from pigeon.adapters.store.dynamodb.tables import CHATS
from pigeon.domain.errors import NotFound
from pigeon.domain.ids import new_id
from tests.contract.test_attachments import HOUR, create
from tests.contract.test_store import T0, user
from tests.support import dynamodb as support

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo
store = support.store


async def members(store: DynamoStore, chat_id: str, *user_ids: str) -> None:
    """Member items of a chat, as the chats sub-store keeps them."""
    await store.db.batch_write(CHATS, [key(f"C#{chat_id}", f"M#{u}") for u in user_ids])


async def test_shares_and_membership_decide_who_may_read(store: DynamoStore) -> None:
    owner, member, stranger = [await user(store, n) for n in ("o", "m", "s")]  # type: ignore[arg-type]
    chat, other = new_id(), new_id()
    await members(store, chat, owner.id, member.id)
    await members(store, other, owner.id, stranger.id)
    rec = await create(store, owner)  # type: ignore[arg-type]
    assert await store.attachments.may_read(owner.id, rec.id)
    assert not await store.attachments.may_read(member.id, rec.id)  # not shared yet
    await store.attachments.share(rec.id, chat)
    await store.attachments.share(rec.id, chat)  # idempotent
    assert await store.attachments.may_read(member.id, rec.id)
    assert not await store.attachments.may_read(stranger.id, rec.id)
    assert not await store.attachments.may_read(member.id, new_id())
    with pytest.raises(NotFound):
        await store.attachments.share(new_id(), chat)
    await store.db.batch_write(CHATS, deletes=[key(f"C#{chat}", f"M#{member.id}")])  # left
    assert not await store.attachments.may_read(member.id, rec.id)


async def test_sweep_by_retention_and_by_never_shared_age(store: DynamoStore) -> None:
    a, b = await user(store, "a"), await user(store, "b")  # type: ignore[arg-type]
    chat = new_id()
    await members(store, chat, a.id, b.id)
    before, unshared_before = T0 + 10 * HOUR, T0 + 20 * HOUR
    expired_shared = await create(store, a, at=before - 1)  # type: ignore[arg-type]
    expired_unshared = await create(store, a, at=T0)  # type: ignore[arg-type]
    await store.attachments.share(expired_shared.id, chat)
    abandoned = await create(store, a, at=unshared_before - 1)  # type: ignore[arg-type]
    in_use = await create(store, a, at=before + 1)  # type: ignore[arg-type]
    await store.attachments.share(in_use.id, chat)
    fresh = await create(store, a, at=unshared_before)  # type: ignore[arg-type]
    swept = await store.attachments.sweep(before, unshared_before)
    assert sorted(swept) == sorted([expired_shared.id, expired_unshared.id, abandoned.id])
    for gone in (expired_shared, expired_unshared, abandoned):
        assert await store.attachments.get(gone.id) is None
    for kept in (in_use, fresh):
        assert await store.attachments.get(kept.id) == kept
    assert await store.attachments.may_read(b.id, in_use.id)
    assert await store.attachments.sweep(before, unshared_before) == []
    # the shares went with their record: a record made again under that id is not shared
    await store.attachments.create(expired_shared, max_per_window=1000, window_start=0)
    assert not await store.attachments.may_read(b.id, expired_shared.id)
