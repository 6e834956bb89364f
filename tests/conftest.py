"""Shared fixtures: a real Pigeon server on loopback (in-process, real sockets) and SDK helpers."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pigeon.app import create_app
from pigeon.client import Account, PigeonClient, login, register
from pigeon.config import Settings, load_settings

_names = itertools.count(1)
PASSWORD = "correct horse battery"


def test_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: cheap password hashing, short timeouts where asked."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "log_json": False,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 8,
        "store": {"synchronous": "NORMAL"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(None, **base)


class Server:
    """A running server: its base URL and the app (for white-box checks)."""

    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner = runner
        self.url = url
        self.clients: list[PigeonClient] = []

    @property
    def app(self) -> web.Application:
        return self.runner.app

    async def user(self, prefix: str = "user") -> tuple[str, str]:
        """Register a fresh user; returns (username, user id)."""
        name = f"{prefix}{next(_names)}"
        return name, await register(self.url, name, PASSWORD)

    async def device(self, username: str, name: str = "dev") -> Account:
        return await login(self.url, username, PASSWORD, name)

    async def client(self, account: Account, **kw: Any) -> PigeonClient:
        c = PigeonClient(self.url, account.token, **kw)
        await c.connect()
        self.clients.append(c)
        return c

    async def new_client(self, prefix: str = "user", **kw: Any) -> PigeonClient:
        """A fresh user with one connected device."""
        username, _ = await self.user(prefix)
        return await self.client(await self.device(username), **kw)


async def start_server(settings: Settings) -> Server:
    runner = web.AppRunner(create_app(settings), handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    return Server(runner, f"http://127.0.0.1:{port}")


async def stop_server(server: Server) -> None:
    for c in server.clients:
        await c.close()
    await server.runner.cleanup()


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start servers with settings overrides; all are stopped at the end of the test."""
    servers: list[Server] = []

    async def make(**overrides: Any) -> Server:
        server = await start_server(test_settings(tmp_path / f"s{len(servers)}", **overrides))
        servers.append(server)
        return server

    yield make
    for s in servers:
        await stop_server(s)


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    """A server with default settings."""
    return await make_server()
