"""The DynamoDB store's `DynamoKeys` against moto: claims and uploads racing on several nodes
(`DynamoStore`s with their own clients over the same tables), as test_keys.py races the SQL
stores. The `KeyStore` contract itself runs on this store through tests/contract/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.adapters.store.dynamodb.db import DynamoDb
from pigeon.domain.errors import BadRequest
from pigeon.ports import Store
from tests.contract import test_keys as contract
from tests.contract.test_keys import otk, published
from tests.contract.test_store import T0, user
from tests.support import dynamodb as support

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo
store = support.store


@pytest.fixture
async def nodes(moto_dynamodb: support.MotoDynamo, dynamo: DynamoDb) -> AsyncIterator[list[Store]]:
    """Three stores over the same tables, each with its own client: the nodes of a cluster."""
    dbs = [support.make_db(moto_dynamodb.endpoint, dynamo.prefix) for _ in range(contract.CLAIMERS)]
    for db in dbs:
        await db.open()
    yield [DynamoStore(db) for db in dbs]
    await asyncio.gather(*(db.aclose() for db in dbs))


async def test_an_upload_holds_at_most_one_transaction_of_keys(store: Store) -> None:
    """Atomic uploads fit one transaction: more new keys than that are refused, whole."""
    d = await published(store, await user(store, "alice"))
    with pytest.raises(BadRequest):
        await store.keys.upload(d, None, [otk(f"x{i:03}") for i in range(97)], None, 200, T0)
    assert (await store.keys.counts(d.id)).one_time_keys == 0
    counts, _ = await store.keys.upload(
        d, None, [otk(f"x{i:03}") for i in range(96)], None, 200, T0
    )
    assert counts.one_time_keys == 96
