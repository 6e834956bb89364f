"""Bad input never crashes anything: each gets its error code; connection and server live on."""

from __future__ import annotations

import gc
import io
import json
from typing import Any

import aiohttp
import pytest

from pigeon.client import ClientError
from pigeon.client.http import revoke_device
from tests.conftest import Server


async def reply(ws: aiohttp.ClientWebSocketResponse, rid: Any = None) -> dict[str, Any]:
    """The next ok/error frame (skipping events and sync frames)."""
    while True:
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        if frame["t"] in ("ok", "error") and (rid is None or frame["rid"] == rid):
            return frame


async def still_alive(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str('{"t":"ping","rid":"alive"}')
    assert (await reply(ws, "alive"))["t"] == "ok"


@pytest.mark.parametrize(
    ("frame", "code", "rid"),
    [
        ("{not json", "bad_request", None),
        ("[1, 2, 3]", "bad_request", None),
        ('{"t":"teleport","rid":1}', "unknown_command", 1),
        ('{"t":{"nested":1},"rid":1}', "unknown_command", 1),
        ('{"t":"send","rid":2,"chat":42,"cmid":"x","body":"hi"}', "bad_request", 2),
        ('{"t":"send","rid":3,"cmid":"x","body":"hi"}', "bad_request", 3),
        ('{"t":"ack","rid":4,"upto":"lots"}', "bad_request", 4),
        ('{"t":"read","rid":5,"chat":"nope","seq":1,"extra":true}', "bad_request", 5),
        ('{"t":"send","rid":6,"chat":"01ARZ3NDEKTSV4RRFFQ69G5FAV","cmid":""}', "bad_request", 6),
        ('{"t":"send","rid":7,"chat":"01ARZ3NDEKTSV4RRFFQ69G5FAV","cmid":"a"}', "bad_request", 7),
        (
            '{"t":"send","rid":8,"chat":"01ARZ3NDEKTSV4RRFFQ69G5FAV","cmid":"a","body":"x"}',
            "not_found",
            8,
        ),
        ('{"t":"ack","rid":9,"upto":-1}', "bad_request", 9),
        ('{"t":"auth","rid":10,"token":"again"}', "bad_request", 10),
        ('{"t":"sync","rid":11,"after":18446744073709551616}', "bad_request", 11),
        ('{"t":"ack","rid":12,"upto":9223372036854775808}', "bad_request", 12),
        ('{"rid":13}', "bad_request", 13),
    ],
)
async def test_bad_frames_get_error_codes(server: Server, frame: str, code: str, rid: Any) -> None:
    name, _ = await server.user()
    ws = await server.raw_ws(await server.device(name))
    await ws.send_str(frame)
    err = await reply(ws)
    assert (err["t"], err["code"], err["rid"]) == ("error", code, rid)
    assert err["message"]
    await still_alive(ws)


async def test_oversized_frame_and_body(make_server) -> None:  # type: ignore[no-untyped-def]
    server = await make_server(limits={"max_body_bytes": 1000}, gateway={"max_frame_bytes": 4096})
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    with pytest.raises(ClientError) as err:
        await alice.send(chat["id"], "x" * 1001)
    assert err.value.code == "too_large"
    assert (await alice.send(chat["id"], "x" * 1000)).seq == 1

    name, _ = await server.user()
    ws = await server.raw_ws(await server.device(name))
    await ws.send_str(json.dumps({"t": "ping", "rid": 77, "pad": "y" * 5000}))
    err2 = await reply(ws)
    assert (err2["code"], err2["rid"]) == ("too_large", 77)
    await still_alive(ws)


async def test_non_participants_cannot_send_read_or_see_receipts(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    mallory = await server.new_client("mallory")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    sent = await alice.send(chat["id"], "private")
    for attempt in (
        mallory.send(chat["id"], "let me in"),
        mallory.read(chat["id"], 1),
        mallory.receipts(chat["id"], sent.id),
        mallory.modify_participants(chat["id"], add=[mallory.user or ""]),
    ):
        with pytest.raises(ClientError) as err:
            await attempt
        assert err.value.code == "forbidden"
    assert (await mallory.list_chats()) == []
    assert (await alice.send(chat["id"], "still fine")).seq == 2


async def test_group_cap_refuses_the_101st_member(server: Server) -> None:
    users = [(await server.user("cap"))[1] for _ in range(100)]
    admin = await server.new_client("admin")
    with pytest.raises(ClientError) as err:
        await admin.create_chat(users, name="too big")  # 100 + admin = 101
    assert err.value.code == "group_full"
    chat = await admin.create_chat(users[:99], name="full")
    assert len(chat["members"]) == 100
    with pytest.raises(ClientError) as err:
        await admin.modify_participants(chat["id"], add=[users[99]])
    assert err.value.code == "group_full"
    await admin.modify_participants(chat["id"], remove=[users[0]])
    added = await admin.modify_participants(chat["id"], add=[users[99]])
    assert len(added["members"]) == 100


async def test_invalid_and_revoked_tokens(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(f"{server.url}/v1/ws?token=forged")
        assert err.value.status == 401
        # first-frame authentication with a bad token: error reply, then close 4501
        ws = await http.ws_connect(f"{server.url}/v1/ws")
        await ws.send_str('{"t":"auth","rid":1,"token":"forged"}')
        frame = json.loads((await ws.receive(timeout=5)).data)
        assert (frame["code"], frame["rid"]) == ("unauthorized", 1)
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4501)

    name, _ = await server.user("revoker")
    phone = await server.device(name, "phone")
    laptop = await server.device(name, "laptop")
    ws = await server.raw_ws(laptop)
    await still_alive(ws)
    await revoke_device(server.url, phone.token, laptop.device)
    msg = await ws.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.TEXT:
        msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4502)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(
                f"{server.url}/v1/ws", headers={"Authorization": f"Bearer {laptop.token}"}
            )
        resp = await http.get(
            f"{server.url}/v1/devices", headers={"Authorization": f"Bearer {laptop.token}"}
        )
        assert resp.status == 401
        assert (await resp.json())["code"] == "unauthorized"
    # the server is fine
    assert (await server.new_client("after")).user


async def test_rest_errors_are_json_with_codes(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{server.url}/v1/users", data=b"{oops")
        assert (resp.status, (await resp.json())["code"]) == (400, "bad_request")
        resp = await http.post(f"{server.url}/v1/users", json={"username": "a", "password": "x"})
        assert (resp.status, (await resp.json())["code"]) == (400, "bad_request")
        name, _ = await server.user("dup")
        resp = await http.post(
            f"{server.url}/v1/users", json={"username": name.upper(), "password": "long enough"}
        )
        assert (resp.status, (await resp.json())["code"]) == (409, "conflict")
        resp = await http.post(
            f"{server.url}/v1/devices", json={"username": name, "password": "wrong password"}
        )
        assert (resp.status, (await resp.json())["code"]) == (401, "unauthorized")


async def test_rest_routing_errors_are_json_too(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{server.url}/v1/nowhere")
        assert (resp.status, (await resp.json())["code"]) == (404, "not_found")
        resp = await http.put(f"{server.url}/v1/users")
        assert (resp.status, (await resp.json())["code"]) == (405, "bad_request")
        resp = await http.post(f"{server.url}/v1/users", data=io.BytesIO(b"x" * 2**21))
        assert (resp.status, (await resp.json())["code"]) == (413, "too_large")


async def test_sdk_surfaces_a_permanent_close_to_every_reader(server: Server) -> None:
    name, _ = await server.user("doomed")
    phone = await server.device(name, "phone")
    laptop_account = await server.device(name, "laptop")
    laptop = await server.client(laptop_account)
    await revoke_device(server.url, phone.token, laptop_account.device)
    for reader in (laptop.next_event, laptop.next_signal):
        with pytest.raises(ClientError) as err:
            await reader(5)
        assert err.value.code == "closed"


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


async def test_frames_nested_too_deep_are_bad_requests(server: Server) -> None:
    name, _ = await server.user()
    account = await server.device(name)
    ws = await server.raw_ws(account)
    for frame in (_nested(5000), '{"t":"send","rid":1,"chat":' + _nested(5000) + "}"):
        await ws.send_str(frame)
        err = await reply(ws)
        assert (err["t"], err["code"]) == ("error", "bad_request")
    await still_alive(ws)

    http = aiohttp.ClientSession()  # before authentication: refused, not a crash
    try:
        first = await http.ws_connect(f"{server.url}/v1/ws")
        await first.send_str(_nested(5000))
        assert (await reply(first))["code"] == "unauthorized"
        assert (await first.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert first.close_code == 4501
    finally:
        await http.close()


async def test_bearer_scheme_is_case_insensitive(server: Server) -> None:
    name, _ = await server.user()
    account = await server.device(name)
    http = aiohttp.ClientSession()
    try:
        for scheme in ("bearer", "BEARER", "Bearer"):
            ws = await http.ws_connect(
                f"{server.url}/v1/ws", headers={"Authorization": f"{scheme} {account.token}"}
            )
            await still_alive(ws)
            await ws.close()
    finally:
        await http.close()


async def test_closing_mid_command_leaves_no_unretrieved_errors(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    name, _ = await server.user()
    account = await server.device(name)
    ws = await server.raw_ws(account)
    for i in range(200):  # refused by the store (no such chat) after the socket is gone
        frame = {"t": "send", "rid": i, "chat": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "cmid": f"{i}"}
        await ws.send_str(json.dumps(frame | {"body": "x"}))
    await ws.close()
    # a device's sends reach the store in order, whatever the store: once one more of this
    # device is answered, the refused ones are settled
    again = await server.raw_ws(account)
    last = {"t": "send", "rid": "last", "chat": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "cmid": "last"}
    await again.send_str(json.dumps(last | {"body": "x"}))
    while (reply := json.loads((await again.receive(timeout=10)).data)).get("rid") != "last":
        pass
    assert reply["t"] == "error"
    gc.collect()
    assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []


async def test_a_username_with_a_trailing_newline_is_refused(server: Server) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{server.url}/v1/users", json={"username": "alice\n", "password": "long enough pw"}
        ) as resp,
    ):
        assert (resp.status, (await resp.json())["code"]) == (400, "bad_request")
