"""Fault tests under steady load: a node SIGKILLed behind HAProxy, Redis restarted, PostgreSQL
stopped. Each asserts zero acked-message loss, zero order violations in every chat and no
duplicate surfaced by the SDK (tests.support.traffic)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pigeon.client import ClientError, login, register
from pigeon.domain.events import Message
from tests.chaos.conftest import StartNodes, connect, env_for, kill_one_behind_haproxy, make_pairs
from tests.conftest import PASSWORD, next_of
from tests.support.postgres import PgCluster
from tests.support.redis import RedisServer
from tests.support.traffic import Traffic

pytestmark = pytest.mark.slow


async def test_sigkill_one_of_three_nodes_behind_haproxy(
    database: str, redis_target: tuple[str, bool], start_nodes: StartNodes, clients: list[Any]
) -> None:
    url, is_cluster = redis_target
    nodes = await start_nodes(3, env_for(database, url, is_cluster))
    await kill_one_behind_haproxy(nodes, clients, pairs=12, acked=150)


async def test_redis_restart_during_load(
    database: str, tmp_path: Path, start_nodes: StartNodes, clients: list[Any]
) -> None:
    redis = RedisServer(tmp_path / "redis")
    await redis.start()
    try:
        n1, n2 = await start_nodes(2, env_for(database, redis.url))
        traffic = Traffic(await make_pairs(clients, 8, n1.url, n2.url))  # every push crosses
        traffic.start()
        await traffic.wait_acked(150)
        await redis.restart()
        await traffic.wait_acked(300)
        await traffic.finish()
    finally:
        await redis.close()


async def test_postgres_stopped_briefly(
    tmp_path: Path, redis_url: str, start_nodes: StartNodes, clients: list[Any]
) -> None:
    pg = PgCluster(tmp_path / "pg")
    await pg.start()
    try:
        n1, n2 = await start_nodes(2, env_for(pg.dsn, redis_url))
        traffic = Traffic(await make_pairs(clients, 6, n1.url, n2.url))
        await register(n1.url, "probe", PASSWORD)
        other = await register(n1.url, "probe_peer", PASSWORD)
        probe = await connect(
            clients, n1.url, (await login(n1.url, "probe", PASSWORD)).token, send_retries=0
        )
        chat = await probe.create_chat([other])
        traffic.start()
        await traffic.wait_acked(100)
        await pg.stop()
        with pytest.raises(ClientError) as err:
            await probe.send(chat["id"], "while the database is down")
        assert (err.value.code, err.value.temporary) == ("unavailable", True)
        # A device reconnecting now cannot be authenticated: it must be told to come back
        # later (503), not that its token is bad (401: the SDK would give up for good).
        dropped = traffic.pairs[0].receiver
        await dropped.drop_connection()
        await pg.start()
        await traffic.wait_acked(100)  # the SDK retried what failed meanwhile
        await traffic.finish()  # the reconnected receiver got everything too
        assert dropped.connects >= 2
    finally:
        await pg.close()


async def test_a_push_lost_in_a_redis_outage_arrives_when_redis_is_back(
    database: str, tmp_path: Path, start_nodes: StartNodes, clients: list[Any]
) -> None:
    redis = RedisServer(tmp_path / "redis")
    await redis.start()
    try:
        env = env_for(
            database, redis.url, PIGEON_PRESENCE__SESSION_TTL="1.5", PIGEON_PRESENCE__GRACE="0.5"
        )
        n1, n2 = await start_nodes(2, env)
        (pair,) = await make_pairs(clients, 1, n1.url, n2.url)
        await redis.stop()
        sent = await pair.sender.send(pair.chat, "during the outage")  # committed, push lost
        await redis.start()  # empty: no sessions, no subscriptions survive
        # Nothing later reveals a gap to the receiver: only the node's resync delivers it.
        got = await next_of(pair.receiver, Message, timeout=20)
        assert (got.id, got.body) == (sent.id, "during the outage")
        # The receiver's node registers its live session again: it shows online, not offline.
        assert pair.receiver.user is not None
        async with asyncio.timeout(20):
            while True:
                (state,) = await pair.sender.subscribe_presence([pair.receiver.user])
                if state["status"] == "online":
                    break
                await asyncio.sleep(0.1)  # polling another process's heartbeat
    finally:
        await redis.close()
