"""The SDK checks the protocol version a real server announces in `ready` (docs/protocol.md,
"Protocol version"): another major version is `IncompatibleProtocol`, on the first connect and
on a reconnect, and the SDK stops there instead of reconnecting in a loop; a server from before
versions existed (no `protocol` field) speaks version 1.

The servers are real (in-process, real sockets); what they announce is changed the one way a
server of another version would differ here: the `ready` frame their gateway builds.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from pigeon.client import PROTOCOL_VERSIONS, IncompatibleProtocol, PigeonClient
from pigeon.domain.events import Message
from pigeon.gateway import protocol
from tests.conftest import Server, next_of


class ReadyOfVersion2(msgspec.Struct, tag="ready", tag_field="t"):
    """`ready` as a server of protocol version 2 would send it."""

    user: str
    device: str
    acked: int
    server_time: int
    protocol: int = 2


class ReadyOfNoVersion(msgspec.Struct, tag="ready", tag_field="t"):
    """`ready` as servers sent it before the protocol had a version."""

    user: str
    device: str
    acked: int
    server_time: int


async def test_a_server_of_another_major_version_is_refused_at_connect(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert {protocol.PROTOCOL_VERSION} == PROTOCOL_VERSIONS  # what the server speaks today
    name, _ = await server.user("future")
    account = await server.device(name)
    monkeypatch.setattr(protocol, "Ready", ReadyOfVersion2)
    client = PigeonClient(server.url, account.token)  # reconnects, unless told not to
    with pytest.raises(IncompatibleProtocol) as err:
        await client.connect(timeout=10)
    assert (err.value.code, err.value.server, err.value.temporary) == (
        "incompatible_protocol",
        2,
        False,
    )
    assert err.value.supported == PROTOCOL_VERSIONS
    assert "newer protocol version (2)" in err.value.message
    assert client.connects == 0 and client.user is None  # `ready` was not taken


async def test_a_server_upgraded_under_a_connected_client_stops_it(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user is not None
    chat = await alice.create_chat([bob.user])
    await alice.send(chat["id"], "before")
    assert (await next_of(bob, Message)).body == "before"

    monkeypatch.setattr(protocol, "Ready", ReadyOfVersion2)  # the node comes back newer
    await bob.drop_connection()  # bob reconnects by itself, and finds version 2
    with pytest.raises(IncompatibleProtocol):
        await next_of(bob, Message, timeout=10)
    with pytest.raises(IncompatibleProtocol):  # every later call says so too
        await bob.list_chats()
    assert bob._runner is not None  # its connection task ends: no reconnecting in a loop
    await asyncio.wait_for(asyncio.shield(bob._runner), 5)
    assert bob.connects == 1


async def test_a_server_without_a_version_speaks_version_1(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "Ready", ReadyOfNoVersion)
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user is not None
    chat = await alice.create_chat([bob.user])
    await alice.send(chat["id"], "hello")
    assert (await next_of(bob, Message)).body == "hello"
