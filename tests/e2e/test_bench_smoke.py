"""`pigeon bench one-to-one`, run in-process with tiny parameters against the test server."""

from __future__ import annotations

import pytest

from pigeon.bench import clients, one_to_one
from pigeon.bench.server import ServerHandle
from tests.conftest import Server


async def test_one_to_one_bench_smoke(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # a rare SDK close race (see pigeon.bench.clients) must not stretch this test
    monkeypatch.setattr(clients, "CLOSE_TIMEOUT", 2.0)
    params = one_to_one.Params(devices=4, inflight=4, duration=1.0, warmup=0.2, drain_timeout=5)
    doc = await one_to_one.run(ServerHandle(server.url, None), params, inline=True)
    r = doc["results"]
    assert r["delivered_in_window"] > 0 and r["delivered_per_s"] > 0
    assert r["latency"]["count"] == r["delivered_in_window"]
    assert 0 < r["latency"]["p50_ms"] <= r["latency"]["p99_ms"] <= r["latency"]["p999_ms"]
    assert r["commit_latency"]["p50_ms"] > 0
    assert (r["missing"], r["duplicates"], r["seq_gaps"], r["errors"]) == (0, 0, 0, {})
    assert r["drained"] and r["received_total"] == r["committed_total"] > 0
