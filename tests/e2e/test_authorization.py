"""The authorisation matrix: every WebSocket command that names a chat, a message, a user or an
attachment, and every REST endpoint, tried by those who must be refused: a stranger, a removed
member, another user's device, a revoked device and no token. Each is refused, and the members
see nothing of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pigeon.client import ClientError, PigeonClient
from pigeon.client.http import Account
from pigeon.domain.events import Message
from pigeon.gateway.protocol import COMMAND_NAMES
from tests.conftest import Server, next_of

#: Commands that act on a chat, a message, a user or an attachment, with the fields to send.
SCOPED: dict[str, dict[str, Any]] = {
    "send": {"chat": "{chat}", "cmid": "intruder", "body": "let me in"},
    "read": {"chat": "{chat}", "seq": 1},
    "modify_participants": {"chat": "{chat}", "add": ["{me}"], "remove": []},
    "leave_chat": {"chat": "{chat}"},
    "receipts": {"chat": "{chat}", "message": "{message}"},
    "typing": {"chat": "{chat}", "typing": True},
    "attachment_url": {"attachment": "{attachment}"},
    "presence_subscribe": {"users": ["{member}"]},
    "keys_query": {"users": ["{member}"]},
    "keys_claim": {"devices": ["{member_device}"]},
    "send_to_device": {"messages": [{"device": "{member_device}", "payload": "let me in"}]},
}
#: Commands on the device's own state only (or, for create_chat, open to anyone).
UNSCOPED = {
    "ack",
    "auth",
    "create_attachment",
    "attachment_uploaded",
    "create_chat",
    "list_chats",
    "ping",
    "presence_unsubscribe",
    "set_visibility",
    "sync",
    "push_register",  # the calling device's own target, and its user's setting
    "push_unregister",
    "push_status",
    "push_show_names",
    "keys_upload",  # the calling device's own keys
}


def test_the_matrix_covers_every_command() -> None:
    assert set(SCOPED) | UNSCOPED == set(COMMAND_NAMES)


class World:
    """A group of two members with a message and an attachment, a removed member, a stranger."""

    def __init__(
        self, server: Server, alice_name: str, alice: PigeonClient, bob: PigeonClient
    ) -> None:
        self.server, self.alice_name, self.alice, self.bob = server, alice_name, alice, bob
        self.chat = self.message = self.attachment = ""
        self.outsiders: dict[str, Account] = {}

    def fields(self, command: str, me: str) -> dict[str, Any]:
        values = {
            "{chat}": self.chat,
            "{message}": self.message,
            "{attachment}": self.attachment,
            "{member}": self.bob.user or "",
            "{member_device}": self.bob.device or "",
            "{me}": me,
        }

        def fill(v: Any) -> Any:
            if isinstance(v, list):
                return [fill(x) for x in v]
            if isinstance(v, dict):
                return {k: fill(x) for k, x in v.items()}
            return values.get(v, v) if isinstance(v, str) else v

        return {k: fill(v) for k, v in SCOPED[command].items()}


@pytest.fixture
async def world(make_server: Any, tmp_path: Path) -> World:
    server: Server = await make_server()
    alice_name, _ = await server.user("alice")
    alice = await server.client(await server.device(alice_name))
    w = World(server, alice_name, alice, await server.new_client("bob"))
    removed_name, removed_id = await server.user("carol")
    stranger_name, _ = await server.user("mallory")
    assert w.bob.user
    w.chat = (await w.alice.create_chat([w.bob.user, removed_id], name="inner circle"))["id"]
    await w.alice.modify_participants(w.chat, remove=[removed_id])
    source = tmp_path / "plans.bin"
    source.write_bytes(b"the plans " * 100)
    attachment = await w.alice.upload_file(source)
    w.attachment = attachment["id"]
    w.message = (await w.alice.send(w.chat, "the plans", attachment=w.attachment)).id
    assert (await next_of(w.bob, Message)).id == w.message
    w.outsiders = {
        "stranger": await server.device(stranger_name),
        "removed member": await server.device(removed_name),
    }
    return w


@pytest.mark.parametrize("command", sorted(SCOPED))
@pytest.mark.parametrize("who", ["stranger", "removed member"])
async def test_outsiders_are_refused(world: World, command: str, who: str) -> None:
    outsider = await world.server.client(world.outsiders[who], max_rate_wait=0)
    assert outsider.user
    with pytest.raises(ClientError) as err:
        await outsider.request(command, **world.fields(command, outsider.user))
    assert err.value.code in ("forbidden", "not_found"), err.value
    # nothing reached the members: the next thing bob gets is alice's next message
    later = await world.alice.send(world.chat, "still just us")
    assert (await next_of(world.bob, Message)).id == later.id
    (summary,) = [c for c in await world.alice.list_chats() if c["id"] == world.chat]
    assert outsider.user not in repr(summary)  # not a member, and not the last sender


async def test_tokens_that_must_not_work(world: World) -> None:
    server = world.server
    victim = await server.device(world.alice_name)
    revoked = await server.device(world.alice_name, "old phone")
    async with aiohttp.ClientSession() as http:
        async with http.delete(
            f"{server.url}/v1/devices/{revoked.device}",
            headers={"Authorization": f"Bearer {revoked.token}"},
        ) as resp:
            assert resp.status == 204
        stranger = world.outsiders["stranger"]
        cases = [
            (None, "GET", "/v1/devices", 401),
            (None, "GET", f"/v1/users/{world.alice_name}", 401),
            (None, "DELETE", f"/v1/devices/{victim.device}", 401),
            (revoked.token, "GET", "/v1/devices", 401),
            (revoked.token, "DELETE", f"/v1/devices/{victim.device}", 401),
            ("not-a-token", "GET", "/v1/devices", 401),
            (None, "GET", "/v1/devices/me/push", 401),
            (None, "PUT", "/v1/devices/me/push", 401),
            (None, "DELETE", "/v1/devices/me/push", 401),
            (None, "PUT", "/v1/me/push-show-names", 401),
            (revoked.token, "GET", "/v1/devices/me/push", 401),
            (revoked.token, "DELETE", "/v1/devices/me/push", 401),
            (stranger.token, "DELETE", f"/v1/devices/{victim.device}", None),  # another user's
        ]
        for token, method, path, status in cases:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.request(method, server.url + path, headers=headers) as resp:
                if status is None:
                    assert resp.status in (403, 404), (method, path, resp.status)
                else:
                    assert resp.status == status, (token, method, path, resp.status)
        # the victim's device survived all of it
        async with http.get(
            f"{server.url}/v1/devices", headers={"Authorization": f"Bearer {victim.token}"}
        ) as resp:
            assert resp.status == 200
            assert victim.device in [d["id"] for d in (await resp.json())["devices"]]
        # and the WebSocket: with no token, a first frame other than `auth` closes it (4501)
        ws = await http.ws_connect(f"{server.url}/v1/ws")
        await ws.send_json({"t": "ping", "rid": 1})
        msg = await ws.receive(timeout=5)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert ws.close_code == 4501
        # a revoked token is refused before upgrading
        headers = {"Authorization": f"Bearer {revoked.token}"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{server.url}/v1/ws", headers=headers)
        assert refused.value.status == 401
