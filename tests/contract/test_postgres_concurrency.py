"""The PostgreSQL store under concurrent writers on several nodes: per-chat `seq` and per-device
`iseq` stay gap-free, each device's inbox keeps every chat in seq order, bodies are released
exactly once, and the lock order leaves PostgreSQL no deadlock to break."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pigeon.adapters.store.postgres import PostgresStore
from pigeon.domain.events import Delivery, Message, decode_event
from pigeon.domain.models import ChatInfo, Device
from pigeon.ports import SendResult
from tests.contract.test_store import T0, chat, device, send_req, user
from tests.support.postgres import fresh_database

NODES = 4


@pytest.fixture
async def nodes(pg_dsn: str) -> AsyncIterator[list[PostgresStore]]:
    """Stores on one database, as several nodes would have."""
    stores = [PostgresStore(pg_dsn, min_connections=1, max_connections=4) for _ in range(NODES)]
    await asyncio.gather(*(s.open() for s in stores))
    yield stores
    await asyncio.gather(*(s.aclose() for s in stores))


class Ledger:
    """Every inbox entry the store reported as written, per device."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[int, bytes]] = defaultdict(dict)

    def add(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            assert d.iseq not in self.entries[d.device], f"iseq {d.iseq} handed out twice"
            self.entries[d.device][d.iseq] = d.raw

    def check_device(self, device_id: str, head: int) -> None:
        """Gap-free 1..head, and within each chat, messages in seq order."""
        got = self.entries[device_id]
        assert sorted(got) == list(range(1, head + 1)), device_id
        last: dict[str, int] = {}
        for iseq in sorted(got):
            event = decode_event(got[iseq])
            if isinstance(event, Message):
                assert event.seq > last.get(event.chat, 0), (device_id, iseq, event.seq)
                last[event.chat] = event.seq


async def test_nodes_writing_one_chat_concurrently_keep_every_order(
    nodes: list[PostgresStore], pg_dsn: str
) -> None:
    setup = nodes[0]
    users = [await user(setup, f"u{i}") for i in range(4)]
    devices = [await device(setup, u) for u in users for _ in range(2)]
    ledger = Ledger()
    group = await chat(setup, *users)
    directs = [await chat(setup, users[0], users[1]), await chat(setup, users[2], users[3])]
    for d in devices:  # the chat_updates of the setup
        page = await setup.messages.read_inbox(d.id, 0, 100)
        ledger.add([Delivery(d.id, e.iseq, e.raw) for e in page.entries])
    sent: dict[str, list[int]] = defaultdict(list)

    async def client(k: int, d: Device) -> None:
        direct = directs[0] if k < 4 else directs[1]
        for i in range(12):
            node = nodes[(k + i) % NODES]
            for c in (group, direct):
                result: SendResult = await node.messages.send(send_req(c, d, f"{k}.{i}"))
                ledger.add(result.deliveries)
                sent[c.id].append(result.message.seq)
            page = await node.messages.read_inbox(d.id, 0, 1000)
            if page.entries:
                ledger.add(await node.messages.ack(d, page.entries[-1].iseq, T0 + i))
            if i % 3 == 2:
                ledger.add(await node.messages.mark_read(d, group.id, 10_000, T0 + i))

    await asyncio.gather(*(client(k, d) for k, d in enumerate(devices)))
    assert sorted(sent[group.id]) == list(range(1, 8 * 12 + 1))
    for c in directs:
        assert sorted(sent[c.id]) == list(range(1, 4 * 12 + 1))
    for _ in range(2):  # drain (twice: for the receipts the first round writes)
        for d in devices:
            page = await setup.messages.read_inbox(d.id, 0, 10_000)
            ledger.check_device(d.id, page.head)
            ledger.add(await setup.messages.ack(d, page.head, T0 + 99))
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM inbox") == 0
        kept = await conn.fetchval("SELECT count(*) FROM messages WHERE raw IS NOT NULL")
        pending = await conn.fetchval("SELECT count(*) FROM messages WHERE pending <> 0")
        assert (kept, pending) == (0, 0)
    finally:
        await conn.close()
    assert [n.db.retries for n in nodes] == [0] * NODES  # no deadlock had to be broken


_NODE_SCRIPT = """
import asyncio, json, sys
from pigeon.adapters.store.postgres import PostgresStore
from pigeon.domain.models import Device
from pigeon.domain.ids import new_id
from pigeon.ports import SendRequest

async def main(dsn, chat, user, device, count):
    store = PostgresStore(dsn, min_connections=1, max_connections=4)
    await store.open()
    print("ready", flush=True)
    sys.stdin.readline()
    me = Device(id=device, user_id=user, name="d", created_at=0)

    async def one(i):
        r = await store.messages.send(SendRequest(
            message_id=new_id(), chat=chat, sender=user, sender_device=device, cmid=str(i),
            at=1, body=str(i), attachment=None, preview=None))
        page = await store.messages.read_inbox(device, 0, 1000)
        if page.entries:
            await store.messages.ack(me, page.entries[-1].iseq, 2)
        return r.message.seq

    seqs = await asyncio.gather(*(one(i) for i in range(count)))
    print(json.dumps({"seqs": seqs, "retries": store.db.retries}), flush=True)
    await store.aclose()

asyncio.run(main(*sys.argv[1:5], int(sys.argv[5])))
"""


async def test_processes_sending_into_one_chat_get_gap_free_seqs() -> None:
    count, procs = 25, 3
    async with fresh_database() as dsn:
        setup = PostgresStore(dsn, min_connections=1, max_connections=2)
        await setup.open()
        try:
            users = [await user(setup, f"p{i}") for i in range(procs)]
            devices = [await device(setup, u) for u in users]
            silent = await user(setup, "silent")  # a member who only receives
            reader = await device(setup, silent)
            g: ChatInfo = await chat(setup, *users, silent)
            children = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _NODE_SCRIPT,
                    dsn,
                    g.id,
                    d.user_id,
                    d.id,
                    str(count),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                for d in devices
            ]
            for p in children:  # every node is up before any sends
                assert p.stdout is not None
                assert (await p.stdout.readline()).strip() == b"ready"
            for p in children:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                await p.stdin.drain()
            outputs = [json.loads((await p.communicate())[0]) for p in children]
            assert [p.returncode for p in children] == [0] * procs
            seqs = sorted(s for out in outputs for s in out["seqs"])
            assert seqs == list(range(1, procs * count + 1))
            assert [out["retries"] for out in outputs] == [0] * procs
            page = await setup.messages.read_inbox(reader.id, 0, 10_000)
            assert [e.iseq for e in page.entries] == list(range(1, procs * count + 2))
            in_order = [decode_event(e.raw) for e in page.entries[1:]]
            assert [m.seq for m in in_order if isinstance(m, Message)] == seqs
        finally:
            await setup.aclose()
