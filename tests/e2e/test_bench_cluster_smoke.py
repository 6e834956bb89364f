"""`pigeon bench one-to-one --nodes 2`: two spawned `pigeon serve` processes on a fresh
PostgreSQL database and Redis, every message sent on one node and received on the other."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from pigeon.bench import clients, one_to_one
from pigeon.bench.server import Store, Target, server
from pigeon.bench.store import ADMIN_DSN_ENV, REDIS_URL_ENV
from tests.support.postgres import ADMIN_DSN


async def test_one_to_one_across_two_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    # the test session's PostgreSQL and Redis (see tests.support)
    monkeypatch.setenv(ADMIN_DSN_ENV, ADMIN_DSN)
    monkeypatch.setenv(REDIS_URL_ENV, redis_url)
    # a rare SDK close race (see pigeon.bench.clients) must not stretch this test
    monkeypatch.setattr(clients, "CLOSE_TIMEOUT", 2.0)
    target = Target(data_dir=tmp_path, nodes=2, store=Store.postgres)
    params = one_to_one.Params(devices=8, inflight=4, duration=1.0, warmup=0.3, drain_timeout=5)
    async with server(target) as handle:
        urls, database = handle.urls, handle.database
        doc = await one_to_one.run(handle, params, inline=True)

    r = doc["results"]
    assert (r["missing"], r["duplicates"], r["seq_gaps"], r["errors"]) == (0, 0, 0, {})
    assert r["drained"] and r["received_total"] == r["committed_total"] > 0
    cross = r["cross_node"]
    assert (cross["nodes"], cross["pairs"]) == (2, 4)  # every pair spans the two nodes
    assert cross["delivered_in_window"] == r["delivered_in_window"] > 0
    assert cross["latency"]["count"] == cross["delivered_in_window"]
    assert 0 < cross["latency"]["p50_ms"] <= cross["latency"]["p99_ms"]
    nodes = doc["server"]["nodes"]
    assert len(set(urls)) == 2 and [n["url"] for n in nodes] == urls
    assert all(n["cpu_percent_window"] > 0 and n["rss_kib_end_of_window"] > 0 for n in nodes)
    assert "services_cpu_percent_window" in doc["server"]  # PostgreSQL and Redis, when local

    assert database is not None  # a fresh database, dropped once the nodes stopped
    name = urlsplit(database).path.lstrip("/")
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await conn.close()
