"""Disabled accounts and `pigeon admin` against a running server: a disable run as a separate
process closes the user's live WebSocket at once (through the node's admin socket on the
embedded stack, through Redis on the shared one), the login and every token of theirs are
refused with `account_disabled`, messages to them wait, and `enable` gives everything back."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from typing import Any

import aiohttp
import pytest

from pigeon.client import Message
from pigeon.config import Settings
from pigeon.gateway.hub import CONTROL_SOCKET
from pigeon.gateway.keys import SERVICES, SETTINGS
from pigeon.services.accounts import DISABLED_FRAME
from tests.conftest import PASSWORD, STACK, Server, next_of, store_env
from tests.e2e.test_bad_input import still_alive

_PIGEON = [sys.executable, "-c", "from pigeon.cli import main; main()"]


def cli_env(settings: Settings) -> dict[str, str]:
    """The environment that gives `pigeon admin` the test server's store and bus."""
    env = {**os.environ, "PIGEON_DATA_DIR": str(settings.data_dir), "PIGEON_LOG_JSON": "false"}
    env |= store_env(settings)
    if settings.bus.type == "redis":
        env |= {"PIGEON_BUS__TYPE": "redis", "PIGEON_REDIS__URL": settings.redis.url}
    return env


async def admin(server: Server, *args: str) -> str:
    """Run `pigeon admin ARGS` as its own process (the server's loop keeps serving meanwhile)
    and return what it printed; it must succeed."""
    proc = await asyncio.create_subprocess_exec(
        *_PIGEON,
        "admin",
        *args,
        env=cli_env(server.app[SETTINGS]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int:
    """The close code the server ends the socket with (frames before it are skipped)."""
    msg = await ws.receive(timeout=10)
    while msg.type == aiohttp.WSMsgType.TEXT:
        msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE, msg
    return int(msg.data)


async def login_status(server: Server, username: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{server.url}/v1/devices", json={"username": username, "password": PASSWORD}
        )
        return resp.status, await resp.json()


async def test_an_admin_disable_closes_live_connections_and_enable_undoes_it(
    server: Server,
) -> None:
    name, user_id = await server.user("dis")
    phone = await server.device(name, "phone")
    tablet = await server.device(name, "tablet")
    friend = await server.new_client("friend")
    chat = await friend.create_chat([user_id])
    phone_ws, tablet_ws = await server.raw_ws(phone), await server.raw_ws(tablet)
    for ws in (phone_ws, tablet_ws):
        await still_alive(ws)  # attached: routed to this node

    out = await admin(server, "devices", "revoke", name, tablet.device)
    assert await closed_with(tablet_ws) == 4502
    assert f"revoked {tablet.device}" in out

    out = await admin(server, "users", "disable", name)
    assert await closed_with(phone_ws) == 4504  # at once, from another process
    assert f"disabled {name} ({user_id}), 1 devices" in out
    via = "through Redis" if STACK != "embedded" else "on the running server"
    assert via in out

    status, body = await login_status(server, name)
    assert (status, body["code"]) == (403, "account_disabled")
    async with aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {phone.token}"}
        resp = await http.get(f"{server.url}/v1/devices", headers=auth)
        assert (resp.status, (await resp.json())["code"]) == (403, "account_disabled")
        # the upgrade answers 401 (clients stop reconnecting on it), the code says why
        resp = await http.get(f"{server.url}/v1/ws", headers=auth)
        assert (resp.status, (await resp.json())["code"]) == (401, "account_disabled")
        ws = await http.ws_connect(f"{server.url}/v1/ws")  # the `auth` frame: error, 4504
        await ws.send_str(json.dumps({"t": "auth", "rid": 1, "token": phone.token}))
        error = json.loads((await ws.receive(timeout=5)).data)
        assert (error["t"], error["code"]) == ("error", "account_disabled")
        assert await closed_with(ws) == 4504
    sent = await friend.send(chat["id"], "while you were away")  # accepted: it waits

    out = await admin(server, "users", "enable", name)
    assert f"enabled {name}" in out
    assert (await login_status(server, name))[0] == 201
    back = await server.client(phone)  # the old token works again, and the message waited
    got = await next_of(back, Message)
    assert (got.id, got.body) == (sent.id, "while you were away")


async def test_disabled_devices_are_refused_however_they_come(server: Server) -> None:
    accounts = server.app[SERVICES].accounts
    name, user_id = await server.user("refused")
    phone = await server.device(name, "phone")
    device = await accounts.authenticate(phone.token)
    ws = await server.raw_ws(phone)
    await still_alive(ws)

    closed = await accounts.disable(user_id)  # as the server's own service does it
    assert [d.id for d in closed] == [phone.device]
    assert await closed_with(ws) == 4504
    # a connection authenticated before the disable but routed after it is turned away
    assert await accounts.standing(device) == "disabled"
    await accounts.enable(user_id)
    assert await accounts.standing(device) == "ok"
    await accounts.revoke(user_id, phone.device)
    assert await accounts.standing(device) == "revoked"


@pytest.mark.skipif(STACK != "embedded", reason="the admin socket is the embedded stack's")
async def test_the_admin_socket_relays_only_close_frames(server: Server) -> None:
    path = server.app[SETTINGS].data_dir / CONTROL_SOCKET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    name, _ = await server.user("sock")
    phone = await server.device(name, "phone")
    ws = await server.raw_ws(phone)
    await still_alive(ws)
    reader, writer = await asyncio.open_unix_connection(path)
    channel = f"d:{phone.device}".encode()
    for line in (
        channel + b' {"t":"event","iseq":1,"event":{}}\n',  # not a close frame
        b"p:" + phone.device.encode() + b" " + DISABLED_FRAME + b"\n",  # not a device channel
        b"garbage\n",
    ):
        writer.write(line)
        assert await reader.readline() == b"refused\n"
    await still_alive(ws)
    writer.write(channel + b" " + DISABLED_FRAME + b"\n")
    assert await reader.readline() == b"ok\n"
    assert await closed_with(ws) == 4504
    writer.close()
    await writer.wait_closed()
