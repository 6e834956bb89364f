"""Writing to device inboxes inside a transaction: the one place that hands out `iseq`s.

No statement here uses `RETURNING`: SQLite answers one through an ephemeral table (a b-tree and
a page cache opened and torn down per statement), which cost the message path eight of them
per delivered message. A device's next `iseq` is read with the device rows the caller reads
anyway (`targets_of`, or the send's member query) and written back with the entry."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import NamedTuple

from pigeon.domain.events import Delivery

#: A device id and its `next_iseq` as read in the running transaction, after any append to
#: that device in it: the `iseq` its next entry gets.
Target = tuple[str, int]
#: The largest integer SQLite stores: `iseq <= _LAST_ISEQ` is every entry.
_LAST_ISEQ = 2**63 - 1


def targets_of(conn: sqlite3.Connection, user_ids: Iterable[str]) -> list[Target]:
    """The devices of the given users with their next `iseq`, stable order (oldest first)."""
    ids = list(user_ids)
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    sql = (
        f"SELECT id, next_iseq FROM devices WHERE user_id IN ({marks})"
        " ORDER BY user_id, created_at, id"
    )
    return conn.execute(sql, ids).fetchall()


def append(
    conn: sqlite3.Connection,
    device_ids: Iterable[str],
    raw: bytes,
    at: int,
    message_id: str | None = None,
) -> list[Delivery]:
    """`append_to` for callers that hold only device ids (a device that is gone is skipped)."""
    targets: list[Target] = []
    for device_id in device_ids:
        row = conn.execute("SELECT next_iseq FROM devices WHERE id = ?", (device_id,)).fetchone()
        if row is not None:
            targets.append((device_id, row[0]))
    return append_to(conn, targets, raw, at, message_id)


def append_to(
    conn: sqlite3.Connection,
    targets: list[Target],
    raw: bytes,
    at: int,
    message_id: str | None = None,
) -> list[Delivery]:
    """Append one event to each target's inbox and move its counter. A message entry stores
    only its message id (the body lives once, in `messages`); any other event stores its
    encoded payload."""
    if not targets:
        return []
    payload = None if message_id is not None else raw
    conn.executemany(
        "INSERT INTO inbox (device_id, iseq, message_id, payload, at) VALUES (?, ?, ?, ?, ?)",
        [(device_id, iseq, message_id, payload, at) for device_id, iseq in targets],
    )
    conn.executemany(
        "UPDATE devices SET next_iseq = ? WHERE id = ?",
        [(iseq + 1, device_id) for device_id, iseq in targets],
    )
    return [Delivery(device_id, iseq, raw) for device_id, iseq in targets]


class Taken(NamedTuple):
    """A message an ack took entries of out of an inbox, with what its row said then."""

    chat_id: str
    seq: int
    pending: int
    entries: int = 1


def take(conn: sqlite3.Connection, device_id: str, upto: int | None = None) -> dict[str, Taken]:
    """Delete the device's entries up to `upto` (all of them when None) and count them off
    their messages (`release_messages`); returns the messages whose entries were taken."""
    args = (device_id, _LAST_ISEQ if upto is None else upto)
    taken: dict[str, Taken] = {}
    for message_id, chat_id, seq, pending in conn.execute(
        "SELECT i.message_id, m.chat_id, m.seq, m.pending FROM inbox i JOIN messages m"
        " ON m.id = i.message_id WHERE i.device_id = ? AND i.iseq <= ?",
        args,
    ):
        seen = taken.get(message_id)
        taken[message_id] = (
            Taken(chat_id, seq, pending)
            if seen is None
            else seen._replace(entries=seen.entries + 1)
        )
    conn.execute("DELETE FROM inbox WHERE device_id = ? AND iseq <= ?", args)
    release_messages(conn, taken)
    return taken


def release_messages(conn: sqlite3.Connection, taken: dict[str, Taken]) -> None:
    """The `taken` entries are gone: count them off their messages, and forget bodies nobody
    awaits any more (with their push previews, and the chat's preview when it quotes one)."""
    kept = []
    done = []
    for message_id, t in taken.items():
        left = t.pending - t.entries
        if left > 0:
            kept.append((left, message_id))
        else:
            done.append((left, message_id))
    if kept:
        conn.executemany("UPDATE messages SET pending = ? WHERE id = ?", kept)
    if done:
        conn.executemany(
            "UPDATE messages SET pending = ?, raw = NULL, push_preview = NULL WHERE id = ?", done
        )
        conn.executemany(
            "UPDATE chats SET last_preview = NULL WHERE id = ? AND last_seq = ?",
            [(taken[message_id].chat_id, taken[message_id].seq) for _, message_id in done],
        )
