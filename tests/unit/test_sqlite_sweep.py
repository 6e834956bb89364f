"""The SQLite sweep keeps deleting in chunks until every expired table is empty."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from pigeon.adapters.store.sqlite import SqliteStore, sweep
from tests.contract.test_store import T0, chat, device, send_req, user


@pytest.fixture
async def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SqliteStore]:
    """A store at `s.db` whose sweep deletes 2 rows per table, and looks at 2 devices, a chunk."""
    monkeypatch.setattr(sweep, "CHUNK", 2)
    store = SqliteStore(tmp_path / "s.db", synchronous="NORMAL")
    await store.open()
    yield store
    await store.aclose()  # again, if the test did: idempotent


async def test_sweep_runs_until_the_receipt_log_is_empty(
    tmp_path: Path, store: SqliteStore
) -> None:
    a, b = await user(store, "a"), await user(store, "b")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    for i in range(5):
        await store.messages.send(send_req(c, da, f"m{i}"))
        await store.messages.ack(db, 2 * i + 2, T0 + 1)  # chat_update, then the message
        await store.messages.mark_read(db, c.id, i + 1, T0 + 1)
    await store.messages.ack(da, 100, T0 + 1)  # its receipts: the inbox is now empty
    # 5 messages (3 chunks of 2) but 10 receipt-log rows (5 chunks)
    await store.messages.sweep(T0 + 10)
    await store.aclose()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert conn.execute("SELECT count(*) FROM receipt_log").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_sweep_takes_each_expired_prefix_and_keeps_the_young(
    tmp_path: Path, store: SqliteStore
) -> None:
    # chunks of 2 rows and 2 devices: the walk over 7 devices and 5 messages takes several
    a, b = await user(store, "a"), await user(store, "b")
    da = await device(store, a)
    theirs = [await device(store, b, max_devices=5) for _ in range(5)]
    mute = await device(store, a)  # no entries: its counters say so, its inbox is not read
    c = await chat(store, a, b)
    sent = []
    for i, at in enumerate([T0 + 1, T0 + 2, T0 + 3, T0 + 100, T0 + 4]):
        req = msgspec.structs.replace(send_req(c, da, f"m{i}"), at=at)
        sent.append((await store.messages.send(req)).message)
    await store.messages.ack(mute, 100, T0 + 1)

    stats = await store.messages.sweep(T0 + 50)

    # the first three went with the chat's creation (an entry for each device but `mute`,
    # which acked it); the fourth is young, and the fifth (the clock stepped back before it)
    # waits behind it in insertion order, in the messages as in each inbox
    assert (stats.messages, stats.inbox_entries) == (3, 3 * 5 + 6)
    for d in theirs:
        page = await store.messages.read_inbox(d.id, 0, 10)
        assert [e.iseq for e in page.entries] == [5, 6] and page.head == 6
    old = await store.messages.sweep(T0 + 50)
    assert (old.messages, old.inbox_entries) == (0, 0)
    await store.messages.sweep(T0 + 101)
    for d in theirs:
        assert (await store.messages.read_inbox(d.id, 0, 10)).entries == []
    await store.aclose()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM inbox").fetchone() == (0,)
    assert [m.seq for m in sent] == [1, 2, 3, 4, 5]


async def test_an_erased_body_is_in_no_file_after_a_sweep(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "p.db", synchronous="FULL")
    await store.open()
    a, b = await user(store, "a"), await user(store, "b")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    secret = "wobbly-platypus-" * 8
    await store.messages.send(send_req(c, da, secret))
    for _ in range(50):  # padding traffic, so the secret's page is rewritten several times
        await store.messages.send(send_req(c, da, "filler"))
    await store.messages.ack(db, 1000, T0 + 1)  # every body delivered: all erased
    await store.messages.sweep(T0 - 1)  # nothing expired; the WAL is checkpointed and truncated
    assert _files_holding(tmp_path, secret[:16].encode()) == []
    assert (tmp_path / "p.db-wal").stat().st_size == 0
    await store.aclose()


def _files_holding(directory: Path, needle: bytes) -> list[str]:
    return [p.name for p in directory.iterdir() if needle in p.read_bytes()]
