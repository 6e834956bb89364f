"""What only the DynamoDB store's `DynamoChats` does, against moto (a group over one
transaction, races on one version and one pair). The `ChatStore` contract itself runs on this
store through tests/contract/conftest.py (`ADAPTERS`)."""

from __future__ import annotations

import asyncio

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.domain.errors import Conflict
from pigeon.domain.events import ChatUpdate
from pigeon.domain.models import Member
from tests.contract import test_store as contract
from tests.contract.test_store import T0
from tests.support import dynamodb as support

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo
store = support.store


async def test_concurrent_membership_changes_at_one_version_let_one_win(
    store: DynamoStore,
) -> None:
    a, b = await contract.user(store, "cas_a"), await contract.user(store, "cas_b")
    newcomers = [await contract.user(store, f"cas_n{i}") for i in range(4)]
    g = await contract.chat(store, a, b)
    results = await asyncio.gather(
        *(
            store.chats.change_members(g.id, g.version, [Member(user=n.id)], [], [], a.id, T0)
            for n in newcomers
        ),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    assert len(won) == 1 and all(isinstance(r, Conflict) for r in results if r not in won)
    after = await store.chats.get_chat(g.id)
    assert after is not None and after.version == g.version + 1
    assert after.members == won[0][0].members and len(after.members) == 3


async def test_concurrent_direct_chats_of_one_pair_are_one_chat(store: DynamoStore) -> None:
    a, b = await contract.user(store, "dir_a"), await contract.user(store, "dir_b")
    created = await asyncio.gather(
        *(contract.chat(store, *pair, kind="direct") for pair in [(a, b), (b, a)] * 3)
    )
    assert len({c.id for c in created}) == 1
    assert await store.chats.count_chats(a.id) == 1


async def test_a_group_larger_than_a_transaction_appears_whole(store: DynamoStore) -> None:
    """Over 99 members, the chat item is written pending, its members after it, and it
    appears with its `ChatUpdate` (the transaction that removes `st`)."""
    users = await asyncio.gather(*(contract.user(store, f"big{i}") for i in range(101)))
    d = await contract.device(store, users[0])
    g = await contract.chat(store, *users)
    found = await store.chats.get_chat(g.id)
    assert found == g and await store.chats.count_chats(users[100].id) == 1
    (update,) = [e for _, e in await contract.events(store, d)]
    assert isinstance(update, ChatUpdate) and len(update.added) == 101
