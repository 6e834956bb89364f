"""Fixtures of the multi-node and fault suites: real server processes on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pigeon.client import PigeonClient, login, register
from tests.conftest import PASSWORD
from tests.support.cluster import HAProxy, Node, cluster_env
from tests.support.postgres import fresh_database
from tests.support.traffic import Pair, Traffic

_names = itertools.count(1)

StartNodes = Callable[..., Awaitable[list[Node]]]


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_target(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(url, is_cluster): multi-node tests run on one Redis and on a Redis Cluster (3 masters,
    sharded pub/sub) that the test session starts."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url"), False
    return request.getfixturevalue("redis_cluster").url, True


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test's cluster."""
    async with fresh_database() as dsn:
        yield dsn


@pytest.fixture
async def start_nodes(tmp_path: Path) -> AsyncIterator[StartNodes]:
    """Start `count` nodes with the given environment (in parallel); all killed at the end."""
    nodes: list[Node] = []

    async def start(count: int, env: dict[str, str], workers: int = 1) -> list[Node]:
        new = [Node(env, tmp_path / f"node{len(nodes) + i}", workers=workers) for i in range(count)]
        nodes.extend(new)
        await asyncio.gather(*(n.start() for n in new))
        return new

    yield start
    await asyncio.gather(*(n.close() for n in nodes))


@pytest.fixture
async def clients() -> AsyncIterator[list[PigeonClient]]:
    """SDK clients made by a test; closed at the end."""
    made: list[PigeonClient] = []
    yield made
    await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


async def connect(made: list[PigeonClient], url: str, token: str, **kw: object) -> PigeonClient:
    client = PigeonClient(url, token, **kw)  # type: ignore[arg-type]
    await client.connect()
    made.append(client)
    return client


async def kill_one_behind_haproxy(
    nodes: list[Node], clients: list[PigeonClient], pairs: int, acked: int
) -> None:
    """`pairs` pairs talk through HAProxy in front of `nodes`; once `acked` messages are
    acked, the first node is SIGKILLed (whatever it had in flight), and the survivors must
    carry as many again: nothing acked lost, reordered or surfaced twice (`Traffic.finish`)."""
    lb = HAProxy(nodes)
    await lb.start()
    try:
        traffic = Traffic(await make_pairs(clients, pairs, lb.url, lb.url))
        traffic.start()
        await traffic.wait_acked(acked)
        nodes[0].kill()
        await traffic.wait_acked(2 * acked)  # the survivors carry the whole load
        await traffic.finish()
        assert any(c.connects > 1 for c in clients), "the killed node held no client"
    finally:
        await lb.close()


async def make_pairs(
    made: list[PigeonClient], count: int, sender_url: str, receiver_url: str
) -> list[Pair]:
    """`count` sender/receiver pairs with a direct chat each; accounts made on `sender_url`."""

    async def one() -> Pair:
        a, b = f"sender{next(_names)}", f"receiver{next(_names)}"
        await register(sender_url, a, PASSWORD)
        b_id = await register(sender_url, b, PASSWORD)
        sender = await connect(made, sender_url, (await login(sender_url, a, PASSWORD)).token)
        receiver = await connect(made, receiver_url, (await login(sender_url, b, PASSWORD)).token)
        chat = await sender.create_chat([b_id])
        return Pair(sender, receiver, chat["id"])

    return list(await asyncio.gather(*(one() for _ in range(count))))


def env_for(dsn: str, redis_url: str, redis_cluster: bool = False, **extra: str) -> dict[str, str]:
    return {**cluster_env(dsn, redis_url, redis_cluster=redis_cluster), **extra}
