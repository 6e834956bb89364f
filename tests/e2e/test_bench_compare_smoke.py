"""`pigeon bench compare` with tiny parameters: Pigeon (the test server) and a spawned relay."""

from __future__ import annotations

import pytest

from pigeon.bench import compare
from pigeon.bench.server import Target
from tests.conftest import STACK, Server


@pytest.mark.skipif(
    STACK == "dynamodb",
    reason="200 msgs/s is beyond the tests' moto (one request at a time, about 15 per send:"
    " 4 msgs/s were delivered); the generator is the same on every stack",
)
async def test_compare_smoke(server: Server) -> None:
    closed = compare.Workload(pairs=2, inflight=2, duration=0.5, warmup=0.2)
    opened = compare.Workload(pairs=2, rate=200, duration=0.5, warmup=0.2)
    pigeon = await compare.compare(["pigeon"], [closed, opened], Target(url=server.url), 1)
    relay = await compare.compare(["relay"], [closed], Target(), 1)
    for r in [*pigeon, *relay]:
        assert r.delivered_per_s > 0 and r.lost == 0
        assert r.latency_ms["count"] > 0
        assert 0 < r.latency_ms["p50_ms"] <= r.latency_ms["p99_ms"]
    assert relay[0].cpu_us_per_msg is not None  # spawned: its CPU is read
    assert pigeon[1].workload == "200 msgs/s" and 150 < pigeon[1].delivered_per_s < 250
    lines = compare.table([*pigeon, *relay], ["relay", "pigeon"])
    assert any("pigeon/relay" in line for line in lines)


async def test_compare_smoke_e2e(server: Server) -> None:
    """--e2e: encrypted chats, envelopes instead of bodies, the stamp read from the ciphertext."""
    closed = compare.Workload(pairs=2, inflight=2, duration=0.5, warmup=0.2, size=99, e2e=True)
    opened = compare.Workload(pairs=2, rate=200, duration=0.5, warmup=0.2, e2e=True)
    results = await compare.compare(["pigeon"], [closed, opened], Target(url=server.url), 1)
    for r in results:
        assert r.delivered_per_s > 0 and r.lost == 0
        assert r.latency_ms["count"] > 0
        assert 0 < r.latency_ms["p50_ms"] <= r.latency_ms["p99_ms"]
    assert [r.workload for r in results] == ["saturation e2e", "200 msgs/s e2e"]
    assert any("e2e" in line for line in compare.table(results, ["pigeon"]))
