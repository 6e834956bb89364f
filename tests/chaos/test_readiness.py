"""Readiness behind HAProxy: a node whose PostgreSQL hangs leaves the rotation and comes back.

Why this shape: the nodes are a real cluster, sharing one PostgreSQL database and one Redis;
each reaches the database through a TCP relay of its own that the test can freeze. A frozen
relay passes no byte and keeps its connections open, which is, seen from the node, exactly a
PostgreSQL stopped with SIGSTOP: connections hang, new ones are accepted and never answered.
Freezing the database server itself would fail all three nodes at once (and the shared test
server must not be frozen); the relays let the test fail one node and see HAProxy keep the
others in rotation, then fail all of them and see HAProxy fall back to the live nodes
(deploy/haproxy.cfg, `pigeon_live`) rather than refuse every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.chaos.conftest import StartNodes, env_for
from tests.support.cluster import HAProxyWithStats, Node

pytestmark = pytest.mark.slow

#: Each probe waits this long (the default is 1 s): detection takes it plus two failed checks.
READINESS_TIMEOUT = "0.5"


class FreezableRelay:
    """A TCP relay to one address; `freeze()` stops it passing bytes (connections stay open,
    new ones are accepted and wait), `thaw()` lets everything held through, in order."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._thawed.wait()  # a connection made while frozen waits, unanswered
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._thawed.wait()
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


@contextlib.asynccontextmanager
async def relays(count: int, dsn: str) -> AsyncIterator[list[FreezableRelay]]:
    parts = urlsplit(dsn)
    made = [FreezableRelay(parts.hostname or "127.0.0.1", parts.port or 5432) for _ in range(count)]
    try:
        for relay in made:
            await relay.start()
        yield made
    finally:
        for relay in made:
            await relay.close()


def via(dsn: str, relay: FreezableRelay) -> str:
    parts = urlsplit(dsn)
    return parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}").geturl()


async def served_by(url: str, times: int) -> set[int]:
    """The pids that answer `times` fresh connections to /healthz through the balancer."""
    pids: set[int] = set()
    for _ in range(times):
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(f"{url}/healthz") as resp,
        ):
            assert resp.status == 200
            pids.add((await resp.json())["pid"])
    return pids


async def readyz(node: Node) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/readyz") as resp:
        return resp.status, await resp.json()


async def until_up(lb: HAProxyWithStats, backend: str, want: dict[str, bool]) -> None:
    """Poll HAProxy's view of `backend` (it checks every 500 ms) until it is `want`."""
    async with asyncio.timeout(20):
        while await lb.up(backend) != want:  # noqa: ASYNC110 - another process: no event
            await asyncio.sleep(0.1)


async def test_a_node_whose_postgres_hangs_leaves_the_rotation_and_returns(
    database: str, redis_url: str, start_nodes: StartNodes
) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="pigeon-lb-"))  # short: a unix socket's path
    async with relays(3, database) as (r1, r2, r3):
        started = await asyncio.gather(
            *(
                start_nodes(
                    1,
                    env_for(
                        via(database, relay),
                        redis_url,
                        PIGEON_GATEWAY__READINESS_TIMEOUT=READINESS_TIMEOUT,
                    ),
                )
                for relay in (r1, r2, r3)
            )
        )
        nodes = [node for (node,) in started]
        pids: dict[Node, object] = {}
        for node in nodes:
            status, body = await readyz(node)
            assert (status, body["status"]) == (200, "ready")
            pids[node] = body["pid"]
        lb = HAProxyWithStats(nodes, socket_dir)
        await lb.start()
        try:
            every = {"node1": True, "node2": True, "node3": True}
            await until_up(lb, "pigeon_nodes", every)

            r3.freeze()  # node 3's PostgreSQL hangs
            await until_up(lb, "pigeon_nodes", {**every, "node3": False})
            status, body = await readyz(nodes[2])
            assert (status, body["status"], body["failed"]) == (503, "unready", ["store"])
            # New connections go to the two others only (node 3 is alive: its /healthz is 200).
            assert await served_by(lb.url, 6) == {pids[nodes[0]], pids[nodes[1]]}

            r3.thaw()
            await until_up(lb, "pigeon_nodes", every)
            async with asyncio.timeout(10):  # leastconn: ties take turns, node 3 gets its turn
                while pids[nodes[2]] not in await served_by(lb.url, 3):
                    pass

            for relay in (r1, r2, r3):  # every node's database hangs: none is ready
                relay.freeze()
            await until_up(lb, "pigeon_nodes", dict.fromkeys(every, False))
            # HAProxy falls back to the live nodes rather than refusing every client.
            assert await lb.up("pigeon_live") == every
            assert len(await served_by(lb.url, 3)) >= 1
            for relay in (r1, r2, r3):
                relay.thaw()
            await until_up(lb, "pigeon_nodes", every)
        finally:
            await lb.close()
            for node in nodes:
                await node.close()  # before the relays go: no node logs a lost database
            shutil.rmtree(socket_dir, ignore_errors=True)
