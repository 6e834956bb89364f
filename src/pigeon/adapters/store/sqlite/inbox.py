"""Writing to device inboxes inside a transaction: the one place that hands out `iseq`s."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from pigeon.domain.events import Delivery


def devices_of(conn: sqlite3.Connection, user_ids: Iterable[str]) -> list[str]:
    """Device ids of the given users, stable order (oldest device first)."""
    ids = list(user_ids)
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    sql = f"SELECT id FROM devices WHERE user_id IN ({marks}) ORDER BY user_id, created_at, id"
    return [row[0] for row in conn.execute(sql, ids)]


def append(
    conn: sqlite3.Connection,
    device_ids: Iterable[str],
    raw: bytes,
    at: int,
    message_id: str | None = None,
) -> list[Delivery]:
    """Append one event to each device's inbox. A message entry stores only its message id
    (the body lives once, in `messages`); any other event stores its encoded payload."""
    payload = None if message_id is not None else raw
    out: list[Delivery] = []
    for device_id in device_ids:
        row = conn.execute(
            "UPDATE devices SET next_iseq = next_iseq + 1 WHERE id = ? RETURNING next_iseq - 1",
            (device_id,),
        ).fetchone()
        if row is None:
            continue
        iseq = row[0]
        conn.execute(
            "INSERT INTO inbox (device_id, iseq, message_id, payload, at) VALUES (?, ?, ?, ?, ?)",
            (device_id, iseq, message_id, payload, at),
        )
        out.append(Delivery(device_id, iseq, raw))
    return out


def release_messages(conn: sqlite3.Connection, counts: dict[str, int]) -> None:
    """`counts[message_id]` inbox entries of that message are gone: forget bodies nobody awaits
    (with their push previews, and the chat's preview when it quotes such a body)."""
    for message_id, n in counts.items():
        row = conn.execute(
            "UPDATE messages SET pending = pending - ?,"
            " raw = CASE WHEN pending - ? <= 0 THEN NULL ELSE raw END,"
            " push_preview = CASE WHEN pending - ? <= 0 THEN NULL ELSE push_preview END"
            " WHERE id = ? RETURNING pending, chat_id, seq",
            (n, n, n, message_id),
        ).fetchone()
        if row is not None and row[0] <= 0:
            conn.execute(
                "UPDATE chats SET last_preview = NULL WHERE id = ? AND last_seq = ?", row[1:]
            )
