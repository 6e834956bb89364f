"""`GET /v1/schema`: the JSON Schema of every WebSocket frame, checked against real frames.

A session of three devices (alice; bob on two) goes through every kind of frame the server
sends (but `gap`, which only retention makes: its encoding is checked on its own) and many of
the commands: every frame both ways is validated against the served schema, and once more
against a strict copy in which server objects may have no property the schema does not name,
so a field the server sends but the schema forgets fails the test.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

import aiohttp
from jsonschema import Draft202012Validator

from pigeon.gateway import protocol as p
from tests.conftest import Server, ServerFactory

FAST = {"presence": {"grace": 0.0}}
#: A public key (32 bytes) and a signature (64 bytes), as base64: shapes are all the server checks.
KEY = base64.b64encode(bytes(range(32))).decode().rstrip("=")
SIG = base64.b64encode(bytes(range(64))).decode().rstrip("=")


class Peer:
    """A raw WebSocket that records what it sends and receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, sent: list[Any], got: list[Any]):
        self.ws = ws
        self._sent = sent
        self._got = got
        self._rid = 0
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any], valid: bool = True) -> int:
        """Send a command (recorded to be validated, unless it is invalid on purpose)."""
        self._rid += 1
        frame = {**frame, "rid": self._rid}
        if valid:
            self._sent.append(frame)
        await self.ws.send_str(json.dumps(frame))
        return self._rid

    async def until(self, t: str, **fields: Any) -> dict[str, Any]:
        """Receive (and record) frames up to the first of type `t` with these fields."""
        for frame in self.frames:  # received earlier, while waiting for another one
            if frame["t"] == t and all(frame.get(k) == v for k, v in fields.items()):
                self.frames.remove(frame)
                return frame
        while True:
            msg = await self.ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
            self._got.append(frame)
            if frame["t"] == t and all(frame.get(k) == v for k, v in fields.items()):
                return frame
            self.frames.append(frame)

    async def call(self, command: dict[str, Any]) -> Any:
        rid = await self.send(command)
        reply = await self.until("ok", rid=rid)
        return reply["result"]

    async def refused(self, command: dict[str, Any], valid: bool = True) -> dict[str, Any]:
        rid = await self.send(command, valid)
        return await self.until("error", rid=rid)

    async def event(self, kind: str) -> dict[str, Any]:
        for frame in self.frames:
            if frame["t"] == "event" and frame["event"]["type"] == kind:
                self.frames.remove(frame)
                return frame
        skipped = []  # events of other kinds, kept for a later `event`
        while True:
            frame = await self.until("event")
            if frame["event"]["type"] == kind:
                self.frames += skipped
                return frame
            skipped.append(frame)


async def schema_of(server: Server) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/v1/schema") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc: dict[str, Any] = await resp.json()
    Draft202012Validator.check_schema(doc)
    return doc


def validator(doc: dict[str, Any], root: str) -> Draft202012Validator:
    return Draft202012Validator({**doc, "anyOf": [{"$ref": f"#/$defs/{root}"}]})


def strict(doc: dict[str, Any]) -> dict[str, Any]:
    """The schema with every object closed: a property it does not name is an error."""
    out = copy.deepcopy(doc)
    for schema in out["$defs"].values():
        if schema.get("type") == "object":
            schema["additionalProperties"] = False
    return out


async def test_every_frame_of_a_session_matches_the_served_schema(
    make_server: ServerFactory,
) -> None:
    server = await make_server(**FAST)
    doc = await schema_of(server)
    assert doc["x-protocol-version"] == p.PROTOCOL_VERSION
    sent: list[dict[str, Any]] = []
    got: list[dict[str, Any]] = []

    alice_name, _ = await server.user("alice")
    bob_name, bob_id = await server.user("bob")
    alice = Peer(await server.raw_ws(await server.device(alice_name)), sent, got)
    bob = Peer(await server.raw_ws(await server.device(bob_name, "phone")), sent, got)
    for peer in (alice, bob):
        ready = await peer.until("ready")
        assert ready["protocol"] == p.PROTOCOL_VERSION
        await peer.until("synced")

    # errors: a refused command, an unknown one, and a frame too broken to have a rid
    await alice.refused({"t": "presence_subscribe", "users": [bob_id]})  # no shared chat yet
    await alice.refused({"t": "no_such_command"}, valid=False)
    await alice.ws.send_str("{")
    await alice.until("error", rid=None)

    chat = await alice.call({"t": "create_chat", "participants": [bob_id]})
    validator(doc, "ChatInfo").validate(chat)
    await alice.event("chat_update")
    await bob.event("chat_update")
    state = await alice.call({"t": "presence_subscribe", "users": [bob_id]})
    for frame in state["presence"]:
        validator(doc, "PresenceFrame").validate(frame)
    await bob.call({"t": "typing", "chat": chat["id"]})
    await alice.until("typing", user=bob_id)

    # bob's second device comes online after he typed: it gets the read state of the first
    bob_tablet = Peer(await server.raw_ws(await server.device(bob_name, "tablet")), sent, got)
    await bob_tablet.until("synced")
    await alice.call({"t": "send", "chat": chat["id"], "cmid": "m1", "body": "hello"})
    message = await bob.event("message")
    await bob_tablet.event("message")
    await bob.call({"t": "ack", "upto": message["iseq"]})
    await alice.event("receipt")
    await bob.call({"t": "read", "chat": chat["id"], "seq": 1})
    await bob_tablet.event("read_state")

    # end-to-end encryption: bob's tablet publishes keys (its login and its keys announced to
    # alice), alice asks for them, takes one and sends the tablet a payload
    await alice.event("device_list")
    tablet_keys = {
        "identity": {"curve25519": KEY, "ed25519": KEY, "bundle": "{}", "signature": SIG},
        "one_time_keys": [{"id": "AAAAAQ", "key": KEY, "signature": SIG}],
        "fallback_key": {"id": "AAAAAg", "key": KEY, "signature": SIG},
    }
    await bob_tablet.call({"t": "keys_upload", **tablet_keys})
    await alice.event("device_list")
    devices = await alice.call({"t": "keys_query", "users": [bob_id]})
    for listed in devices["devices"]:
        validator(doc, "DeviceKeys").validate(listed)
    tablet_id = next(d["device"] for d in devices["devices"] if d["identity"] is not None)
    claimed = await alice.call({"t": "keys_claim", "devices": [tablet_id]})
    validator(doc, "ClaimedKey").validate(claimed["keys"][0])
    await alice.call({"t": "keys_claim", "devices": [tablet_id]})  # the fallback key
    await bob_tablet.event("keys_exhausted")
    to_tablet = {"device": tablet_id, "payload": "olm"}
    await alice.call({"t": "send_to_device", "messages": [to_tablet]})
    await bob_tablet.event("to_device")

    # a file: declared, uploaded through its signed URL, confirmed, sent, fetched
    data = b"meet at 8\n"
    ticket = await alice.call(
        {
            "t": "create_attachment",
            "content_type": "text/plain",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "filename": "note.txt",
        }
    )
    upload = ticket["upload"]
    async with (
        aiohttp.ClientSession() as http,
        http.put(server.url + upload["url"], data=data, headers=upload["headers"]) as resp,
    ):
        assert resp.status == 200
    uploaded = await alice.call({"t": "attachment_uploaded", "attachment": ticket["id"]})
    validator(doc, "Attachment").validate(uploaded["attachment"])
    await alice.call(
        {"t": "send", "chat": chat["id"], "cmid": "m2", "attachment": ticket["id"], "ack": 2}
    )
    with_file = await bob.event("message")
    assert with_file["event"]["attachment"]["id"] == ticket["id"]
    await bob.call({"t": "attachment_url", "attachment": ticket["id"]})

    await alice.call({"t": "list_chats"})
    await alice.call({"t": "receipts", "chat": chat["id"], "message": with_file["event"]["id"]})
    await alice.call({"t": "ping"})
    await alice.call({"t": "set_visibility", "visibility": "chats"})
    await alice.call({"t": "push_status"})
    await alice.refused({"t": "push_register", "target": {"kind": "fcm", "token": "x"}})
    await bob.call({"t": "sync", "after": 0})
    await bob.until("synced")
    await alice.call({"t": "presence_unsubscribe", "users": [bob_id]})
    await alice.call({"t": "presence_subscribe", "users": [bob_id]})
    await bob_tablet.ws.close()
    await bob.ws.close()
    offline = await alice.until("presence", user=bob_id, status="offline")
    assert offline["last_seen"] is not None

    gap = json.loads(p.encode(p.Gap(from_=1, to=4)))  # only retention makes one in a session
    clients, servers = validator(doc, "ClientFrame"), validator(doc, "ServerFrame")
    closed = validator(strict(doc), "ServerFrame")
    for frame in sent:
        clients.validate(frame)
    for frame in [*got, gap]:
        servers.validate(frame)
        closed.validate(frame)
    frame_types = doc["$defs"]["ServerFrame"]["discriminator"]["mapping"]
    assert {f["t"] for f in got} | {"gap"} == set(frame_types)
    kinds = {f["event"]["type"] for f in got if f["t"] == "event"}
    assert kinds == {
        "message",
        "receipt",
        "chat_update",
        "read_state",
        "device_list",
        "to_device",
        "keys_exhausted",
    }


async def test_the_schema_refuses_what_the_server_refuses(server: Server) -> None:
    """Commands are described as the server decodes them: unknown fields and wrong types are
    invalid, optional fields may be left out."""
    clients = validator(await schema_of(server), "ClientFrame")
    assert clients.is_valid({"t": "send", "rid": 1, "chat": "c", "cmid": "m", "body": "x"})
    assert clients.is_valid({"t": "ping", "rid": "a"})
    assert not clients.is_valid({"t": "send", "rid": 1, "chat": "c", "cmid": "m", "x": 1})
    assert not clients.is_valid({"t": "ack", "rid": 1, "upto": -1})
    assert not clients.is_valid({"t": "ping", "rid": 1.5})
    assert not clients.is_valid({"t": "teleport", "rid": 1})
