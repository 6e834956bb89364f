"""`pigeon bench keys` and `pigeon bench crypto` with tiny parameters."""

from __future__ import annotations

from pigeon.bench import crypto, keys
from pigeon.bench.server import ServerHandle
from tests.conftest import Server


async def test_keys_bench_smoke(server: Server) -> None:
    p = keys.Params(claimers=6, target_devices=2, keys_per_device=4, rounds=2)
    doc = await keys.run(ServerHandle(server.url, None), p)
    r = doc["results"]
    assert doc["problems"] == []
    assert r["claims"] == 12 and r["latency_ms"]["count"] == 12
    assert r["one_time_keys_handed"] == 2 * 2 * 4 and r["duplicates"] == 0
    assert r["fallback_keys_handed"] == 2 * 2 * (6 - 4)
    assert keys.summary(doc)


def test_crypto_bench_smoke() -> None:
    r = crypto.run(crypto.Params(messages=20, devices=3, size=10, shares=1))
    for figure in [*r["one_to_one"].values(), *r["room_key_share"].values()]:
        assert figure > 0
    assert r["group"]["devices"] == 3 and r["group"]["encrypt_us"] > 0
    assert len(crypto.summary(r)) == 4
