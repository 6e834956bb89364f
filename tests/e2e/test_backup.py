"""`pigeon backup` of a running one-node server, then `pigeon restore` into a fresh data
directory: the restored server has every message and media file the backup saw, nothing sent
after it, and its signed URLs and keys still work."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import pytest

from pigeon.client import PigeonClient, login, register
from pigeon.domain.events import Message
from tests.conftest import PASSWORD, STACK, next_of
from tests.support.cluster import Node

pytestmark = pytest.mark.skipif(STACK != "embedded", reason="the embedded store's backup")

ENV = {"PIGEON_ARGON2_TIME_COST": "1", "PIGEON_ARGON2_MEMORY_KIB": "8"}


async def pigeon(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from pigeon.cli import main; main()",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_backup_of_a_running_server_restores_elsewhere(tmp_path: Path) -> None:
    live, backup, restored = tmp_path / "live", tmp_path / "backup", tmp_path / "restored"
    node = Node(ENV, live)
    await node.start()
    try:
        await register(node.url, "alice", PASSWORD)
        bob_id = await register(node.url, "bob", PASSWORD)
        alice_acc = await login(node.url, "alice", PASSWORD)
        bob_acc = await login(node.url, "bob", PASSWORD)  # bob's device exists: he gets all
        photo = tmp_path / "photo.bin"
        photo.write_bytes(b"\x89PNG not really" * 1000)
        async with PigeonClient(node.url, alice_acc.token) as alice:
            chat = (await alice.create_chat([bob_id]))["id"]
            before = [(await alice.send(chat, f"before {i}")).id for i in range(3)]
            before.append((await alice.send_file(chat, photo, "the file")).id)
            code, out = await pigeon("backup", str(backup), "--data-dir", str(live))
            assert code == 0 and "media files" in out and " 0 media" not in out, out
            await alice.send(chat, "after the backup")
    finally:
        await node.close()

    code, out = await pigeon("restore", str(backup), "--data-dir", str(restored))
    assert code == 0, out
    code, out = await pigeon("restore", str(backup), "--data-dir", str(restored))
    assert code == 1 and out.startswith("pigeon: error: ") and "exists" in out  # never overwrites

    node = Node(ENV, restored)
    await node.start()
    try:
        async with PigeonClient(node.url, bob_acc.token) as bob:  # the same token works
            got = [await next_of(bob, Message, timeout=10) for _ in range(4)]
            assert [m.id for m in got] == before
            with pytest.raises(TimeoutError):  # what came after the backup is not there
                await next_of(bob, Message, timeout=0.5)
            att = got[3].attachment
            assert att is not None
            size = await bob.download(att.id, tmp_path / "copy.bin", sha256=att.sha256)
            assert size == photo.stat().st_size
            digest = hashlib.sha256((tmp_path / "copy.bin").read_bytes()).hexdigest()
            assert digest == hashlib.sha256(photo.read_bytes()).hexdigest()
    finally:
        await node.close()
