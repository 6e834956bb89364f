"""The real `pigeon serve` process: crash safety (SIGKILL) and graceful shutdown (SIGTERM)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pigeon.client import PigeonClient, login, register
from pigeon.domain.events import Message
from tests.conftest import PASSWORD, next_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A `pigeon serve` subprocess on its own port and data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            "PIGEON_ARGON2_TIME_COST": "1",
            "PIGEON_ARGON2_MEMORY_KIB": "8",
            "PIGEON_STORE__SYNCHRONOUS": "FULL",
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pigeon.cli",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as http, asyncio.timeout(20):
            while True:
                try:
                    async with http.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)  # polling a starting process; no event to wait on

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 20)


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[Process]:
    p = Process(tmp_path / "data")
    await p.start()
    yield p
    if p.proc is not None and p.proc.returncode is None:
        p.proc.kill()
        await p.proc.wait()


async def test_message_survives_sigkill_right_after_sent(process: Process) -> None:
    await register(process.url, "alice", PASSWORD)
    bob_id = await register(process.url, "bob", PASSWORD)
    alice_acc = await login(process.url, "alice", PASSWORD)
    bob_acc = await login(process.url, "bob", PASSWORD)
    alice = PigeonClient(process.url, alice_acc.token, reconnect=False)
    await alice.connect()
    chat = await alice.create_chat([bob_id])
    sent = [await alice.send(chat["id"], f"durable {i}") for i in range(5)]
    await process.signal(signal.SIGKILL)  # no chance to flush anything
    await alice.close()

    await process.start()
    async with PigeonClient(process.url, bob_acc.token) as bob:
        got = [await next_of(bob, Message, timeout=10) for _ in range(5)]
    assert [m.id for m in got] == [s.id for s in sent]


async def test_sigterm_closes_clients_with_going_away_and_exits_cleanly(process: Process) -> None:
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
