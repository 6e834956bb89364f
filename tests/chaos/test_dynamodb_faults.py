"""Fault tests under steady load with the DynamoDB store (the tests' moto server, reached over
HTTP by every node) and Redis: a node SIGKILLed behind HAProxy, in the middle of its chunked
commits; and DynamoDB refusing the message path's writes for a while (throttling), which the
nodes must ride out with retries and `unavailable` answers, never with a lost or half-shown
message. Each asserts zero acked-message loss, zero order violations in every chat and no
duplicate surfaced by the SDK (tests.support.traffic), as the PostgreSQL fault suite does."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.conftest import StartNodes, kill_one_behind_haproxy, make_pairs
from tests.support.cluster import dynamodb_cluster_env
from tests.support.dynamodb import ACCESS_KEY, REGION, SECRET_KEY, FaultProxy, fresh_prefix
from tests.support.traffic import Traffic

pytestmark = [pytest.mark.slow, pytest.mark.dynamodb_pass]


def _env(endpoint: str, redis_url: str, **extra: str) -> dict[str, str]:
    """A node on DynamoDB at `endpoint` (tables of this test's own) and the shared Redis."""
    return {
        **dynamodb_cluster_env(endpoint, fresh_prefix(), redis_url),
        "PIGEON_STORE__REGION": REGION,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "PIGEON_STORE__BACKOFF_BASE": "0.01",
        "PIGEON_STORE__BACKOFF_CAP": "0.1",
        **extra,
    }


async def test_sigkill_one_of_three_dynamodb_nodes_behind_haproxy(
    fault_proxy: FaultProxy, redis_url: str, start_nodes: StartNodes, clients: list[Any]
) -> None:
    env = _env(fault_proxy.url, redis_url)
    # The first node creates the tables; the others then find them.
    first = await start_nodes(1, env)
    nodes = first + await start_nodes(2, env)
    # the node killed may have had sends between their chunks, or a commit record pending
    await kill_one_behind_haproxy(nodes, clients, pairs=6, acked=60)


async def test_dynamodb_throttling_the_message_path_loses_nothing(
    fault_proxy: FaultProxy, redis_url: str, start_nodes: StartNodes, clients: list[Any]
) -> None:
    # Few attempts, so that some sends exhaust them and fail with `unavailable`: the SDK
    # retries those (same cmid), and the store must neither lose nor duplicate them.
    env = _env(fault_proxy.url, redis_url, PIGEON_STORE__MAX_ATTEMPTS="3")
    n1, n2 = await start_nodes(2, env)
    traffic = Traffic(await make_pairs(clients, 6, n1.url, n2.url))
    traffic.start()
    await traffic.wait_acked(60)
    before = dict(fault_proxy.seen)
    injected = {"TransactWriteItems": 40, "UpdateItem": 40, "Query": 20}
    for op, times in injected.items():
        code = "ThrottlingException" if op == "Query" else "ProvisionedThroughputExceededException"
        fault_proxy.fail(op, code, times=times)
    await traffic.wait_acked(120)  # through the throttling and after it
    await traffic.finish()
    # every injected failure was answered, and calls of each kind succeeded after them
    for op, times in injected.items():
        assert fault_proxy.seen[op] - before.get(op, 0) > times, op
