"""Abuse limits end to end: each over-limit command gets `rate_limited` with `retry_after` (429
and Retry-After on REST); others are not slowed; two nodes share the counters through Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from pigeon.client import ClientError
from tests.conftest import PASSWORD, ServerFactory


async def _until_counted(redis_url: str, counter: str, count: int, timeout: float = 10.0) -> None:
    """Until the one counter whose name ends with `counter` holds `count` (polling Redis: the
    spends arrive from another process, with no event to await)."""
    redis = Redis.from_url(redis_url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                keys = [k async for k in redis.scan_iter(match=f"*{counter}")]
                if len(keys) == 1 and int(await redis.hget(keys[0], "c") or 0) >= count:
                    return
                await asyncio.sleep(0.01)
    finally:
        await redis.aclose()


def limits(**rules: str) -> dict[str, Any]:
    return {"rate_limits": {"enabled": True, "type": "local", **rules}}


async def test_sends_per_device_and_bytes(make_server: ServerFactory) -> None:
    server = await make_server(
        **limits(send_per_device="5/minute", send_bytes_per_device="3000/minute")
    )
    alice = await server.new_client("alice")
    carol = await server.new_client("carol")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    for i in range(5):
        await alice.send(chat["id"], f"m{i}")
    with pytest.raises(ClientError) as err:
        await alice.request("send", chat=chat["id"], cmid="over", body="one too many")
    assert err.value.code == "rate_limited" and err.value.temporary
    # someone else is not slowed by alice's limit; big bodies spend the byte budget
    other = await carol.create_chat([bob.user])
    for _ in range(3):
        await carol.send(other["id"], "x" * 1000)
    with pytest.raises(ClientError) as err:
        await carol.request("send", chat=other["id"], cmid="big", body="x" * 1000)
    assert err.value.code == "rate_limited" and "bytes" in err.value.message


async def test_the_error_frame_says_when_to_retry(make_server: ServerFactory) -> None:
    server = await make_server(**limits(create_chat_per_user="1/hour"))
    name, _ = await server.user()
    _, bob = await server.user("bob")
    _, carol = await server.user("carol")
    ws = await server.raw_ws(await server.device(name))
    await ws.send_json({"t": "create_chat", "rid": 1, "participants": [bob]})
    await ws.send_json({"t": "create_chat", "rid": 2, "participants": [carol]})
    while True:
        frame = await ws.receive_json(timeout=5)
        if frame.get("rid") == 2:
            break
    assert frame["t"] == "error" and frame["code"] == "rate_limited"
    assert 0 < frame["retry_after"] <= 7200


async def test_a_busy_group_slows_down(make_server: ServerFactory) -> None:
    server = await make_server(**limits(fanout_per_chat="4/minute"))
    alice = await server.new_client("alice", max_rate_wait=0)  # raise, do not wait it out
    others = [await server.new_client("m") for _ in range(2)]
    group = await alice.create_chat([c.user for c in others if c.user], name="busy")
    await alice.send(group["id"], "one")  # 2 deliveries
    await alice.send(group["id"], "two")  # 4: the budget is spent
    with pytest.raises(ClientError) as err:
        await alice.send(group["id"], "three")
    assert err.value.code == "rate_limited" and "busy" in err.value.message
    assert err.value.retry_after is not None and err.value.retry_after > 0


async def test_a_burst_to_a_new_group_is_held_to_its_budget(make_server: ServerFactory) -> None:
    """The first send to a chat tells its fan-out; concurrent sends wait for it instead of each
    reserving one delivery (which let a burst to a big group through at once)."""
    server = await make_server(**limits(fanout_per_chat="25/minute"))
    alice = await server.new_client("alice", max_rate_wait=0)
    members = []
    for _ in range(10):  # one device each: 10 deliveries per message
        name, user = await server.user("m")
        await server.device(name)
        members.append(user)
    group = await alice.create_chat(members, name="burst")
    results = await asyncio.gather(
        *(alice.send(group["id"], f"m{i}") for i in range(8)), return_exceptions=True
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, ClientError) for r in results if isinstance(r, BaseException))
    assert len(accepted) == 2  # 10, then a reservation of 10: 20 of 25; the third would be 30


async def test_registrations_and_logins_get_429(make_server: ServerFactory) -> None:
    server = await make_server(
        **limits(register_per_address="2/hour", login_per_username="2/minute")
    )
    async with aiohttp.ClientSession() as http:
        statuses = []
        for i in range(3):
            body = {"username": f"r_{i}_{id(statuses)}", "password": PASSWORD}
            async with http.post(f"{server.url}/v1/users", json=body) as resp:
                statuses.append(resp.status)
                retry_after = resp.headers.get("Retry-After")
        assert statuses == [201, 201, 429]
        assert retry_after is not None and int(retry_after) >= 1
        name = f"r_0_{id(statuses)}"
        statuses = []
        for _ in range(3):
            body = {"username": name, "password": "wrong password", "device_name": "d"}
            async with http.post(f"{server.url}/v1/devices", json=body) as resp:
                statuses.append(resp.status)
        assert statuses == [401, 401, 429]
        body = {"username": name, "password": PASSWORD, "device_name": "d"}
        async with http.post(f"{server.url}/v1/devices", json=body) as resp:
            assert resp.status == 429  # even the right password waits: attempts count per name


async def test_a_rest_refusal_is_answered_after_a_pause(make_server: ServerFactory) -> None:
    server = await make_server(
        **limits(login_per_username="1/minute"), gateway={"refusal_delay": 0.4}
    )
    name, _ = await server.user("paused")
    body = {"username": name, "password": "wrong password", "device_name": "d"}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        start = loop.time()
        async with http.post(f"{server.url}/v1/devices", json=body) as resp:
            assert resp.status == 401  # a wrong password is not held
        assert loop.time() - start < 0.4
        start = loop.time()
        async with http.post(f"{server.url}/v1/devices", json=body) as resp:
            assert resp.status == 429
        assert loop.time() - start >= 0.4


async def test_two_nodes_share_the_counters(
    make_server: ServerFactory, postgres_dsn: str, redis_url: str
) -> None:
    shared = {
        "store": {"type": "postgres", "dsn": postgres_dsn},
        "bus": {"type": "redis"},
        "presence": {"type": "redis"},
        "redis": {"url": redis_url},
        "rate_limits": {  # the counters' type follows the bus: Redis
            "enabled": True,
            "send_per_device": "4/minute",
            "register_per_address": "1000000/minute",  # the session's Redis is shared
            "login_per_address": "1000000/minute",
        },
    }
    node_a = await make_server(**shared)
    node_b = await make_server(**shared)
    alice_name, _ = await node_a.user("alice")
    alice_account = await node_a.device(alice_name)
    _, bob = await node_a.user("bob")
    on_a = await node_a.client(alice_account)
    chat = await on_a.create_chat([bob])
    for i in range(3):
        await on_a.send(chat["id"], f"a{i}")
    await on_a.close()
    # A node shares its message-path spends within `sync_interval` (decided on its own view,
    # architecture.md "Abuse limits"): wait until node A's three are in Redis
    await _until_counted(redis_url, f"4/60:sd:{alice_account.device}", 3)
    on_b = await node_b.client(alice_account, max_rate_wait=0)
    await on_b.send(chat["id"], "b0")  # the fourth, wherever it is sent from
    with pytest.raises(ClientError) as err:
        await on_b.send(chat["id"], "b1")
    assert err.value.code == "rate_limited"


async def test_chats_per_user_are_capped(make_server: ServerFactory) -> None:
    server = await make_server(limits={"max_chats_per_user": 2})
    alice = await server.new_client("alice")
    others = [(await server.user("u"))[1] for _ in range(3)]
    await alice.create_chat([others[0]])
    await alice.create_chat([others[1]], name="two")
    with pytest.raises(ClientError) as err:
        await alice.create_chat([others[2]])
    assert err.value.code == "too_many_chats"


async def test_a_group_larger_than_its_budget_still_gets_messages(
    make_server: ServerFactory,
) -> None:
    server = await make_server(**limits(fanout_per_chat="2/second"))
    alice = await server.new_client("alice", max_rate_wait=0)
    others = [await server.user("m") for _ in range(4)]  # 4 deliveries a message: over 2
    for name, _ in others:
        await server.device(name)
    group = await alice.create_chat([uid for _, uid in others], name="big")
    await alice.send(group["id"], "one")  # reserves 1, costs 4: the window is full
    with pytest.raises(ClientError) as err:
        await alice.send(group["id"], "two")
    assert err.value.code == "rate_limited"
    assert err.value.retry_after is not None and err.value.retry_after <= 2.5
    alice.max_rate_wait = 5.0  # the SDK now waits the window out: the group is not shut
    assert (await alice.send(group["id"], "two")).seq == 2


async def test_a_client_that_ignores_the_limits_is_disconnected(make_server: ServerFactory) -> None:
    server = await make_server(**limits(send_per_device="1/minute"), gateway={"max_refusals": 5})
    name, _ = await server.user()
    _, bob = await server.user("bob")
    ws = await server.raw_ws(await server.device(name))
    await ws.send_json({"t": "create_chat", "rid": "c", "participants": [bob]})
    chat = None
    while chat is None:
        frame = await ws.receive_json(timeout=5)
        if frame.get("rid") == "c":
            chat = frame["result"]["id"]
    for i in range(10):  # one passes, then refusals, and it keeps going
        await ws.send_json({"t": "send", "rid": i, "chat": chat, "cmid": f"m{i}", "body": "x"})
    msg = await ws.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.TEXT:
        msg = await ws.receive(timeout=5)
    assert ws.close_code == 4003  # reconnect allowed, with backoff
