"""`pigeon serve` on the DynamoDB store, configured as an operator would: environment variables
only (`PIGEON_STORE__TYPE=dynamodb`, the endpoint of a DynamoDB-compatible server, a table
prefix, `create_tables`), credentials from the AWS chain (here its environment variables).
The server is the session's moto server (tests/support/dynamodb.py), the tables are new."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pigeon.client import PigeonClient, login, register
from pigeon.domain.events import Message
from tests.conftest import PASSWORD, next_of
from tests.support.cluster import Node
from tests.support.dynamodb import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    MotoDynamo,
    fresh_prefix,
    make_db,
)


@pytest.fixture
async def node(tmp_path: Path, moto_dynamodb: MotoDynamo) -> AsyncIterator[tuple[Node, str]]:
    """A `pigeon serve` process on fresh DynamoDB tables (it creates them), and their prefix."""
    prefix = fresh_prefix()
    env = {
        "PIGEON_ARGON2_TIME_COST": "1",
        "PIGEON_ARGON2_MEMORY_KIB": "8",
        "PIGEON_STORE__TYPE": "dynamodb",
        "PIGEON_STORE__ENDPOINT_URL": moto_dynamodb.endpoint,
        "PIGEON_STORE__REGION": REGION,
        "PIGEON_STORE__TABLE_PREFIX": prefix,
        "PIGEON_STORE__CREATE_TABLES": "true",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    n = Node(env, tmp_path / "data")
    await n.start()
    yield n, prefix
    await n.close()


def _value(scrape: str, series: str) -> float:
    """The value of one series of a scrape (0 if absent)."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", scrape, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_serve_on_dynamodb_registers_and_delivers_over_a_websocket(
    node: tuple[Node, str], moto_dynamodb: MotoDynamo
) -> None:
    server, prefix = node
    await register(server.url, "alice", PASSWORD)
    bob_id = await register(server.url, "bob", PASSWORD)
    alice_acc = await login(server.url, "alice", PASSWORD)
    bob_acc = await login(server.url, "bob", PASSWORD)
    async with (
        PigeonClient(server.url, alice_acc.token) as alice,
        PigeonClient(server.url, bob_acc.token) as bob,
    ):
        chat = await alice.create_chat([bob_id])
        sent = await alice.send(chat["id"], "hello from dynamodb")
        got = await next_of(bob, Message, timeout=10)
    assert (got.id, got.seq, got.body) == (sent.id, 1, "hello from dynamodb")

    # the process made its tables here, under its prefix
    db = make_db(moto_dynamodb.endpoint, prefix, create_tables=False)
    await db.open()  # fails if a table or index is missing
    await db.aclose()

    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
        scrape = await resp.text()
    assert _value(scrape, 'pigeon_dynamodb_calls_total{op="transact_write_items"}') >= 2
    inbox_writes = 'pigeon_dynamodb_capacity_units_total{kind="write",table="inbox"}'
    assert _value(scrape, inbox_writes) > 0
    assert "pigeon_dynamodb_retries_total" in scrape
    assert "pigeon_dynamodb_throttled_total" in scrape
