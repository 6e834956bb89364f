"""`pigeon migrate-store`: a real one-node server on SQLite is used, stopped and moved into a fresh
PostgreSQL database by the real command, then `pigeon serve` on PostgreSQL + Redis must carry on
where it stopped: the same tokens, every pending inbox entry with its iseq, the same unread
counts and receipts, seqs and iseqs continuing, the media still there. The push state, the
accounts' settings and the invites (which the server needs no client to fill) are written
through the SQLite store and read back through the PostgreSQL one. And the refusals: a server
still running, a target that holds data, a DSN that leads nowhere, each one line."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pigeon.adapters.store.postgres.push import PgPushQueue
from pigeon.adapters.store.sqlite.push import SqlitePushQueue
from pigeon.adapters.store.sqlite.schema import migrate as migrate_sqlite
from pigeon.app import build_store
from pigeon.client import Account, PigeonClient, login, register
from pigeon.config import load_settings
from pigeon.domain.events import Message
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, Device, Member, User
from pigeon.domain.push import PushTarget
from pigeon.ports import PushQueue, SendRequest, Store
from tests.conftest import PASSWORD, STACK, next_of
from tests.support.cluster import Node, cluster_env
from tests.support.postgres import fresh_database

pytestmark = pytest.mark.skipif(STACK != "embedded", reason="moves the embedded store")

ENV = {
    "PIGEON_ARGON2_TIME_COST": "1",
    "PIGEON_ARGON2_MEMORY_KIB": "8",
    "PIGEON_LOG_JSON": "false",
    "PIGEON_RATE_LIMITS__ENABLED": "false",
}


async def pigeon(*args: str) -> tuple[int, str, str]:
    """The real command line in a process of its own: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from pigeon.cli import main; main()",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def table_counts(out: str) -> dict[str, int]:
    """The rows per table of the command's summary."""
    rows = (line.split() for line in out.splitlines() if line.startswith("  "))
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[1].isdigit()}


def one_line_error(code: int, err: str) -> str:
    assert code == 1 and err.startswith("pigeon: error: ") and err.count("\n") == 1, err
    return err


class Recorder(PigeonClient):
    """The SDK, noting the iseq and bytes of every event frame the server sends it (before the
    SDK drops a duplicate)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.frames: list[tuple[int, bytes]] = []

    def _on_event(self, iseq: int, raw: bytes) -> None:
        self.frames.append((iseq, raw))
        super()._on_event(iseq, raw)


def pending_entries(db: Path, device: str) -> list[tuple[int, bytes]]:
    """What the device's inbox holds in the SQLite file, as the server would send it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT i.iseq, coalesce(i.payload, m.raw) FROM inbox i"
            " LEFT JOIN messages m ON m.id = i.message_id WHERE i.device_id = ? ORDER BY i.iseq",
            (device,),
        ).fetchall()
    finally:
        conn.close()
    return [(iseq, bytes(raw)) for iseq, raw in rows]


async def what_users_see(
    url: str, accounts: dict[str, Account], receipts: list[tuple[str, str]]
) -> dict[str, Any]:
    """Each user's conversation list, and alice's receipts of her messages, read by clients
    that ack nothing (so reading changes nothing)."""
    seen: dict[str, Any] = {}
    for name, account in accounts.items():
        async with PigeonClient(url, account.token, auto_ack=False) as client:
            seen[name] = await client.list_chats()
            if name == "alice":
                seen["receipts"] = [await client.receipts(c, m) for c, m in receipts]
    return seen


async def test_a_sqlite_deployment_moves_to_postgresql(tmp_path: Path, redis_url: str) -> None:
    data = tmp_path / "data"
    node = Node(ENV, data)
    await node.start()
    try:
        ids = {n: await register(node.url, n, PASSWORD) for n in ("alice", "bob", "carol")}
        alice_phone = await login(node.url, "alice", PASSWORD, "phone")
        alice_laptop = await login(node.url, "alice", PASSWORD, "laptop")  # never connects
        bob_phone = await login(node.url, "bob", PASSWORD, "phone")
        bob_tablet = await login(node.url, "bob", PASSWORD, "tablet")  # offline: entries wait
        carol_phone = await login(node.url, "carol", PASSWORD, "phone")
        photo = tmp_path / "photo.bin"
        photo.write_bytes(b"\x89PNG not really" * 3000)
        async with (
            PigeonClient(node.url, alice_phone.token) as alice,
            PigeonClient(node.url, bob_phone.token) as bob,
            PigeonClient(node.url, carol_phone.token) as carol,
        ):
            direct = (await alice.create_chat([ids["bob"]]))["id"]
            group = (await alice.create_chat([ids["bob"], ids["carol"]], name="trip"))["id"]
            texts = [await alice.send(direct, f"hello {i}") for i in range(3)]
            with_file = await alice.send_file(direct, photo, "the photo")
            from_carol = await carol.send(group, "from carol")
            from_alice = await alice.send(group, "from alice")
            received = [await next_of(bob, Message) for _ in range(6)]
            assert {m.id for m in received} == {
                r.id for r in (*texts, with_file, from_carol, from_alice)
            }
            await bob.read(direct, texts[1].seq)  # read 2 of 4: two unread
            await carol.read(group, from_alice.seq)
            code, _, err = await pigeon(
                "migrate-store", "--to", "postgresql://127.0.0.1/unused", "--data-dir", str(data)
            )
            assert "is in use: stop `pigeon serve`" in one_line_error(code, err)
        # closing the clients flushed their acks: bob's phone has the messages delivered
        accounts = {"alice": alice_phone, "bob": bob_phone, "carol": carol_phone}
        asked = [(direct, texts[0].id), (direct, with_file.id), (group, from_alice.id)]
        before = await what_users_see(node.url, accounts, asked)
        bob_direct = next(c for c in before["bob"] if c["id"] == direct)
        assert (bob_direct["unread"], bob_direct["last_seq"]) == (2, 4)
        assert before["receipts"][0]["members"][0]["read_at"] is not None
        assert await node.terminate() == 0
    finally:
        await node.close()

    waiting = pending_entries(data / "pigeon.db", bob_tablet.device)
    assert [i for i, _ in waiting] == list(range(1, len(waiting) + 1))
    assert sum(b'"type":"message"' in raw for _, raw in waiting) == 6

    async with fresh_database() as dsn:
        code, out, err = await pigeon("migrate-store", "--to", dsn, "--data-dir", str(data))
        assert code == 0 and err == "", out + err
        assert "counts verified" in out and "chats.last_preview -> messages.preview" in out, out
        counts = table_counts(out)
        expected = {"users": 3, "devices": 5, "chats": 2, "members": 5, "messages": 6}
        assert {name: counts[name] for name in expected} == expected
        assert counts["inbox"] >= len(waiting) and counts["attachments"] == 1
        code, _, err = await pigeon("migrate-store", "--to", dsn, "--data-dir", str(data))
        assert "is not empty" in one_line_error(code, err)

        node = Node(cluster_env(dsn, redis_url), data)  # same data dir: media and keys
        await node.start()
        try:
            assert await what_users_see(node.url, accounts, asked) == before
            async with Recorder(node.url, bob_tablet.token) as tablet:
                await asyncio.wait_for(tablet.synced.wait(), 10)
                assert tablet.frames == waiting  # every entry once, same iseq, same bytes
                async with (
                    PigeonClient(node.url, alice_phone.token) as alice,
                    PigeonClient(node.url, bob_phone.token, auto_ack=False) as bob,
                ):
                    after = await alice.send(direct, "from PostgreSQL")
                    assert after.seq == with_file.seq + 1
                    assert (await alice.send(group, "and here")).seq == from_alice.seq + 1
                    for _ in waiting:
                        await tablet.next_event(5)
                    assert (await next_of(tablet, Message)).id == after.id
                    assert tablet.frames[len(waiting)][0] == len(waiting) + 1
                    att = next(m for m in received if m.id == with_file.id).attachment
                    assert att is not None
                    size = await bob.download(att.id, tmp_path / "copy.bin", sha256=att.sha256)
                    assert size == photo.stat().st_size
            iseqs = [i for i, _ in tablet.frames]
            assert len(iseqs) == len(set(iseqs))
            carol_new = await login(node.url, "carol", PASSWORD, "new")  # the password hash
            for account, user in ((alice_laptop, "alice"), (carol_new, "carol")):
                async with PigeonClient(node.url, account.token) as client:  # the tokens
                    assert (client.user, client.device) == (ids[user], account.device)
        finally:
            await node.close()


# -- what the server's clients do not show: push state, settings, invites -----------------------


async def fill_push_state(store: Store, queue: PushQueue, now: int) -> dict[str, str]:
    """Two users in a direct chat; dora disabled and with her own settings, eve's device with a
    push target, a dead letter and a job pending again; an invite."""
    dora = User(id=new_id(), username="dora", created_at=now)
    eve = User(id=new_id(), username="eve", created_at=now)
    dora_dev = Device(id=new_id(), user_id=dora.id, name="phone", created_at=now)
    eve_dev = Device(id=new_id(), user_id=eve.id, name="phone", created_at=now)
    for user, device in ((dora, dora_dev), (eve, eve_dev)):
        await store.accounts.create_user(user, f"$argon2id$hash-of-{user.username}")
        await store.accounts.add_device(device, hashlib.sha256(device.id.encode()).digest(), 5)
    chat = ChatInfo(
        id=new_id(),
        kind="direct",
        name=None,
        created_by=dora.id,
        created_at=now,
        members=[Member(user=dora.id), Member(user=eve.id)],
    )
    await store.chats.create_chat(chat)
    await store.push.set_target(eve_dev.id, PushTarget(kind="webhook", url="https://h.test/p"), now)
    await store.push.set_show_names(eve.id, True)
    await store.accounts.set_visibility(dora.id, "nobody")
    await store.accounts.set_last_seen(dora.id, now - 5)
    await queue.configure(grace=1.0, window=30.0)

    async def send(text: str, at: int) -> None:
        req = SendRequest(
            message_id=new_id(),
            chat=chat.id,
            sender=dora.id,
            sender_device=dora_dev.id,
            cmid=new_id(),
            at=at,
            body=text,
            attachment=None,
            preview=text,
            push_preview=f"push: {text}",
        )
        await store.messages.send(req)

    await send("one", now)
    (job,) = await queue.claim(now + 10_000, 10, 60)
    await queue.dead(job, "gateway said no", now + 10_000)
    await send("two", now + 20_000)
    await store.accounts.set_disabled(dora.id, now + 30_000)
    await store.accounts.add_invites([hashlib.sha256(b"code").digest()], now, now + 86_400_000)
    return {"dora": dora.id, "eve": eve.id, "eve_dev": eve_dev.id, "chat": chat.id}


async def push_view(store: Store, queue: PushQueue, ids: dict[str, str], now: int) -> Any:
    return (
        await store.accounts.account("dora"),
        await store.accounts.account("eve"),
        await store.accounts.presence_settings([ids["dora"], ids["eve"]]),
        await store.accounts.list_invites(now),
        await store.push.target_status(ids["eve_dev"]),
        await store.push.context(ids["eve_dev"], ids["chat"], 10),
        await queue.dead_letters(10),
        await queue.next_due(),
        await store.chats.list_chats(ids["eve"]),
    )


async def test_push_state_settings_and_invites_move_too(tmp_path: Path) -> None:
    sqlite_settings = load_settings(None, data_dir=tmp_path)
    store = build_store(sqlite_settings)
    await store.open()
    queue = SqlitePushQueue(store.db)
    now = 1_800_000_000_000
    try:
        ids = await fill_push_state(store, queue, now)
        before = await push_view(store, queue, ids, now)
    finally:
        await store.aclose()
    assert before[6] and before[7] is not None  # a dead letter, a job pending

    async with fresh_database() as dsn:
        code, out, err = await pigeon("migrate-store", "--to", dsn, "--data-dir", str(tmp_path))
        assert code == 0, out + err
        assert "push_dead.id continues after 1" in out, out
        settings = load_settings(None, data_dir=tmp_path, store={"type": "postgres", "dsn": dsn})
        store = build_store(settings)
        await store.open()
        queue = PgPushQueue(store.db)
        try:
            assert await push_view(store, queue, ids, now) == before
            (job,) = await queue.claim(now + 60_000, 10, 60)  # the pending job, as it was
            await queue.dead(job, "again", now + 60_000)
            assert [d.id for d in await queue.dead_letters(10)] == [1, 2]
        finally:
            await store.aclose()


async def test_refusals_are_one_line(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "pigeon.db", isolation_level=None)
    migrate_sqlite(conn)  # an empty store of this version
    conn.close()
    here = ("--data-dir", str(tmp_path))
    code, _, err = await pigeon("migrate-store", "--to", "mysql://db/pigeon", *here)
    assert "--to must be a postgresql:// DSN" in one_line_error(code, err)
    code, _, err = await pigeon(
        "migrate-store", "--to", "postgresql://u:s3cr3tpw@127.0.0.1:1/x", *here
    )
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/x" in one_line_error(code, err)
    assert "s3cr3tpw" not in err
    async with fresh_database() as dsn:
        missing = dsn.rsplit("/", 1)[0] + "/pigeon_no_such_database"
        code, _, err = await pigeon("migrate-store", "--to", missing, *here)
        assert "'pigeon_no_such_database' does not exist" in one_line_error(code, err)
        other = await asyncpg.connect(dsn)
        try:
            await other.execute("CREATE TABLE orders (id integer)")
        finally:
            await other.close()
        code, _, err = await pigeon("migrate-store", "--to", dsn, *here)
        assert "tables that are not Pigeon's (orders)" in one_line_error(code, err)
    code, _, err = await pigeon("migrate-store", "--to", "postgresql://x/y", "--data-dir", "/nope")
    assert "no SQLite database at /nope/pigeon.db" in one_line_error(code, err)
