"""`/healthz` (liveness) and `/readyz` (readiness) of a running server, and the protocol version
both carry. The readiness of a node whose backends fail is tested per adapter in
tests/contract/test_ping.py and behind HAProxy in tests/chaos/test_readiness.py; here, the
embedded store's writer gets stuck for real (another connection holds the database's lock)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from typing import Any

import aiohttp
import pytest

from pigeon.gateway.http import READY
from pigeon.gateway.keys import SETTINGS
from pigeon.gateway.protocol import PROTOCOL_VERSION
from tests.conftest import PASSWORD, STACK, Server, ServerFactory


async def get(server: Server, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}{path}") as resp:
        return resp.status, await resp.json()


async def test_a_working_server_is_alive_and_ready(server: Server) -> None:
    status, health = await get(server, "/healthz")
    assert (status, health["status"], health["protocol"]) == (200, "ok", PROTOCOL_VERSION)
    status, ready = await get(server, "/readyz")
    assert (status, ready) == (200, {"status": "ready", "protocol": 1, "pid": os.getpid()})


async def test_neither_while_shutting_down(server: Server) -> None:
    server.app[READY]["ready"] = False  # what SIGTERM does first (app.py, _close_connections)
    try:
        for path in ("/healthz", "/readyz"):
            assert await get(server, path) == (503, {"status": "starting", "protocol": 1})
    finally:
        server.app[READY]["ready"] = True


async def test_a_flood_of_readiness_checks_is_answered(server: Server) -> None:
    answers = await asyncio.gather(*(get(server, "/readyz") for _ in range(100)))
    assert {status for status, _ in answers} == {200}


async def until_status(server: Server, status: int) -> dict[str, Any]:
    """Ask /readyz until it answers `status` (the store's state has no event to wait on)."""
    async with asyncio.timeout(10):
        while (answer := await get(server, "/readyz"))[0] != status:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return answer[1]


@pytest.mark.skipif(STACK != "embedded", reason="the embedded store's writer")
async def test_not_ready_while_the_store_writer_is_stuck(make_server: ServerFactory) -> None:
    server = await make_server(gateway={"readiness_timeout": 0.3})
    assert (await get(server, "/readyz"))[0] == 200
    blocker = sqlite3.connect(server.app[SETTINGS].sqlite_path(), isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the write lock: the next group commit waits for it
        body = {"username": "stuck", "password": PASSWORD}
        async with aiohttp.ClientSession() as http:
            register = asyncio.ensure_future(http.post(f"{server.url}/v1/users", json=body))
            unready = await until_status(server, 503)
            assert unready == {
                "status": "unready",
                "failed": ["store"],
                "protocol": 1,
                "pid": os.getpid(),
            }
            assert (await get(server, "/healthz"))[0] == 200  # alive all the same
            blocker.execute("ROLLBACK")
            async with await register as resp:
                assert resp.status == 201
        await until_status(server, 200)
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
