"""The `AccountStore` contract (tests/contract/test_store.py, test_admin_store.py) on the
DynamoDB store's `DynamoAccounts`, against moto; and what only this store does (the copies of
`disabled_at` on token and device items, what a revocation leaves behind)."""

from __future__ import annotations

from tests.contract.test_admin_store import (
    test_accounts_are_listed_in_name_order_in_pages,
    test_device_status_of_a_revoked_or_unknown_device_is_none,
    test_disabling_keeps_the_first_time_and_enabling_clears_it,
    test_invites_are_listed_by_batch_without_spent_or_expired_ones,
)
from tests.contract.test_store import (
    test_an_invite_is_spent_once_and_only_by_a_registration_that_succeeds,
    test_device_limit_is_atomic,
    test_token_lookup_and_revocation,
    test_usernames_are_unique_case_insensitively,
)
from tests.support import dynamodb as support

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo
store = support.store

__all__ = [
    "test_accounts_are_listed_in_name_order_in_pages",
    "test_an_invite_is_spent_once_and_only_by_a_registration_that_succeeds",
    "test_device_limit_is_atomic",
    "test_device_status_of_a_revoked_or_unknown_device_is_none",
    "test_disabling_keeps_the_first_time_and_enabling_clears_it",
    "test_invites_are_listed_by_batch_without_spent_or_expired_ones",
    "test_token_lookup_and_revocation",
    "test_usernames_are_unique_case_insensitively",
]
