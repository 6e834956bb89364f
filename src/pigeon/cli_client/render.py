"""What the client commands print: one line per event, plain tables, progress bars.

Kept apart from the commands so that the wording is in one place and every line is plain text a
person can read and `grep`/`cut` can take apart (ids in full, one record per line); `--json`
output is the wire form, one object per line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pigeon.client import (
    ChatUpdate,
    DeviceList,
    Event,
    KeysExhausted,
    Message,
    ReadState,
    Receipt,
    ToDevice,
)
from pigeon.client.media import Progress as ProgressCallback

_encode = msgspec.json.Encoder().encode


class Names:
    """User ids shown as usernames where this machine knows them (its saved logins), else as
    ids: the server has no id-to-name lookup, and one request per line would not be cheap.
    `reload` is asked again (once per unknown id) for users who logged in since."""

    def __init__(
        self,
        known: Mapping[str, str],
        me: str | None = None,
        reload: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.known = dict(known)
        self.me = me
        self._reload = reload
        self._missed: set[str] = set()

    def __call__(self, user: str) -> str:
        if user not in self.known and self._reload is not None and user not in self._missed:
            self._missed.add(user)
            self.known.update(self._reload())
        return self.known.get(user, user)


def event_json(event: Event) -> str:
    """An event as one JSON line (its wire form, `type` included)."""
    return _encode(event).decode()


def event_line(event: Event, names: Names) -> str:
    """An event as one human-readable line; every line starts with its kind and chat id."""
    if isinstance(event, Message):
        return f"message {event.chat} #{event.seq} {names(event.sender)}: {message_text(event)}"
    if isinstance(event, Receipt):
        return (
            f"receipt {event.chat} {names(event.user)} {event.kind} up to #{event.seq}"
            f" (everyone: #{event.all_seq})"
        )
    if isinstance(event, ChatUpdate):
        return f"chat    {event.chat.id} {chat_change(event, names)}"
    if isinstance(event, DeviceList):
        return f"device  {names(event.user)} {event.change}: {event.device}"
    if isinstance(event, KeysExhausted):
        return "keys    this device's one-time keys ran out (its fallback key was handed out)"
    if isinstance(event, ToDevice):
        return f"to-device from {names(event.sender)} ({event.sender_device}): {event.payload}"
    assert isinstance(event, ReadState)
    return f"read    {event.chat} read up to #{event.seq} on another device"


def message_text(message: Message) -> str:
    """A message's body, and its attachment in brackets (with the id `pigeon download` takes)."""
    parts = [message.body] if message.body else []
    if message.e2e:  # the CLI holds no keys: it cannot read it
        parts.append(f"[encrypted, {message.e2e.algorithm}]")
    att = message.attachment
    if att is not None:
        about = ", ".join(
            x
            for x in (
                att.filename,
                att.content_type,
                size(att.size) if att.size is not None else None,
                "encrypted" if att.encrypted else None,
            )
            if x
        )
        parts.append(f"[attachment {att.id}: {about}]")
    return " ".join(parts)


def chat_change(update: ChatUpdate, names: Names) -> str:
    """`created by alice: direct, alice + bob` and the like."""
    chat, by = update.chat, names(update.by)
    if update.change == "created":
        who = " + ".join(names(m.user) for m in chat.members)
        title = f"group {chat.name!r}" if chat.name else chat.kind
        return f"created by {by}: {title}, {who}"
    if update.change == "left":
        return f"{', '.join(names(u) for u in update.removed) or by} left"
    changes = [f"+{names(u)}" for u in update.added] + [f"-{names(u)}" for u in update.removed]
    return f"members changed by {by}: {' '.join(changes)}"


def size(n: int) -> str:
    """A byte count for people: 512 B, 15.3 KiB, 2.0 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def when(ms: int) -> str:
    """A server timestamp (ms since the epoch) in local time, to the second."""
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Iterator[str]:
    """Left-aligned columns separated by two spaces (the last column is not padded)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        yield "  ".join([*cells, row[-1]]).rstrip()


def chat_rows(chats: Sequence[Mapping[str, Any]], names: Names) -> Iterator[str]:
    """The conversation list as a table: id, kind, who or what, unread, last message."""
    rows = []
    for chat in chats:
        others = [names(m) for m in chat["members"] if m != names.me]
        if chat["kind"] == "direct":
            title = others[0] if others else "(yourself)"
        else:
            title = chat["name"] or f"({len(chat['members'])} members)"
        preview = chat["last_preview"]
        if preview is None:
            preview = "(no text)" if chat["last_sender"] is not None else ""
        if len(preview) > 50:
            preview = preview[:49] + "…"
        if chat["last_sender"] is not None:
            preview = f"{names(chat['last_sender'])}: {preview}"
        rows.append([chat["id"], chat["kind"], title, str(chat["unread"]), preview])
    return table(["ID", "KIND", "WITH / NAME", "UNREAD", "LAST MESSAGE"], rows)


def device_rows(devices: Sequence[Mapping[str, Any]], mine: str | None) -> Iterator[str]:
    """A user's devices as a table, the one in use marked."""
    rows = [
        [d["id"], d["name"], when(d["created_at"]), "this device" if d["id"] == mine else ""]
        for d in devices
    ]
    return table(["ID", "NAME", "CREATED", ""], rows)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[ProgressCallback]:
    """A progress bar on stderr for one transfer, fed by the SDK's progress callback. On a
    terminal only: piped or redirected output gets no bar (nor its escape codes)."""
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task(description, total=total)

    def update(done: int, of: int | None) -> None:
        bar.update(task, completed=done, total=of if of is not None else total)

    with bar:
        yield update
