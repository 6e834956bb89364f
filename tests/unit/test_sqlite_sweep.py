"""The SQLite sweep keeps deleting in chunks until every expired table is empty."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pigeon.adapters.store.sqlite import SqliteStore, messages
from tests.contract.test_store import T0, chat, device, send_req, user


async def test_sweep_runs_until_the_receipt_log_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messages, "_SWEEP_CHUNK", 2)
    store = SqliteStore(tmp_path / "s.db", synchronous="NORMAL")
    await store.open()
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
