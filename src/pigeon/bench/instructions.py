"""`pigeon bench instructions`: instructions per delivered message on the SQLite store path,
counted by callgrind, a figure that does not move with the machine's load (CPU time on a
shared 2-core VM varies ~2x from day to day, and by 10% from run to run).

The workload drives `SqliteStore` through its port, with no sockets and no gateway: each round,
every one of `pairs` senders sends a message into its chat; every recipient then acks it; every
sender then acks the delivered receipt it got back (what the SDK's riding ack does). A round's
jobs reach the writer together, a few per commit, as at moderate load. The store runs on its
writer thread and reader threads, all counted.

Two runs under `valgrind --tool=callgrind`, of `short` and of `long` rounds: their difference,
divided by the messages between them, leaves out the interpreter's start-up, the schema and the
accounts. Callgrind runs the process ~50x slower; the default rounds take ~15 s in all.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, Device, Member, User
from pigeon.ports import SendRequest

_T0 = 1_700_000_000_000
_COLLECTED = re.compile(rb"Collected\s*:\s*(\d+)")


class NoValgrind(RuntimeError):
    """valgrind is not installed (`apt-get install valgrind`)."""


@dataclass(frozen=True)
class Params:
    """The workload: `pairs` chats, `short` and `long` rounds of one message per chat."""

    pairs: int = 10
    short: int = 5
    long: int = 25
    size: int = 100
    synchronous: str = "FULL"


@dataclass(frozen=True)
class Result:
    """Instructions of both runs and per delivered message (store path, every thread)."""

    short_instructions: int
    long_instructions: int
    messages: int
    per_message: int


async def drive(
    path: Path, pairs: int, rounds: int, size: int, synchronous: str, per_ack: int = 1
) -> int:
    """Run the workload on a fresh store at `path`; returns the messages delivered. Each round
    every sender sends `per_ack` messages (all at once) before its recipient acks them."""
    store = SqliteStore(path, synchronous=synchronous)
    await store.open()
    try:
        chats = [await _pair(store, k) for k in range(pairs)]
        body = "x" * size
        for _ in range(rounds):
            await asyncio.gather(
                *(
                    store.messages.send(_request(chat, sender, body))
                    for sender, _, chat in chats
                    for _ in range(per_ack)
                )
            )
            await asyncio.gather(*(store.messages.ack(to, 1 << 62, _T0) for _, to, _ in chats))
            await asyncio.gather(*(store.messages.ack(fr, 1 << 62, _T0) for fr, _, _ in chats))
    finally:
        await store.aclose()
    return pairs * rounds * per_ack


async def _pair(store: SqliteStore, k: int) -> tuple[Device, Device, ChatInfo]:
    devices = []
    for name in (f"s{k}", f"r{k}"):
        user = User(id=new_id(), username=name, created_at=_T0)
        await store.accounts.create_user(user, "hash")
        device = Device(id=new_id(), user_id=user.id, name="bench", created_at=_T0)
        await store.accounts.add_device(device, new_id().encode(), 1)
        devices.append(device)
    sender, recipient = devices
    info = ChatInfo(
        id=new_id(),
        kind="group",
        name="bench",
        created_by=sender.user_id,
        created_at=_T0,
        members=[Member(user=sender.user_id, role="admin"), Member(user=recipient.user_id)],
    )
    chat, _ = await store.chats.create_chat(info)
    return sender, recipient, chat


def _request(chat: ChatInfo, sender: Device, body: str) -> SendRequest:
    return SendRequest(
        message_id=new_id(),
        chat=chat.id,
        sender=sender.user_id,
        sender_device=sender.id,
        cmid=new_id(),
        at=_T0 + 1,
        body=body,
        attachment=None,
        preview=body[:40],
    )


def count(p: Params) -> Result:
    """Both runs under callgrind, and the instructions per message between them."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise NoValgrind("needs valgrind (apt-get install valgrind)")
    short = _instructions(valgrind, p, p.short)
    long = _instructions(valgrind, p, p.long)
    messages = p.pairs * (p.long - p.short)
    return Result(short, long, messages, (long - short) // max(messages, 1))


def _instructions(valgrind: str, p: Params, rounds: int) -> int:
    with tempfile.TemporaryDirectory(prefix="pigeon-instructions-") as tmp:
        cmd = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/callgrind.out",
            sys.executable,
            "-m",
            "pigeon.bench.instructions",
            str(Path(tmp) / "store.db"),
            str(p.pairs),
            str(rounds),
            str(p.size),
            p.synchronous,
        ]
        done = subprocess.run(cmd, capture_output=True, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"callgrind run failed ({done.returncode}): {tail}")
    return int(found.group(1))


def summary(p: Params, r: Result) -> list[tuple[str, str]]:
    """Lines for the console."""
    return [
        ("workload", f"{p.pairs} pairs, {p.size}-byte bodies, synchronous={p.synchronous}"),
        ("runs", f"{p.short} rounds: {r.short_instructions:,}; {p.long}: {r.long_instructions:,}"),
        ("per message", f"{r.per_message:,} instructions ({r.messages} messages between runs)"),
    ]


if __name__ == "__main__":  # one run, under callgrind: store path, pairs, rounds, size, mode
    db, n_pairs, n_rounds, n_size, mode = sys.argv[1:6]
    asyncio.run(drive(Path(db), int(n_pairs), int(n_rounds), int(n_size), mode))
