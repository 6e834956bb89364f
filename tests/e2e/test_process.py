"""The real `pigeon serve` process: crash safety (SIGKILL) and graceful shutdown (SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pigeon.client import PigeonClient, login, register
from pigeon.domain.events import Message
from tests.conftest import PASSWORD, next_of
from tests.support.cluster import Node


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[Node]:
    """A `pigeon serve` subprocess on the embedded store, fsync on every group commit."""
    env = {
        "PIGEON_ARGON2_TIME_COST": "1",
        "PIGEON_ARGON2_MEMORY_KIB": "8",
        "PIGEON_STORE__SYNCHRONOUS": "FULL",
    }
    node = Node(env, tmp_path / "data")
    await node.start()
    yield node
    await node.close()


async def test_message_survives_sigkill_right_after_sent(process: Node) -> None:
    await register(process.url, "alice", PASSWORD)
    bob_id = await register(process.url, "bob", PASSWORD)
    alice_acc = await login(process.url, "alice", PASSWORD)
    bob_acc = await login(process.url, "bob", PASSWORD)
    alice = PigeonClient(process.url, alice_acc.token, reconnect=False)
    await alice.connect()
    chat = await alice.create_chat([bob_id])
    sent = [await alice.send(chat["id"], f"durable {i}") for i in range(5)]
    process.kill()  # no chance to flush anything
    assert process.proc is not None
    await process.proc.wait()
    await alice.close()

    await process.start()
    async with PigeonClient(process.url, bob_acc.token) as bob:
        got = [await next_of(bob, Message, timeout=10) for _ in range(5)]
    assert [m.id for m in got] == [s.id for s in sent]


async def test_sigterm_closes_clients_with_going_away_and_exits_cleanly(process: Node) -> None:
    await register(process.url, "carol", PASSWORD)
    account = await login(process.url, "carol", PASSWORD)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            f"{process.url}/v1/ws", headers={"Authorization": f"Bearer {account.token}"}
        )
        assert process.proc is not None
        process.proc.send_signal(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        await ws.close()
    assert await asyncio.wait_for(process.proc.wait(), 20) == 0
