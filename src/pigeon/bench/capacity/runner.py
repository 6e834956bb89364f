"""A `pigeon bench capacity` run from start to finish: the services it starts (a private
`redis-server`, the moto server), one fresh cluster per node count with the devices connected,
its idle window and its workloads, and the problems worth printing.

The glue between the parts: what a node's environment is for each store, and in which order
things start and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from pigeon.bench.capacity import phases
from pigeon.bench.capacity.load import setup
from pigeon.bench.capacity.moto import BILLING_PATH, MOTO_ENV, moto_server
from pigeon.bench.capacity.params import Backend, Params, describe
from pigeon.bench.capacity.probes import Probe
from pigeon.bench.report import Run
from pigeon.bench.server import Store, Target, free_port, pin, raise_nofile, server, stop
from pigeon.bench.store import redis_url

#: The nodes' environment for these runs: no periodic inbox count (its statements are the
#: operator's, not the messages'), metrics on (their counters are read).
CAPACITY_ENV = {"PIGEON_METRICS__INBOX_INTERVAL": "0"}


def _node_env(p: Params, redis: str | None, endpoint: str | None) -> tuple[Store, dict[str, str]]:
    """The spawned nodes' store (as `bench.server` knows it) and their environment."""
    env = CAPACITY_ENV | p.server_env
    if p.store is Backend.sqlite or redis is None:
        return Store.sqlite, env
    shared = {
        "PIGEON_BUS__TYPE": "redis",
        "PIGEON_PRESENCE__TYPE": "redis",
        "PIGEON_REDIS__URL": redis,
    }
    if p.store is Backend.postgres:
        return Store.postgres, env | shared
    assert endpoint is not None
    dynamo = {
        "PIGEON_STORE__TYPE": "dynamodb",
        "PIGEON_STORE__ENDPOINT_URL": endpoint,
        "PIGEON_STORE__REGION": "us-east-1",
        "PIGEON_STORE__TABLE_PREFIX": f"cap{secrets.token_hex(3)}_",
        "PIGEON_STORE__CREATE_TABLES": "true",
    }
    # the bench's moto: its credentials, and time to answer (one request at a time, on a busy
    # machine: a call that times out is retried, and moto ignores the retried transaction's
    # ClientRequestToken, so the retry fails on the first attempt's own writes)
    moto = MOTO_ENV | {"PIGEON_STORE__READ_TIMEOUT": "120"}
    creds = moto if p.dynamodb_endpoint is None else {}
    return Store.sqlite, env | shared | dynamo | creds  # sqlite: no database to create


async def run_nodes(
    p: Params,
    nodes: int,
    redis: str | None,
    endpoint: str | None,
    extra_pids: list[int],
    billing: str | None = None,
) -> dict[str, Any]:
    """One node count: a fresh cluster, its idle cost, then the two workloads."""
    store, env = _node_env(p, redis, endpoint)
    target = Target(
        server_cpu=p.server_cpu,
        data_dir=p.data_dir,
        server_env=env,
        nodes=nodes,
        store=store,
    )
    async with server(target) as handle:
        if p.client_cpu is not None:
            pin(p.client_cpu)  # after spawning, so the nodes do not inherit it
        probe = Probe(handle, redis, handle.database, extra_pids, billing)
        gen = await setup(handle, p)
        try:
            idle = await phases.idle(gen, probe, p)
            out: dict[str, Any] = {"nodes": nodes, "idle": idle}
            rates = [("one_to_one", gen.pairs, p.rate), ("group", gen.group, p.group_rate)]
            for name, senders, rate in rates:
                if senders:
                    out[name] = await phases.phase(
                        gen, probe, senders, rate, p, name, idle["per_second"]
                    )
            return out
        finally:
            gen.close()
            pin(None)


async def run(p: Params) -> dict[str, Any]:
    """Every node count of `p`, one after the other; the result document."""
    if p.store is Backend.sqlite and p.nodes != [1]:
        raise ValueError("SQLite serves one node: --nodes 1")
    raise_nofile(65536)
    doc = Run("capacity", describe(p))
    results = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pigeon-capacity-")))
        redis: str | None = None
        if p.store is not Backend.sqlite:
            redis = p.redis_url or stack.enter_context(private_redis(tmp)) or redis_url()
            await wait_redis(redis)
        async with contextlib.AsyncExitStack() as astack:
            endpoint, extra = p.dynamodb_endpoint, []
            billing: str | None = None
            if p.store is Backend.dynamodb and endpoint is None:
                moto, moto_pid = await astack.enter_async_context(moto_server())
                endpoint, billing = moto, moto + BILLING_PATH
                extra.append(moto_pid)
            doc.doc["params"] |= {"redis": redis, "dynamodb_endpoint": endpoint}
            for n in p.nodes:
                results.append(await run_nodes(p, n, redis, endpoint, extra, billing))
    for r in results:
        for name in ("one_to_one", "group"):
            phase = r.get(name)
            if phase and (phase["lost"] or phase["errors"] or not phase["drained"]):
                doc.problems.append(
                    f"{r['nodes']} node(s), {name}: lost {phase['lost']}, errors"
                    f" {phase['errors']}, drained {phase['drained']}"
                )
    return doc.finish(results=results)


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[str | None]:
    """A `redis-server` of this run on a free loopback port (None if not installed)."""
    if shutil.which("redis-server") is None:
        yield None
        return
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    args += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc, grace=5.0)


async def wait_redis(url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        client = aioredis.from_url(url)
        try:
            await client.ping()
            return
        except (aioredis.ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
        finally:
            await client.aclose()
        await asyncio.sleep(0.05)  # polling a starting process: no event to await
