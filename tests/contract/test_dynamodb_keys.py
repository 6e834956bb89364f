"""The `KeyStore` contract (tests/contract/test_keys.py) on the DynamoDB store's `DynamoKeys`,
against moto; and its claims and uploads racing on several nodes (`DynamoStore`s with their
own clients over the same tables), as test_keys.py races the SQL stores."""

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

test_identity_keys_are_published_once_and_never_change = (
    contract.test_identity_keys_are_published_once_and_never_change
)
test_keys_need_published_identity_keys_and_an_existing_device = (
    contract.test_keys_need_published_identity_keys_and_an_existing_device
)
test_one_time_keys_are_counted_capped_and_uploaded_idempotently = (
    contract.test_one_time_keys_are_counted_capped_and_uploaded_idempotently
)
test_a_claim_takes_one_time_keys_then_the_fallback_key = (
    contract.test_a_claim_takes_one_time_keys_then_the_fallback_key
)
test_a_fallback_only_claim_takes_no_one_time_key_and_tells_no_one = (
    contract.test_a_fallback_only_claim_takes_no_one_time_key_and_tells_no_one
)
test_keys_go_with_their_device = contract.test_keys_go_with_their_device
test_query_lists_devices_by_user_with_or_without_keys = (
    contract.test_query_lists_devices_by_user_with_or_without_keys
)
test_announcements_reach_chat_partners_and_own_devices_only = (
    contract.test_announcements_reach_chat_partners_and_own_devices_only
)
test_publishing_identity_keys_is_announced_with_them = (
    contract.test_publishing_identity_keys_is_announced_with_them
)
test_to_device_payloads_go_into_the_named_inboxes = (
    contract.test_to_device_payloads_go_into_the_named_inboxes
)
test_an_envelope_travels_and_is_erased_like_a_body = (
    contract.test_an_envelope_travels_and_is_erased_like_a_body
)


@pytest.fixture
async def nodes(moto_dynamodb: support.MotoDynamo, dynamo: DynamoDb) -> AsyncIterator[list[Store]]:
    """Three stores over the same tables, each with its own client: the nodes of a cluster."""
    dbs = [support.make_db(moto_dynamodb.endpoint, dynamo.prefix) for _ in range(contract.CLAIMERS)]
    for db in dbs:
        await db.open()
    yield [DynamoStore(db) for db in dbs]
    await asyncio.gather(*(db.aclose() for db in dbs))


test_concurrent_claimers_never_get_the_same_one_time_key = (
    contract.test_concurrent_claimers_never_get_the_same_one_time_key
)
test_concurrent_uploads_of_one_device_respect_the_cap = (
    contract.test_concurrent_uploads_of_one_device_respect_the_cap
)


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
