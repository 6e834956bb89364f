"""Connection lifecycle: heartbeats, slow consumers, replaced connections, reconnects."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import aiohttp
import pytest

from pigeon.domain.events import Message
from pigeon.gateway.keys import SERVICES
from tests.conftest import Server, next_of


async def test_silent_connection_is_closed_and_pong_keeps_it_alive(make_server) -> None:  # type: ignore[no-untyped-def]
    server = await make_server(gateway={"ping_interval": 0.1, "idle_timeout": 0.5})
    name, _ = await server.user()
    account = await server.device(name)
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {account.token}"}
        mute = await http.ws_connect(f"{server.url}/v1/ws", headers=headers, autoping=False)
        loop = asyncio.get_running_loop()
        start = loop.time()
        pings = 0
        msg = await mute.receive(timeout=5)
        while msg.type != aiohttp.WSMsgType.CLOSE:
            pings += msg.type == aiohttp.WSMsgType.PING
            msg = await mute.receive(timeout=5)
        assert msg.data == 4001  # heartbeat timeout
        assert pings >= 3  # pinged every ping_interval, unanswered
        assert loop.time() - start >= 0.4  # idle_timeout, measured from a bit later
        await mute.close()

        polite = await http.ws_connect(f"{server.url}/v1/ws", headers=headers)  # answers pings
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):  # three idle timeouts
                while True:  # nothing but the ready/synced frames arrives: no close
                    msg = await polite.receive()
                    assert msg.type == aiohttp.WSMsgType.TEXT
        assert not polite.closed
        await polite.close()


async def _stalled_socket(url: str, token: str) -> socket.socket:
    """A WebSocket that completes the handshake and then never reads: a stalled phone."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert b" 101 " in head
    return sock


async def test_stalled_device_is_cut_off_without_slowing_others(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(gateway={"outbound_queue_frames": 32})
    sender = await server.new_client("sender")
    stalled_name, stalled_id = await server.user("stalled")
    stalled_account = await server.device(stalled_name)
    sock = await _stalled_socket(server.url, stalled_account.token)
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    flood_chat = await sender.create_chat([stalled_id])
    chat = await alice.create_chat([bob.user])

    async def flood() -> None:
        body = "z" * 60_000
        await asyncio.gather(*(sender.send(flood_chat["id"], body) for _ in range(400)))

    async def converse() -> None:
        for i in range(100):
            sent = await alice.send(chat["id"], f"m{i}")
            assert (await next_of(bob, Message, timeout=5)).id == sent.id

    await asyncio.gather(flood(), converse())
    hub = server.app[SERVICES].hub
    assert hub.get(stalled_account.device) is None  # disconnected as a slow consumer
    sock.close()
    # Nothing was lost for the stalled device: its inbox replays on reconnect.
    again = await server.client(stalled_account)
    got = [await next_of(again, Message, timeout=10) for _ in range(400)]
    assert [m.seq for m in got] == list(range(1, 401))


async def test_second_connection_replaces_the_first(server: Server) -> None:
    name, _ = await server.user()
    account = await server.device(name)
    first = await server.raw_ws(account)
    second = await server.raw_ws(account)
    msg = await first.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.TEXT:
        msg = await first.receive(timeout=5)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4503)
    await second.send_str('{"t":"ping","rid":1}')
    msg = await second.receive(timeout=5)
    while '"rid":1' not in msg.data:
        msg = await second.receive(timeout=5)


async def test_sdk_reconnects_and_resumes_after_a_drop(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    first = await alice.send(chat["id"], "before")
    assert (await next_of(bob, Message)).id == first.id
    await bob.drop_connection()
    second = await alice.send(chat["id"], "while away")
    third = await alice.send(chat["id"], "after")
    got = [await next_of(bob, Message, timeout=10) for _ in range(2)]
    assert [m.id for m in got] == [second.id, third.id]
    assert bob.connects >= 2


async def test_sends_in_flight_during_a_drop_are_committed_exactly_once(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    sends = [asyncio.create_task(alice.send(chat["id"], f"m{i}")) for i in range(50)]
    await alice.drop_connection()  # some sends are committed, some lost in flight, some not sent
    results = await asyncio.gather(*sends)
    assert sorted(r.seq for r in results) == list(range(1, 51))  # each committed once
    got = [await next_of(bob, Message, timeout=10) for _ in range(50)]
    assert sorted(m.id for m in got) == sorted(r.id for r in results)
    assert [m.seq for m in got] == list(range(1, 51))


async def _read_until_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(20):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return bytes(data)


def _close_code(stream: bytes) -> int | None:
    """The code of the close frame in a stream of unmasked server frames (None if absent)."""
    pos = 0
    while pos + 2 <= len(stream):
        opcode, n, head = stream[pos] & 0x0F, stream[pos + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(stream[pos + 2 : pos + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(stream[pos + 2 : pos + 10], "big"), 10
        if opcode == 0x8:
            return int.from_bytes(stream[pos + head : pos + head + 2], "big")
        pos += head + n
    return None


async def test_device_that_stops_reading_during_its_sync_is_closed(make_server) -> None:  # type: ignore[no-untyped-def]
    budget = 256 * 1024
    server: Server = await make_server(
        gateway={"stall_timeout": 0.6, "outbound_queue_bytes": budget, "idle_timeout": 60},
        limits={"sync_page_bytes": 128 * 1024},
    )
    sender = await server.new_client("sender")
    name, user_id = await server.user("stalled")
    account = await server.device(name)
    chat = await sender.create_chat([user_id])
    for _ in range(60):  # 3.6 MB waiting in its inbox
        await sender.send(chat["id"], "z" * 60_000)

    sock = await _stalled_socket(server.url, account.token)
    loop = asyncio.get_running_loop()
    first = await loop.sock_recv(sock, 2)  # the `ready` frame has started: it is attached
    assert first[0] == 0x81
    await loop.sock_sendall(sock, b"\x89\x80\0\0\0\0")  # it still pings now and then
    hub = server.app[SERVICES].hub
    conn = hub.get(account.device)
    assert conn is not None
    closed = asyncio.Event()
    conn.on_close(lambda c: (closed.set(), hub.detach(c)))
    queued: list[int] = []
    tick: asyncio.Handle | None = None

    def watch() -> None:  # what the connection holds, each loop iteration until it closes
        nonlocal tick
        queued.append(conn._out_bytes)
        tick = None if closed.is_set() else loop.call_soon(watch)

    watch()
    async with asyncio.timeout(10):
        await closed.wait()
    if tick is not None:
        tick.cancel()
    assert max(queued) <= budget  # the sync waited for space: memory stayed within budget
    assert _close_code(first + await _read_until_eof(sock)) == 4000
    sock.close()

    again = await server.client(account)  # and nothing was lost
    got = [await next_of(again, Message, timeout=10) for _ in range(60)]
    assert [m.seq for m in got] == list(range(1, 61))


async def test_connections_per_address_are_capped(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(gateway={"max_connections_per_address": 2})
    accounts = [await server.device((await server.user())[0]) for _ in range(3)]
    first = await server.raw_ws(accounts[0])
    await server.raw_ws(accounts[1])
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {accounts[2].token}"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{server.url}/v1/ws", headers=headers)
        assert refused.value.status == 429
        await first.close()  # a slot frees when the server is done with that connection
        for _ in range(100):  # each attempt waits for the server's answer to the handshake
            try:
                third = await http.ws_connect(f"{server.url}/v1/ws", headers=headers)
                break
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 429
        else:
            pytest.fail("the slot was never given back")
        await third.close()


async def test_half_sent_requests_are_closed(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(gateway={"request_timeout": 0.5})
    host, port = server.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    for partial in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"", b"POST /v1/users HTTP/1.1\r\n"):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, partial)  # and never the rest
        start = loop.time()
        async with asyncio.timeout(10):
            assert await loop.sock_recv(sock, 1024) == b""  # the server hung up
        assert loop.time() - start < 5
        sock.close()


async def test_a_trickled_rest_body_is_refused(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(gateway={"request_timeout": 0.5})
    host, port = server.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    head = b"POST /v1/users HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    await loop.sock_sendall(sock, head + b'{"user')  # then nothing
    async with asyncio.timeout(10):
        answer = await loop.sock_recv(sock, 4096)
    assert answer.startswith(b"HTTP/1.1 400") and b"not received in time" in answer
    sock.close()
