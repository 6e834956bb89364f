"""`pigeon bench capacity` with tiny parameters: one and two nodes on a fresh PostgreSQL
database and Redis, a 1:1 and a group workload each, every figure of the report present."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pigeon.bench import acks, capacity
from pigeon.bench.store import ADMIN_DSN_ENV, REDIS_URL_ENV
from tests.support.postgres import ADMIN_DSN

FIGURES = {
    "node_cpu_us",
    "postgres_cpu_us",
    "redis_cpu_us",
    "store_calls",
    "pg_transactions",
    "pg_rows_inserted",
    "redis_commands",
    "redis_bytes_in",
    "redis_bytes_out",
    "wire_bytes_sent",
    "wire_bytes_received",
}


@pytest.mark.timeout(90)
async def test_capacity_on_one_and_two_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv(ADMIN_DSN_ENV, ADMIN_DSN)
    monkeypatch.setenv(REDIS_URL_ENV, redis_url)  # used when redis-server is not installed
    p = capacity.Params(
        nodes=[1, 2],
        rate=60.0,
        group_rate=5.0,
        pairs=4,
        members=6,
        duration=1.0,
        warmup=0.3,
        idle=0.3,
        settle=0.5,
        drain_timeout=10.0,
        data_dir=tmp_path,
    )
    doc = await capacity.run(p)

    assert doc["problems"] == []
    assert [r["nodes"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["idle"]["per_second"]["node_cpu_us"] is not None
        one, group = r["one_to_one"], r["group"]
        assert one["messages"] > 20 and one["deliveries"] == one["messages"]
        assert group["messages"] > 0 and group["deliveries"] == 5 * group["messages"]
        for phase in (one, group):
            assert phase["lost"] == 0 and phase["errors"] == 0 and phase["drained"]
            figures = phase["per_message"]
            assert set(figures) >= FIGURES
            assert figures["node_cpu_us"] > 0 and figures["store_calls"] >= 1
            assert figures["redis_commands"] > 0
            assert figures["wire_bytes_sent"] > 100 and figures["wire_bytes_received"] > 100
        # a delivery sends a message frame; the group's fan-out receives five
        assert group["per_message"]["wire_bytes_received"] > one["per_message"]["wire_bytes_sent"]
        assert group["per_delivery"]["node_cpu_us"] < group["per_message"]["node_cpu_us"]
    two = doc["results"][1]["one_to_one"]["detail"]["redis_calls"]
    assert two.get("publish", 0) >= 1  # across nodes, every delivery rides the bus
    lines = capacity.table(doc)
    assert any("node CPU" in line for line in lines)
    assert any("group of 6" in line for line in lines)


def test_billing_meter_counts_units_as_dynamodb_bills_them() -> None:
    """The bench's moto meter: 1 KB write units (2 in a transaction, one more per global index
    whose key the item carries), 4 KB read units (half when eventually consistent)."""
    meter = capacity.BillingMeter()
    gsi = [{"AttributeName": "user", "KeyType": "HASH"}]
    meter.observe(
        "CreateTable", {"TableName": "t", "GlobalSecondaryIndexes": [{"KeySchema": gsi}]}, {}
    )
    small = {"pk": {"S": "a"}, "sk": {"S": "#"}, "body": {"S": "x" * 100}}
    big = {"pk": {"S": "b"}, "sk": {"S": "#"}, "user": {"S": "u"}, "body": {"S": "x" * 3000}}
    meter.observe("PutItem", {"TableName": "t", "Item": small}, {})  # 1
    meter.observe(
        "TransactWriteItems", {"TransactItems": [{"Put": {"TableName": "t", "Item": big}}]}, {}
    )  # 2 x (3 + 1 index)
    meter.observe(
        "UpdateItem", {"TableName": "t", "Key": {"pk": {"S": "b"}, "sk": {"S": "#"}}}, {}
    )  # 3 (its size)
    meter.observe("GetItem", {"TableName": "t", "ConsistentRead": True}, {"Item": big})  # 1
    meter.observe("Query", {"TableName": "t"}, {"Items": [small, big]})  # 0.5: one 4 KB page
    assert meter.units == {"t,write": 1 + 8 + 3, "t,read": 1.5}
    assert meter.stored()["t,bytes"] > 3000


class _Sent:
    """A socket that keeps what it is given to send."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.frames.append(payload)


async def test_generators_ack_like_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench/acks.py`, shared by the capacity and compare generators: a message is acked
    within ACK_DELAY; a receipt waits LAZY_ACK_DELAY for a send to carry the ack, else goes
    alone; a message arriving meanwhile brings the ack forward."""
    monkeypatch.setattr(acks, "LAZY_ACK_DELAY", 0.2)
    acker = acks.Acker(asyncio.get_running_loop())
    sock = _Sent()
    acker.sock = sock  # type: ignore[assignment]  # only `send` is used
    acker.on_event(1, message=False)  # a receipt
    await asyncio.sleep(4 * acks.ACK_DELAY)
    assert sock.frames == [] and acker.ack_pending
    assert acker.ride() == b',"ack":1' and not acker.ack_pending  # rides on a send
    assert acker.ride() == b""
    acker.on_event(2, message=False)
    acker.on_event(3, message=True)  # ends the lazy wait
    await asyncio.sleep(4 * acks.ACK_DELAY)
    assert sock.frames == [b'{"t":"ack","rid":"a1","upto":3}']
    acker.on_event(4, message=False)  # no send comes: alone, after the lazy delay
    await asyncio.sleep(0.1)
    assert len(sock.frames) == 1
    await asyncio.sleep(0.2)
    assert sock.frames[1:] == [b'{"t":"ack","rid":"a2","upto":4}'] and not acker.ack_pending
