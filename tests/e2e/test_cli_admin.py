"""`pigeon admin` as an operator runs it, on a data dir with no server running: what each
listing prints (tables, and `--json` one object per line), and errors as one line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, Device, Member, User
from pigeon.ports import SendRequest
from tests.conftest import STACK

# The command line does not depend on the stack (test_admin.py runs it on both): once is enough.
pytestmark = pytest.mark.skipif(STACK != "embedded", reason="the same on every stack")

_PIGEON = [sys.executable, "-c", "from pigeon.cli import main; main()"]
T0 = 1_700_000_000_000


async def pigeon(data_dir: Path, *args: str) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PIGEON_LOG_JSON": "false",
        "PIGEON_DATA_DIR": str(data_dir),
        "PIGEON_ARGON2_TIME_COST": "1",
        "PIGEON_ARGON2_MEMORY_KIB": "8",
    }
    proc = await asyncio.create_subprocess_exec(
        *_PIGEON,
        "admin",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok(data_dir: Path, *args: str) -> str:
    code, out, err = await pigeon(data_dir, *args)
    assert code == 0 and "Traceback" not in err, err
    return out


def objects(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


async def seed(data_dir: Path) -> tuple[str, str]:
    """bob (two devices) and carol (one) in a group with alice; bob sends 3 messages. Returns
    the group's id and carol's device id."""
    store = SqliteStore(data_dir / "pigeon.db", synchronous="NORMAL")
    await store.open()
    try:
        users = {}
        for name in ("bob", "carol"):
            users[name] = User(id=new_id(), username=name, created_at=T0)
            await store.accounts.create_user(users[name], "not a real hash")
        devices = []
        for i, name in enumerate(("bob", "bob", "carol")):
            device = Device(id=new_id(), user_id=users[name].id, name=f"d{i}", created_at=T0)
            await store.accounts.add_device(device, f"token{i}".encode(), 3)
            devices.append(device)
        alice = await store.accounts.user_by_name("alice")
        assert alice is not None
        group = ChatInfo(
            id=new_id(),
            kind="group",
            name="plans",
            created_by=users["bob"].id,
            created_at=T0,
            members=[
                Member(user=users["bob"].id, role="admin"),
                Member(user=users["carol"].id),
                Member(user=alice.id),
            ],
        )
        await store.chats.create_chat(group)
        for i in range(3):
            await store.messages.send(
                SendRequest(
                    message_id=new_id(),
                    chat=group.id,
                    sender=users["bob"].id,
                    sender_device=devices[0].id,
                    cmid=f"c{i}",
                    at=T0 + i,
                    body=f"m{i}",
                    attachment=None,
                    preview=f"m{i}",
                )
            )
        await store.messages.mark_read(devices[2], group.id, 2, T0 + 9)
        return group.id, devices[2].id
    finally:
        await store.aclose()


async def test_the_admin_commands_on_a_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = await ok(data, "users", "create", "alice", "--password", "correct horse battery")
    assert out.startswith("created alice (")
    group, carol_device = await seed(data)
    out = await ok(data, "users", "disable", "CAROL")
    assert "disabled carol" in out and "1 devices" in out
    assert f"no server is running on {data}" in out  # nothing connected: nothing to close
    code, _, err = await pigeon(data, "users", "create", "bob", "--password", "long enough")
    assert code == 1 and err.strip() == "pigeon: error: username 'bob' is taken"
    await ok(data, "invites", "create", "--count", "2", "--valid-days", "3")

    # the reads, at once
    (
        listed,
        page,
        chats,
        shown,
        shown_json,
        stats,
        devices,
        invites,
        dead,
        missing,
    ) = await asyncio.gather(
        ok(data, "users", "list", "--json"),
        ok(data, "users", "list", "--after", "alice", "--limit", "1"),
        ok(data, "chats", "list", "--user", "carol", "--json"),
        ok(data, "chats", "show", group),
        ok(data, "chats", "show", group, "--json"),
        ok(data, "stats", "--json"),
        ok(data, "devices", "list", "carol"),
        ok(data, "invites", "list", "--json"),
        ok(data, "push-dlq", "list"),  # the same as `pigeon push dlq list`
        pigeon(data, "devices", "list", "nobody"),
    )
    users = {u["username"]: u for u in objects(listed)}
    assert list(users) == ["alice", "bob", "carol"]
    assert [users[n]["devices"] for n in users] == [0, 2, 1]
    assert users["carol"]["disabled_at"] is not None and users["bob"]["disabled_at"] is None
    header, *rows = page.splitlines()
    assert header.split() == ["USERNAME", "ID", "CREATED", "DEVICES", "DISABLED"]
    assert [r.split()[0] for r in rows] == ["bob"]

    (chat,) = objects(chats)
    assert (chat["id"], chat["kind"], chat["name"], chat["members"], chat["last_seq"]) == (
        group,
        "group",
        "plans",
        3,
        3,
    )
    title, header, *members = shown.splitlines()
    assert title.startswith(f"group chat 'plans' {group}: created ") and "3 messages" in title
    assert header.split() == ["USERNAME", "USER", "ID", "ROLE", "DELIVERED", "READ"]
    assert [m.split()[0] for m in members] == ["bob", "carol", "alice"]
    detail = json.loads(shown_json)
    assert [(m["username"], m["role"], m["read_seq"]) for m in detail["members"]] == [
        ("bob", "admin", 3),  # a sender has read what they sent
        ("carol", "member", 2),
        ("alice", "member", 0),
    ]

    counts = json.loads(stats)
    assert {k: counts[k] for k in ("users", "disabled_users", "devices", "chats")} == {
        "users": 3,
        "disabled_users": 1,
        "devices": 3,
        "chats": 1,
    }
    # chat_update x 3 devices, 3 messages x 2 (carol's, bob's other), carol's receipt x 2
    assert (counts["messages"], counts["bodies"], counts["inbox_entries"]) == (3, 3, 11)
    assert counts["oldest_inbox_age"] > 0
    assert (counts["push_pending"], counts["dead_letters"]) == (0, 0)

    assert carol_device in devices and devices.splitlines()[0].split() == ["ID", "NAME", "CREATED"]
    assert [b["count"] for b in objects(invites)] == [2]
    assert dead.strip() == "no dead letters"
    code, out, err = missing
    assert (code, out) == (1, "")
    assert err.strip() == "pigeon: error: no user named 'nobody'"
