"""Shared fixtures: a real Pigeon server on loopback (in-process, real sockets) and SDK helpers."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from pigeon.app import create_app, runner_options
from pigeon.client import Account, PigeonClient, login, register
from pigeon.config import DynamoSettings, PostgresSettings, Settings, load_settings
from pigeon.ports import Clock
from pigeon.services.clock import SystemClock

pytest_plugins = [
    "tests.support.dynamodb",
    "tests.support.postgres",
    "tests.support.redis",
    "tests.support.s3",
]

#: Seconds a test client waits for `ready`. On the tests' moto (one request at a time) 50
#: devices of a group of 100 connecting at once took over 10 s: each one's sync acks, and
#: each ack reads the chat's 100 member items (a Query moto answers in about 0.1 s).
CONNECT_TIMEOUT = 30.0 if os.environ.get("PIGEON_TEST_STACK") == "dynamodb" else 10.0

_names = itertools.count(1)
#: Usernames differ between runs: the shared Redis keeps rate-limit counters (logins per
#: username) from earlier runs.
_RUN = uuid.uuid4().hex[:6]
E = TypeVar("E")
PASSWORD = "correct horse battery"


#: `embedded` (default): SQLite and in-process bus and presence. `shared`: the same end-to-end
#: tests on PostgreSQL and Redis (the test database of the session, the shared Redis), as the
#: nodes of a cluster run them. `dynamodb`: on DynamoDB (the session's moto server, fresh tables
#: per test) and Redis. `make test` runs tests/e2e all three ways.
STACK = os.environ.get("PIGEON_TEST_STACK", "embedded")


def shared_stack(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides that put a test server on the stack under test (`STACK`): nothing
    for the embedded one; PostgreSQL or DynamoDB, with Redis, for the others. The servers of
    one test share one store (the same overrides)."""
    if STACK == "embedded":
        return {}
    if STACK == "dynamodb":
        from tests.support.dynamodb import (
            ACCESS_KEY,
            REGION,
            SECRET_KEY,
            delete_tables,
            fresh_prefix,
        )

        # The servers (and the processes tests start) find moto's credentials where AWS's
        # would be: the adapter takes them from the usual chain only.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        endpoint, prefix = request.getfixturevalue("moto_dynamodb").endpoint, fresh_prefix()
        # after the servers (torn down first): the tables go, or moto's memory grows all run
        request.addfinalizer(lambda: delete_tables(endpoint, prefix))
        store: dict[str, Any] = {
            "type": "dynamodb",
            "endpoint_url": endpoint,
            "region": REGION,
            "table_prefix": prefix,
            "create_tables": True,
            "backoff_base": 0.001,
            "backoff_cap": 0.005,
        }
    else:
        store = {"type": "postgres", "dsn": request.getfixturevalue("postgres_dsn")}
    return {
        "store": store,
        "bus": {"type": "redis"},
        "presence": {"type": "redis"},
        "redis": {"url": request.getfixturevalue("redis_url")},
    }


def store_env(settings: Settings) -> dict[str, str]:
    """The environment that gives another process (the command line, a push worker) the
    store of a test server's settings; {} for SQLite, found through `PIGEON_DATA_DIR`."""
    store = settings.store
    if isinstance(store, PostgresSettings):
        return {"PIGEON_STORE__TYPE": "postgres", "PIGEON_STORE__DSN": store.dsn}
    if isinstance(store, DynamoSettings):
        return {
            "PIGEON_STORE__TYPE": "dynamodb",
            "PIGEON_STORE__ENDPOINT_URL": str(store.endpoint_url),
            "PIGEON_STORE__REGION": store.region,
            "PIGEON_STORE__TABLE_PREFIX": store.table_prefix,
        }
    return {}


def test_settings(
    data_dir: Path, stack: dict[str, Any] | None = None, **overrides: Any
) -> Settings:
    """Settings for a test server: cheap password hashing, short timeouts where asked."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "log_json": False,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 8,
        "store": {"synchronous": "NORMAL"},
        "sweep_interval": 3600.0,
        # Suites flood on purpose and register hundreds of users from one address: the limits
        # are off unless a test turns them on (tests/e2e/test_rate_limits.py).
        "rate_limits": {"enabled": False},
        # and their REST refusals are answered at once (one test measures the pause)
        "gateway": {"refusal_delay": 0.0},
        **(stack or {}),
    }
    for key, value in overrides.items():
        old = base.get(key)
        # a section of another type (another store than the stack's) replaces it whole
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("type", old.get("type")) == old.get("type", value.get("type"))
        ):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    if base["store"].get("type", "sqlite") != "sqlite":  # a SQLite-only setting
        base["store"].pop("synchronous", None)
    return load_settings(None, **base)


class Server:
    """A running server: its base URL and the app (for white-box checks)."""

    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner = runner
        self.url = url
        self.clients: list[PigeonClient] = []
        self.sessions: list[aiohttp.ClientSession] = []
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []

    @property
    def app(self) -> web.Application:
        return self.runner.app

    async def user(self, prefix: str = "user") -> tuple[str, str]:
        """Register a fresh user; returns (username, user id)."""
        name = f"{prefix}_{_RUN}{next(_names)}"
        return name, await register(self.url, name, PASSWORD)

    async def device(self, username: str, name: str = "dev") -> Account:
        return await login(self.url, username, PASSWORD, name)

    async def client(self, account: Account, **kw: Any) -> PigeonClient:
        c = PigeonClient(self.url, account.token, **kw)
        await c.connect(CONNECT_TIMEOUT)
        self.clients.append(c)
        return c

    async def raw_ws(self, account: Account) -> aiohttp.ClientWebSocketResponse:
        """A bare WebSocket (no SDK) for protocol-level tests."""
        http = aiohttp.ClientSession()
        self.sessions.append(http)
        ws = await http.ws_connect(
            f"{self.url}/v1/ws", headers={"Authorization": f"Bearer {account.token}"}
        )
        self.sockets.append(ws)
        return ws

    async def new_client(self, prefix: str = "user", **kw: Any) -> PigeonClient:
        """A fresh user with one connected device."""
        username, _ = await self.user(prefix)
        return await self.client(await self.device(username), **kw)


class ManualClock:
    """A clock tests move by hand (retention)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def now_ms(self) -> int:
        return SystemClock().now_ms() + self.offset_ms


async def start_server(settings: Settings, clock: Clock | None = None) -> Server:
    runner = web.AppRunner(
        create_app(settings, clock),
        handle_signals=False,
        shutdown_timeout=2.0,
        **runner_options(settings),
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    return Server(runner, f"http://127.0.0.1:{port}")


#: Seconds to stop a test server: its clients close one by one, each acking what it handled
#: (on DynamoDB, on the tests' moto that handles one request at a time, 100 members' acks of
#: a group's messages took 26 s).
STOP_TIMEOUT = 60.0 if STACK == "dynamodb" else 20.0


async def stop_server(server: Server) -> None:
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            await _stop_server(server)
    except TimeoutError:
        for task in asyncio.all_tasks():
            task.print_stack()
        raise


async def _stop_server(server: Server) -> None:
    for c in server.clients:
        await c.close()
    for ws in server.sockets:
        await ws.close()
    for http in server.sessions:
        await http.close()
    await server.runner.cleanup()


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServerFactory]:
    """Start servers with settings overrides; all are stopped at the end of the test."""
    servers: list[Server] = []
    stack = shared_stack(request)

    async def make(clock: Clock | None = None, **overrides: Any) -> Server:
        settings = test_settings(tmp_path / f"s{len(servers)}", stack, **overrides)
        server = await start_server(settings, clock)
        servers.append(server)
        return server

    yield make
    for s in servers:
        await stop_server(s)


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    """A server with default settings."""
    return await make_server()


async def next_of(client: PigeonClient, kind: type[E], timeout: float = 5.0) -> E:
    """The next event of `kind`, skipping (and handling) events of other kinds."""
    while True:
        event = await client.next_event(timeout)
        if isinstance(event, kind):
            return event
