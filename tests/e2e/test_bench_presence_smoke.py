"""`pigeon bench presence-storm` and one-to-one with presence, in-process with tiny parameters."""

from __future__ import annotations

import pytest

from pigeon.bench import clients, one_to_one, presence_storm
from pigeon.bench.server import ServerHandle
from tests.conftest import ServerFactory


async def test_presence_storm_bench_smoke(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a rare SDK close race (see pigeon.bench.clients) must not stretch this test
    monkeypatch.setattr(clients, "CLOSE_TIMEOUT", 2.0)
    server = await make_server(presence={"grace": 0.2})
    params = presence_storm.Params(
        churners=10,
        subscribers=4,
        watch=5,
        waves=2,
        hold=0.1,
        settle=0.1,
        grace=0.2,
        group_cap=4,  # watched users split over two groups per subscriber
        tail_timeout=3.0,
    )
    doc = await presence_storm.run(ServerHandle(server.url, None), params, inline=True)
    r = doc["results"]
    assert r["watchers_per_churner"]["min"] >= 1
    assert r["subscriptions"] == 4 * 5 and r["chats"] == 4 * 2
    assert r["initial_states"] == {"offline": 20}
    expected = 4 * 5 * 2  # subscribers x watched x waves
    for name in ("online", "offline"):
        assert r["transitions"][name] == {"expected": expected, "received": expected, "missing": 0}
    assert r["events_received"] == r["events_expected"] == 2 * expected
    assert (r["duplicates"], r["unexpected"]) == (0, 0)
    assert r["events_per_s"] > 0
    assert r["online_delay_from_connect_start"]["p50_ms"] > 0
    assert r["online_delay"]["count"] == expected
    assert 0 < r["offline_delay_minus_grace"]["p50_ms"] <= r["offline_delay_minus_grace"]["max_ms"]
    assert r["min_reconnect_gap_s"] > params.grace
    assert doc["problems"] == [] or all("saturated" in p for p in doc["problems"])


async def test_one_to_one_with_presence_smoke(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clients, "CLOSE_TIMEOUT", 2.0)
    server = await make_server(presence={"grace": 0.1})
    params = one_to_one.Params(
        devices=4,
        inflight=2,
        duration=1.0,
        warmup=0.2,
        drain_timeout=5,
        presence_watchers=3,
        presence_churn=2,
        presence_churn_period=0.4,
        presence_grace=0.1,
    )
    doc = await one_to_one.run(ServerHandle(server.url, None), params, inline=True)
    r = doc["results"]
    assert r["delivered_in_window"] > 0
    assert (r["missing"], r["duplicates"], r["seq_gaps"], r["errors"]) == (0, 0, 0, {})
    pr = r["presence"]
    assert pr["subscriptions"] >= 4 * 3
    assert pr["events_received"] > 0 and pr["churn_cycles"] > 0
