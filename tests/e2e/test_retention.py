"""Ephemeral storage: bodies leave once every device acked; everything leaves after retention."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import aiohttp
import asyncpg

from pigeon.app import STORE, SWEEPER
from pigeon.config import DynamoSettings, PostgresSettings
from pigeon.domain.events import Message
from pigeon.gateway.keys import SETTINGS
from tests.conftest import ManualClock, Server, next_of
from tests.support.dynamodb_items import scan

DAY_MS = 86_400_000


async def _bodies(server: Server) -> dict[str, bytes | None]:
    """What the store keeps of each message's body (read straight from the engine)."""
    store = server.app[SETTINGS].store
    if isinstance(store, PostgresSettings):
        conn = await asyncpg.connect(store.dsn)
        try:
            return {r["id"]: r["raw"] for r in await conn.fetch("SELECT id, raw FROM messages")}
        finally:
            await conn.close()
    if isinstance(store, DynamoSettings):  # message items are `C#<chat>`; id pointers too
        items = await scan(store, "messages")
        return {
            i["id"]["S"]: i["raw"]["B"] if "raw" in i else None
            for i in items
            if i["pk"]["S"].startswith("C#")
        }
    path = server.app[STORE].db._path  # type: ignore[attr-defined]
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, raw FROM messages").fetchall())


async def test_body_is_deleted_once_every_device_acked(server: Server) -> None:
    alice = await server.new_client("alice")
    name, bob_id = await server.user("bob")
    phone = await server.client(await server.device(name, "phone"))
    laptop_account = await server.device(name, "laptop")
    chat = await alice.create_chat([bob_id])
    sent = await alice.send(chat["id"], "self-destruct")
    assert (await next_of(phone, Message)).id == sent.id
    await phone.ack(phone._handled)
    assert (await _bodies(server))[sent.id] is not None  # the laptop has not got it yet

    laptop = await server.client(laptop_account, auto_ack=False)
    assert (await next_of(laptop, Message)).id == sent.id
    await laptop.ack(laptop._handled)
    assert (await _bodies(server))[sent.id] is None


async def test_retention_sweeper_expires_everything_and_reports_the_gap(make_server) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    server: Server = await make_server(clock=clock)
    alice = await server.new_client("alice")
    name, bob_id = await server.user("bob")
    bob_account = await server.device(name)
    chat = await alice.create_chat([bob_id])
    old = [await alice.send(chat["id"], f"old {i}") for i in range(3)]

    clock.offset_ms = 31 * DAY_MS
    stats = await server.app[SWEEPER].sweep_once()
    # (>=: on the shared stack the session's database also holds other tests' old messages)
    assert stats.messages >= 3
    assert stats.inbox_entries >= 4  # bob's chat_update and 3 messages (alice's too)
    assert not {m.id for m in old} & set(await _bodies(server))  # gone, not just emptied
    assert (await alice.list_chats())[0]["last_preview"] is None

    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            f"{server.url}/v1/ws", headers={"Authorization": f"Bearer {bob_account.token}"}
        )
        frames = []
        while not frames or frames[-1]["t"] != "synced":
            frames.append(json.loads((await ws.receive(timeout=5)).data))
        assert [f["t"] for f in frames] == ["ready", "gap", "synced"]
        assert (frames[1]["from"], frames[1]["to"], frames[1]["reason"]) == (1, 4, "expired")
        assert frames[-1]["iseq"] == 4
        sent = await alice.send(chat["id"], "fresh")
        frame = json.loads((await ws.receive(timeout=5)).data)
        assert (frame["t"], frame["iseq"], frame["event"]["id"]) == ("event", 5, sent.id)
        await ws.close()
    assert sent.seq == 4


async def test_sweeper_runs_in_the_background(make_server) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    clock.offset_ms = -31 * DAY_MS  # everything sent now looks 31 days old to a later clock
    server: Server = await make_server(clock=clock, sweep_interval=0.05)
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    gone = await alice.send(chat["id"], "soon gone")
    clock.offset_ms = 0
    async with asyncio.timeout(5):
        while (await server.app[SWEEPER].next_sweep()).messages == 0:
            pass  # a sweep that began before the clock moved
    assert gone.id not in await _bodies(server)
