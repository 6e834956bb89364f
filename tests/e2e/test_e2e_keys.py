"""End-to-end encryption, the server's side, over real WebSockets: the key directory
(`keys_upload`, `keys_query`, `keys_claim`), device-list announcements and `send_to_device`,
with real key material made by vodozemac where it is installed (the server never imports it:
it checks shapes and sizes only)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from typing import Any

import aiohttp
import pytest

from pigeon.client import ClientError, PigeonClient
from pigeon.client.http import revoke_device
from pigeon.domain.events import DeviceList, KeysExhausted, ToDevice
from tests.conftest import Server, ServerFactory, next_of

_serial = itertools.count(1)


def b64(size: int) -> str:
    n = next(_serial)
    return base64.b64encode(n.to_bytes(8, "big") * (size // 8)).decode().rstrip("=")


class Keys:
    """A device's key material as a client would publish it: vodozemac's when installed."""

    def __init__(self, user: str, device: str) -> None:
        try:
            import vodozemac
        except ImportError:  # pragma: no cover - shapes only, then
            self.account = None
            self.curve, self.ed = b64(32), b64(32)
        else:
            self.account = vodozemac.Account()
            self.curve = self.account.curve25519_key.to_base64()
            self.ed = self.account.ed25519_key.to_base64()
        self.bundle = json.dumps(
            {"user": user, "device": device, "curve25519": self.curve, "ed25519": self.ed},
            sort_keys=True,
            separators=(",", ":"),
        )

    def sign(self, text: str) -> str:
        if self.account is None:
            return b64(64)
        return str(self.account.sign(text.encode()).to_base64())

    def identity(self) -> dict[str, str]:
        return {
            "curve25519": self.curve,
            "ed25519": self.ed,
            "bundle": self.bundle,
            "signature": self.sign(self.bundle),
        }

    def one_time_keys(self, n: int) -> list[dict[str, str]]:
        if self.account is None:
            return [
                {"id": f"k{next(_serial)}", "key": b64(32), "signature": b64(64)} for _ in range(n)
            ]
        self.account.generate_one_time_keys(n)
        keys = self.account.one_time_keys
        self.account.mark_keys_as_published()
        return [
            {"id": key_id, "key": key.to_base64(), "signature": self.sign(key.to_base64())}
            for key_id, key in keys.items()
        ]

    def fallback_key(self) -> dict[str, str]:
        if self.account is None:
            return {"id": "fb", "key": b64(32), "signature": b64(64)}
        self.account.generate_fallback_key()
        ((key_id, key),) = self.account.fallback_key.items()
        return {"id": key_id, "key": key.to_base64(), "signature": self.sign(key.to_base64())}


async def publish(client: PigeonClient, otks: int = 3, fallback: bool = True) -> Keys:
    assert client.user is not None and client.device is not None
    keys = Keys(client.user, client.device)
    fields: dict[str, Any] = {
        "identity": keys.identity(),
        "one_time_keys": keys.one_time_keys(otks),
    }
    if fallback:
        fields["fallback_key"] = keys.fallback_key()
    counts = await client.request("keys_upload", **fields)
    assert counts == {
        "one_time_keys": otks,
        "max_one_time_keys": 100,
        "fallback_key": fallback,
        "fallback_used": False,
    }
    return keys


async def refused(call: Any, code: str) -> ClientError:
    with pytest.raises(ClientError) as err:
        await call
    assert err.value.code == code, err.value
    return err.value


USERNAMES: dict[str, str] = {}


async def person(server: Server, prefix: str) -> PigeonClient:
    """A fresh user with one connected device (its username kept in `USERNAMES`)."""
    name, user_id = await server.user(prefix)
    USERNAMES[user_id] = name
    return await server.client(await server.device(name))


async def partners(server: Server) -> tuple[PigeonClient, PigeonClient]:
    """Alice and Bob, connected, sharing a direct chat."""
    alice, bob = await person(server, "alice"), await person(server, "bob")
    assert bob.user is not None
    await alice.create_chat([bob.user])
    return alice, bob


async def test_query_and_claim_keys_of_a_chat_partner(server: Server) -> None:
    alice, bob = await partners(server)
    keys = await publish(bob, otks=2)
    (listed,) = (await alice.request("keys_query", users=[bob.user]))["devices"]
    assert listed == {
        "user": bob.user,
        "device": bob.device,
        "identity": keys.identity() | {"signature": listed["identity"]["signature"]},
    }
    if keys.account is not None:  # the signature is the client's to verify, and it verifies
        import vodozemac

        ed = vodozemac.Ed25519PublicKey.from_base64(listed["identity"]["ed25519"])
        ed.verify_signature(
            listed["identity"]["bundle"].encode(),
            vodozemac.Ed25519Signature.from_base64(listed["identity"]["signature"]),
        )
    taken = []
    for _ in range(3):
        (claimed,) = (await alice.request("keys_claim", devices=[bob.device]))["keys"]
        assert (claimed["user"], claimed["device"]) == (bob.user, bob.device)
        taken.append((claimed["key"], claimed["fallback"]))
    assert [f for _, f in taken] == [False, False, True]  # two one-time keys, then the fallback
    assert len({i for i, _ in taken}) == 3
    counts = await bob.request("keys_upload")  # empty: what do I hold?
    assert (counts["one_time_keys"], counts["fallback_used"]) == (0, True)
    await next_of(bob, KeysExhausted)  # and bob was told at once: time to top up
    counts = await bob.request(
        "keys_upload", one_time_keys=keys.one_time_keys(5), fallback_key=keys.fallback_key()
    )
    assert (counts["one_time_keys"], counts["fallback_used"]) == (5, False)
    if keys.account is not None:  # a real Olm session starts from the claimed key
        import vodozemac

        alice_account = vodozemac.Account()
        session = alice_account.create_outbound_session(
            vodozemac.Curve25519PublicKey.from_base64(listed["identity"]["curve25519"]),
            vodozemac.Curve25519PublicKey.from_base64(claimed["key"]),
        )
        message = session.encrypt(b"hello bob")
        _, plaintext = keys.account.create_inbound_session(
            alice_account.curve25519_key, message.to_pre_key()
        )
        assert plaintext == b"hello bob"


async def test_keys_of_strangers_are_refused(server: Server) -> None:
    alice = await person(server, "alice")
    stranger = await person(server, "eve")
    await publish(stranger)
    await refused(alice.request("keys_query", users=[stranger.user]), "forbidden")
    await refused(alice.request("keys_claim", devices=[stranger.device]), "forbidden")
    await refused(
        alice.request("send_to_device", messages=[{"device": stranger.device, "payload": "x"}]),
        "forbidden",
    )
    counts = await stranger.request("keys_upload")
    assert counts["one_time_keys"] == 3  # nothing was taken
    # one's own devices are always visible
    (mine,) = (await alice.request("keys_query", users=[alice.user]))["devices"]
    assert (mine["device"], mine["identity"]) == (alice.device, None)
    # a device that no longer exists is left out of a claim
    assert (await alice.request("keys_claim", devices=["01ARZ3NDEKTSV4RRFFQ69G5FAV"])) == {
        "keys": []
    }


async def test_bad_key_uploads_are_refused(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(e2e={"max_one_time_keys": 4, "max_targets": 2})
    alice = await person(server, "alice")
    assert alice.user is not None and alice.device is not None
    keys = Keys(alice.user, alice.device)
    good = keys.identity()
    await refused(
        alice.request("keys_upload", one_time_keys=keys.one_time_keys(1)), "bad_request"
    )  # identity keys first
    for field, value in [
        ("curve25519", "not base64!"),
        ("ed25519", b64(16)),
        ("signature", b64(32)),
        ("bundle", ""),
        ("bundle", "x" * 5000),
    ]:
        await refused(alice.request("keys_upload", identity=good | {field: value}), "bad_request")
    await refused(alice.request("keys_upload", identity=good | {"extra": 1}), "bad_request")
    await alice.request("keys_upload", identity=good)
    await alice.request("keys_upload", identity=good)  # the same again: fine
    other = Keys(alice.user, alice.device).identity()
    await refused(alice.request("keys_upload", identity=other), "conflict")
    await refused(
        alice.request("keys_upload", one_time_keys=keys.one_time_keys(5)), "too_many_keys"
    )
    await alice.request("keys_upload", one_time_keys=keys.one_time_keys(3))
    await refused(
        alice.request("keys_upload", one_time_keys=keys.one_time_keys(2)), "too_many_keys"
    )
    await refused(
        alice.request(
            "keys_upload", one_time_keys=[{"id": "", "key": b64(32), "signature": b64(64)}]
        ),
        "bad_request",
    )
    await refused(
        alice.request(
            "keys_upload", fallback_key={"id": "f", "key": b64(31), "signature": b64(64)}
        ),
        "bad_request",
    )
    await refused(alice.request("keys_query", users=[]), "bad_request")
    await refused(alice.request("keys_query", users=["nope"]), "bad_request")
    await refused(alice.request("keys_claim", devices=["nope"]), "bad_request")
    three = [alice.user, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "01ARZ3NDEKTSV4RRFFQ69G5FAW"]
    await refused(alice.request("keys_query", users=three), "bad_request")  # max_targets
    assert (await alice.request("keys_upload"))["one_time_keys"] == 3


async def test_device_list_changes_reach_chat_partners_and_own_devices(server: Server) -> None:
    alice, bob = await partners(server)
    stranger = await person(server, "eve")
    assert alice.user is not None
    # alice logs in on a laptop: bob (a partner) and alice's phone are told; eve is not
    laptop_account = await server.device(USERNAMES[alice.user], "laptop")
    for watcher in (bob, alice):
        event = await next_of(watcher, DeviceList)
        assert (event.user, event.device, event.change) == (
            alice.user,
            laptop_account.device,
            "added",
        )
    laptop = await server.client(laptop_account)
    await publish(laptop)
    keyed = await next_of(bob, DeviceList)
    assert (keyed.device, keyed.change) == (laptop_account.device, "keys")
    devices = (await bob.request("keys_query", users=[alice.user]))["devices"]
    assert {d["device"] for d in devices} == {alice.device, laptop_account.device}
    # revoking it: bob is told, and its keys are gone with it
    await revoke_device(server.url, laptop_account.token, laptop_account.device)
    removed = await next_of(bob, DeviceList)
    assert (removed.device, removed.change) == (laptop_account.device, "removed")
    devices = (await bob.request("keys_query", users=[alice.user]))["devices"]
    assert [d["device"] for d in devices] == [alice.device]
    assert (await bob.request("keys_claim", devices=[laptop_account.device]))["keys"] == []
    with pytest.raises(TimeoutError):
        await next_of(stranger, DeviceList, timeout=0.3)


async def test_to_device_messages_are_durable_inbox_events(server: Server) -> None:
    alice, bob = await partners(server)
    assert bob.user is not None
    tablet_account = await server.device(USERNAMES[bob.user], "tablet")
    await next_of(alice, DeviceList)  # bob's tablet was announced
    reply = await alice.request(
        "send_to_device",
        messages=[
            {"device": bob.device, "payload": "room key for the phone"},
            {"device": tablet_account.device, "payload": "room key for the tablet"},
            {"device": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "payload": "to nobody"},
        ],
    )
    assert reply == {"missing": ["01ARZ3NDEKTSV4RRFFQ69G5FAV"]}
    got = await next_of(bob, ToDevice)
    assert (got.sender, got.sender_device, got.payload) == (
        alice.user,
        alice.device,
        "room key for the phone",
    )
    # the tablet was offline: its payload waits in its inbox, and comes again on every
    # connection until it is acked (at least once)
    for _ in range(2):
        ws = await server.raw_ws(tablet_account)
        frames = [await ws.receive_json(timeout=5) for _ in range(3)]
        assert [f["t"] for f in frames] == ["ready", "event", "synced"]
        event = frames[1]["event"]
        assert event == {
            "type": "to_device",
            "sender": alice.user,
            "sender_device": alice.device,
            "payload": "room key for the tablet",
            "at": event["at"],
        }
        await ws.close()
    ws = await server.raw_ws(tablet_account)
    assert [(await ws.receive_json(timeout=5))["t"] for _ in range(3)][-1] == "synced"
    await ws.send_json({"t": "ack", "rid": 1, "upto": frames[1]["iseq"]})
    assert (await ws.receive_json(timeout=5)) == {"t": "ok", "rid": 1, "result": None}
    await ws.close()
    ws = await server.raw_ws(tablet_account)
    assert [(await ws.receive_json(timeout=5))["t"] for _ in range(2)] == ["ready", "synced"]


async def test_bad_to_device_messages_are_refused(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(e2e={"max_to_device_bytes": 1024})
    alice, bob = await partners(server)
    one = {"device": bob.device, "payload": "x"}
    await refused(alice.request("send_to_device", messages=[]), "bad_request")
    await refused(alice.request("send_to_device", messages=[one, one]), "bad_request")
    await refused(
        alice.request("send_to_device", messages=[one | {"payload": "é" * 600}]), "too_large"
    )
    await refused(alice.request("send_to_device", messages=[one | {"payload": ""}]), "bad_request")
    await refused(alice.request("send_to_device", messages=[one | {"chat": "x"}]), "bad_request")
    await refused(
        alice.request("send_to_device", messages=[{"device": "nope", "payload": "x"}]),
        "bad_request",
    )


async def test_to_device_and_claims_are_rate_limited(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(
        rate_limits={
            "enabled": True,
            "send_per_device": "2/minute",
            "key_claims_per_device": "3/minute",
            # on the shared stack, the counters are in the session's Redis, which keeps the
            # registrations of this address from earlier runs
            "register_per_address": "1000000/minute",
            "login_per_address": "1000000/minute",
        }
    )
    alice, bob = await partners(server)
    await publish(bob, otks=5)
    one = [{"device": bob.device, "payload": "x"}]
    await alice.request("send_to_device", messages=one)
    await alice.request("send_to_device", messages=one)
    error = await refused(alice.request("send_to_device", messages=one), "rate_limited")
    assert error.retry_after is not None and error.retry_after > 0
    for _ in range(3):
        await alice.request("keys_claim", devices=[bob.device])
    await refused(alice.request("keys_claim", devices=[bob.device]), "rate_limited")
    assert (await bob.request("keys_upload"))["one_time_keys"] == 2


@pytest.fixture(params=["local", "redis"])
def counters(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings that turn the rate limits on, with the counters in this process or in Redis
    (where a cluster keeps them); a test adds its rules to `rate_limits`."""
    # the tests register and log in many users from one address, and the session's Redis
    # keeps the per-address counters of earlier tests and runs
    rules = {"register_per_address": "1000000/minute", "login_per_address": "1000000/minute"}
    if request.param == "local":
        return {"rate_limits": {"enabled": True, "type": "local", **rules}}
    return {
        "rate_limits": {"enabled": True, "type": "redis", **rules},
        "redis": {"url": request.getfixturevalue("redis_url")},
    }


def with_rules(counters: dict[str, Any], **rules: str) -> dict[str, Any]:
    return counters | {"rate_limits": counters["rate_limits"] | rules}


async def answer(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a command on a bare WebSocket; its reply (events on the way are skipped)."""
    await ws.send_json(frame)
    while True:
        reply: dict[str, Any] = await ws.receive_json(timeout=5)
        if reply.get("rid") == frame["rid"]:
            return reply


async def test_key_commands_over_their_limits_get_rate_limited_and_the_connection_lives_on(
    make_server: ServerFactory, counters: dict[str, Any]
) -> None:
    server = await make_server(
        **with_rules(
            counters,
            key_uploads_per_device="2/minute",
            key_queries_per_device="2/minute",
            key_claims_per_device="2/minute",
        )
    )
    bob = await person(server, "bob")
    await publish(bob, otks=5)
    alice_name, _ = await server.user("alice")
    ws = await server.raw_ws(await server.device(alice_name))
    created = await answer(ws, {"t": "create_chat", "rid": "chat", "participants": [bob.user]})
    assert created["t"] == "ok"
    commands: dict[str, dict[str, Any]] = {
        "keys_upload": {},
        "keys_query": {"users": [bob.user]},
        "keys_claim": {"devices": [bob.device]},
    }
    for command, fields in commands.items():
        for i in range(2):
            ok = await answer(ws, {"t": command, "rid": f"{command}{i}", **fields})
            assert ok["t"] == "ok", ok
        refusal = await answer(ws, {"t": command, "rid": f"{command}-over", **fields})
        assert refusal == {
            "t": "error",
            "rid": f"{command}-over",
            "code": "rate_limited",
            "message": refusal["message"],
            "temporary": True,
            "retry_after": refusal["retry_after"],
        }
        assert 0 < refusal["retry_after"] <= 120 and "2/60s" in refusal["message"]
    # the connection lives on: its other commands are answered, and it was not closed
    assert await answer(ws, {"t": "ping", "rid": "alive"}) == {
        "t": "ok",
        "rid": "alive",
        "result": None,
    }
    listed = await answer(ws, {"t": "list_chats", "rid": "chats"})
    assert listed["t"] == "ok" and not ws.closed
    assert (await bob.request("keys_upload"))["one_time_keys"] == 3  # the refusal took none


async def test_claims_count_every_device_of_the_claiming_user(
    make_server: ServerFactory, counters: dict[str, Any]
) -> None:
    server = await make_server(**with_rules(counters, key_claims_per_user="3/minute"))
    alice, bob = await partners(server)
    assert alice.user is not None
    await publish(bob, otks=5)
    laptop = await server.client(await server.device(USERNAMES[alice.user], "laptop"))
    for claimer in (alice, alice, laptop):
        (key,) = (await claimer.request("keys_claim", devices=[bob.device]))["keys"]
        assert not key["fallback"]
    for claimer in (laptop, alice):  # a fresh device is the same user
        error = await refused(claimer.request("keys_claim", devices=[bob.device]), "rate_limited")
        assert "per user" in error.message
    assert (await bob.request("keys_upload"))["one_time_keys"] == 2


async def test_a_device_claimed_too_often_by_one_user_gives_them_its_fallback_key(
    make_server: ServerFactory, counters: dict[str, Any]
) -> None:
    server = await make_server(
        limits={"max_devices_per_user": 2},
        **with_rules(counters, key_claims_per_target="2/hour"),
    )
    eve, bob = await partners(server)
    carol = await person(server, "carol")
    alice = await person(server, "alice")
    assert bob.user is not None and carol.user is not None
    await eve.create_chat([carol.user])
    await alice.create_chat([bob.user])
    await publish(bob, otks=5)
    await publish(carol, otks=5)
    for _ in range(2):
        (key,) = (await eve.request("keys_claim", devices=[bob.device]))["keys"]
        assert (key["device"], key["fallback"]) == (bob.device, False)
    # past it, eve gets bob's phone's fallback key (no error, no one-time key; the rest as
    # ever), as often as she asks
    for devices in ([bob.device, carol.device], [bob.device]):
        keys = (await eve.request("keys_claim", devices=devices))["keys"]
        assert [(k["device"], k["fallback"]) for k in keys] == [
            (d, d == bob.device) for d in devices
        ]
    counts = await bob.request("keys_upload")
    assert (counts["one_time_keys"], counts["fallback_used"]) == (3, False)  # nothing to top up
    # others still start sessions with bob: a one-time key, not the fallback
    (key,) = (await alice.request("keys_claim", devices=[bob.device]))["keys"]
    assert (key["device"], key["fallback"]) == (bob.device, False)
    assert (await bob.request("keys_upload"))["one_time_keys"] == 2
    # and bob was never told to top up: everything before alice's marker is no KeysExhausted
    marker = [{"device": bob.device, "payload": "marker"}]
    await alice.request("send_to_device", messages=marker)
    while not isinstance(event := await bob.next_event(5), ToDevice):
        assert not isinstance(event, KeysExhausted)
    assert event.payload == "marker"


async def test_claims_racing_over_websockets_never_share_a_key(server: Server) -> None:
    alice, bob = await partners(server)
    carol = await person(server, "carol")
    assert bob.user is not None and carol.user is not None
    await carol.create_chat([bob.user])
    await publish(bob, otks=10)

    async def claims(client: PigeonClient) -> list[tuple[str, bool]]:
        replies = await asyncio.gather(
            *(client.request("keys_claim", devices=[bob.device]) for _ in range(8))
        )
        return [(k["id"], k["fallback"]) for r in replies for k in r["keys"]]

    got = [k for keys in await asyncio.gather(claims(alice), claims(carol)) for k in keys]
    one_time = [key_id for key_id, fallback in got if not fallback]
    assert len(one_time) == 10 and len(set(one_time)) == 10
    assert sum(1 for _, fallback in got if fallback) == 6
