"""Push end to end: a real server, real SDK clients, and a fake webhook gateway on loopback.

The webhook sender is the platform-neutral one; the other senders have their own tests against
fake FCM, APNs and Web Push gateways (tests/unit/test_push_gateways.py, test_push_senders.py).
With `PIGEON_TEST_STACK=shared` the same tests run on PostgreSQL and Redis, each in a database
of its own: the session's database is shared by all e2e tests, and the jobs an earlier test left
would be pushed (and answered) by this test's worker. There, the tests that push run twice: on
the store's queue, and on RabbitMQ (`push.queue = "rabbitmq"`, a queue prefix of their own), as a
cluster runs them.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from pigeon.adapters.push.rabbitmq import RabbitPushQueue
from pigeon.adapters.push.webhook import verify_signature
from pigeon.adapters.secret_files import load_or_create_secret
from pigeon.app import PUSH, PUSH_WORKER
from pigeon.client import Account, ClientError, PigeonClient, login, register
from pigeon.domain.events import Message
from pigeon.gateway.keys import SERVICES, SETTINGS
from pigeon.ports import PushJob, PushQueue
from pigeon.services.clock import SystemClock
from tests import conftest
from tests.conftest import (
    PASSWORD,
    STACK,
    Server,
    ServerFactory,
    next_of,
    shared_stack,
    store_env,
)
from tests.contract.rabbit_support import RABBITMQ_URL, rabbit_topology
from tests.support.cluster import Node, cluster_env, dynamodb_cluster_env
from tests.support.postgres import fresh_database


class FakeHook:
    """A webhook gateway: records what it is sent, answers from a script (then 200)."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[dict[str, Any], bool]] = asyncio.Queue()
        self.replies: list[tuple[int, dict[str, str]]] = []
        self.secret = b""
        self.url = ""
        #: While set, requests are recorded but not answered (a worker killed mid-push).
        self.hold: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signed = verify_signature(
            self.secret,
            request.headers["X-Pigeon-Timestamp"],
            body,
            request.headers["X-Pigeon-Signature"],
        )
        await self.received.put((msgspec.json.decode(body), signed))
        if self.hold is not None:
            await self.hold.wait()
        status, headers = self.replies.pop(0) if self.replies else (200, {})
        return web.Response(status=status, headers=headers)

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        note, signed = await asyncio.wait_for(self.received.get(), timeout)
        assert signed, "the webhook signature does not verify"
        return note


@pytest.fixture
async def hook() -> AsyncIterator[FakeHook]:
    fake = FakeHook()
    app = web.Application()
    app.router.add_post("/hook", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield fake
    if fake.hold is not None:
        fake.hold.set()
    await runner.cleanup()


PUSH_SETTINGS = {
    "grace": 0.2,
    "window": 30.0,
    "poll_interval": 0.05,
    "backoff_base": 0.05,
    "backoff_max": 0.1,
    "max_attempts": 3,
    "webhook_hosts": ["127.0.0.1"],
    "allow_private_targets": True,
}


class FrozenClock:
    """A clock that stands still until the test moves it: sends "at once" really are."""

    def __init__(self) -> None:
        self.now = SystemClock().now_ms()

    def now_ms(self) -> int:
        return self.now


@pytest.fixture
async def own_store(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Settings overrides for this test's store: with the shared stack, a PostgreSQL database
    of its own (see the module docstring); on DynamoDB, tables of its own; nothing to change
    on the embedded one (a SQLite file per server)."""
    if STACK == "embedded":
        yield {}
        return
    if STACK == "dynamodb":
        yield {"store": shared_stack(request)["store"]}
        return
    async with fresh_database() as dsn:
        yield {"store": {"type": "postgres", "dsn": dsn}}


#: The push queues a test marked `both_queues` runs on: RabbitMQ only on the shared stack,
#: where a cluster would use it.
QUEUES = ["store", "rabbitmq"] if STACK != "embedded" else ["store"]
both_queues = pytest.mark.parametrize("push_queue", QUEUES, indirect=True)


@pytest.fixture
async def push_queue(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Push settings of the queue (`store` unless the test is parametrized): for RabbitMQ, a
    queue prefix of the test's own, whose queues are deleted after the servers stopped."""
    if getattr(request, "param", "store") == "store":
        yield {}
        return
    async with rabbit_topology() as prefix:
        yield {
            "queue": "rabbitmq",
            "rabbitmq_url": RABBITMQ_URL,
            "rabbitmq_prefix": prefix,
            "relay_lease": 120.0,
        }


def outbox_of(server: Server) -> PushQueue:
    """The server's outbox table (its push queue, or what feeds its RabbitMQ queue)."""
    queue = server.app[PUSH].queue
    assert queue is not None
    return queue.outbox if isinstance(queue, RabbitPushQueue) else queue


PushServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def push_server(
    own_store: dict[str, Any],
    push_queue: dict[str, Any],
    make_server: ServerFactory,
    hook: FakeHook,
) -> PushServerFactory:
    """Start a server that pushes to `hook` (settings overrides as for `make_server`)."""

    async def make(**kw: Any) -> Server:
        push = {**PUSH_SETTINGS, **push_queue, **kw.pop("push", {})}
        server = await make_server(push=push, **own_store, **kw)
        secret = server.app[SETTINGS].webhook_secret_file()
        hook.secret = load_or_create_secret(secret) if secret.exists() else b""
        return server

    return make


def outcomes(server: Server) -> asyncio.Queue[tuple[str, PushJob]]:
    """Every job the server's push worker answers, as (outcome, job)."""
    answered: asyncio.Queue[tuple[str, PushJob]] = asyncio.Queue()
    (worker,) = server.app[PUSH_WORKER]
    worker.observe(lambda outcome, job: answered.put_nowait((outcome, job)))
    return answered


async def rest(server: Server | str, method: str, path: str, token: str, body: Any = None) -> Any:
    base = server if isinstance(server, str) else server.url
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            f"{base}{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        doc = await resp.json() if resp.status != 204 else None
        return resp.status, doc


async def pigeon_cli(*args: str, store: dict[str, Any]) -> str:
    """Run the `pigeon` command line (another process, as an operator would) on the test's
    store (`own_store`), and its output."""
    env = dict(os.environ)
    if "store" in store:
        env |= store_env(conftest.test_settings(Path("."), store))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pigeon.cli", *args, stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out
    return out.decode()


async def away_bob(server: Server, hook: FakeHook) -> tuple[Account, str]:
    """bob: a device whose target is the fake gateway, logged in but never connected."""
    bob_name, bob_id = await server.user("bob")
    bob = await server.device(bob_name)
    await register_hook(server, bob, hook)
    return bob, bob_id


async def register_hook(server: Server | str, account: Account, hook: FakeHook) -> None:
    """The device's target is the fake gateway (through REST)."""
    target = {"kind": "webhook", "url": hook.url}
    status, _ = await rest(server, "PUT", "/v1/devices/me/push", account.token, target)
    assert status == 204


@both_queues
async def test_offline_member_is_pushed_online_member_is_not(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    clock = FrozenClock()
    server = await push_server(clock=clock)
    answered = outcomes(server)
    alice = await server.new_client("alice")
    bob, bob_id = await away_bob(server, hook)
    carol = await server.new_client("carol", auto_ack=False)
    await carol.request("push_register", target={"kind": "webhook", "url": hook.url})
    assert alice.user and carol.user
    chat = await alice.create_chat([bob_id, carol.user], name="trip")
    sent = await alice.send(chat["id"], "the secret plan")
    assert (await next_of(carol, Message)).id == sent.id  # carol is online: she acks
    await carol.ack(2**62)  # everything she has (the server clamps it)
    clock.now += 1_000  # the grace is over

    note = await hook.next()  # the invitation and the message, in one push
    assert (note["device"], note["chat"], note["count"]) == (bob.device, chat["id"], 2)
    assert note["badge"] == 1 and note["collapse_key"] == chat["id"]
    assert "secret" not in msgspec.json.encode(note).decode()  # never a body
    assert note["sender_name"] is None  # bob did not allow names
    seen = {}
    while len(seen) < 2:  # bob's job and carol's
        outcome, job = await asyncio.wait_for(answered.get(), 5)
        seen[job.device] = outcome
    assert seen == {bob.device: "sent", carol.device: "skipped"}
    assert hook.received.empty()


@both_queues
async def test_an_invitation_into_a_group_is_pushed(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    server = await push_server()
    alice = await server.new_client("alice")
    bob, bob_id = await away_bob(server, hook)
    carol = await server.new_client("carol")
    assert carol.user
    group = await alice.create_chat([carol.user], name="later")
    await alice.request("modify_participants", chat=group["id"], add=[bob_id])
    note = await hook.next()
    assert (note["device"], note["chat"], note["count"]) == (bob.device, group["id"], 1)
    created = await alice.create_chat([bob_id], name="at once")
    note = await hook.next()
    assert (note["device"], note["chat"], note["count"]) == (bob.device, created["id"], 1)


@both_queues
async def test_a_disabled_user_gets_no_push_until_enabled(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    server = await push_server()
    answered = outcomes(server)
    accounts = server.app[SERVICES].accounts
    alice = await server.new_client("alice")
    bob, bob_id = await away_bob(server, hook)
    chat = await alice.create_chat([bob_id])  # a direct chat: no invitation to push
    await accounts.disable(bob_id)  # as `pigeon admin users disable` does
    await alice.send(chat["id"], "are you there?")
    outcome, job = await asyncio.wait_for(answered.get(), 5)
    assert (outcome, job.device, job.chat) == ("skipped", bob.device, chat["id"])
    assert hook.received.empty()

    await accounts.enable(bob_id)
    await alice.send(chat["id"], "back?")
    note = await hook.next()
    assert (note["device"], note["chat"], note["count"]) == (bob.device, chat["id"], 2)
    assert (await asyncio.wait_for(answered.get(), 5))[0] == "sent"


@both_queues
async def test_a_burst_is_one_push_and_the_window_holds_the_next(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    clock = FrozenClock()
    server = await push_server(clock=clock, push={"grace": 1.0})
    answered = outcomes(server)
    alice = await server.new_client("alice")
    bob, bob_id = await away_bob(server, hook)
    await rest(server, "PUT", "/v1/me/push-show-names", bob.token, {"show": True})
    chat = await alice.create_chat([bob_id])
    for i in range(5):
        await alice.send(chat["id"], f"m{i}")
    clock.now += 1_000  # their grace is over
    note = await hook.next()
    assert (note["count"], note["badge"]) == (5, 5)
    assert note["sender_name"].startswith("alice")
    assert (await asyncio.wait_for(answered.get(), 5))[0] == "sent"

    await alice.send(chat["id"], "one more")  # inside the window: held until it ends
    assert await outbox_of(server).next_due() == clock.now + 30_000
    clock.now += 30_000
    note = await hook.next()
    assert (note["count"], note["badge"]) == (6, 6)  # bob has received none of the six


@both_queues
async def test_gateway_errors_are_retried_then_dead_lettered_and_retried_by_hand(
    push_server: PushServerFactory, hook: FakeHook, own_store: dict[str, Any]
) -> None:
    server = await push_server(push={"window": 0})  # each push at once
    answered = outcomes(server)
    alice = await server.new_client("alice")
    bob, bob_id = await away_bob(server, hook)
    chat = await alice.create_chat([bob_id])

    hook.replies = [(429, {"Retry-After": "0"}), (503, {})]
    await alice.send(chat["id"], "hello")
    for _ in range(3):
        await hook.next()
    got = [(await asyncio.wait_for(answered.get(), 5))[0] for _ in range(3)]
    assert got == ["retried", "retried", "sent"]

    hook.replies = [(500, {})] * 3  # max_attempts: 3
    await alice.send(chat["id"], "again")
    got = [(await asyncio.wait_for(answered.get(), 5))[0] for _ in range(3)]
    assert got == ["retried", "retried", "dead"]
    queue = server.app[PUSH].queue
    assert queue is not None
    (letter,) = await queue.dead_letters(10)
    assert (letter.device, letter.chat, letter.attempts) == (bob.device, chat["id"], 3)
    assert "500" in letter.error
    for _ in range(3):
        await hook.next()

    data_dir = str(server.app[SETTINGS].data_dir)
    listed = await pigeon_cli("push", "dlq", "list", "--data-dir", data_dir, store=own_store)
    assert f"{letter.id}\t" in listed and bob.device in listed and "HTTP 500" in listed
    retried = await pigeon_cli(
        "push", "dlq", "retry", str(letter.id), "--data-dir", data_dir, store=own_store
    )
    assert retried.strip() == "1 queued again"
    assert (await asyncio.wait_for(answered.get(), 5))[0] == "sent"
    assert await queue.dead_letters(10) == []
    await hook.next()
    assert await queue.dead_letters(10) == []


@both_queues
async def test_the_senders_push_preview_is_shown_and_never_the_body(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    server = await push_server()
    alice = await server.new_client("alice")
    _, bob_id = await away_bob(server, hook)
    chat = await alice.create_chat([bob_id])
    with pytest.raises(ClientError) as err:
        await alice.send(chat["id"], "x", push_preview="p" * 1025)
    assert err.value.code == "too_large"
    await alice.send(chat["id"], "the plain text", push_preview="ENC:9f2c…")
    note = await hook.next()
    assert (note["preview"], note["count"]) == ("ENC:9f2c…", 1)
    assert "plain" not in msgspec.json.encode(note).decode()


async def test_an_encrypted_message_is_pushed_with_the_senders_preview_only(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    """No server-side preview of what the server cannot read: the push of an encrypted
    message carries the sender's (encrypted) `push_preview`, never the ciphertext."""
    server = await push_server()
    alice = await server.new_client("alice")
    _, bob_id = await away_bob(server, hook)
    chat = await alice.request("create_chat", participants=[bob_id], encrypted=True)
    sealed = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": "A" * 43,
        "session_id": "s1",
        "ciphertext": "Q0lQSEVSVEVYVA",  # "CIPHERTEXT"
    }
    await alice.request("send", chat=chat["id"], cmid="e", e2e=sealed, push_preview="ENC:c2VjcmV0")
    note = await hook.next()
    assert (note["preview"], note["title"]) == ("ENC:c2VjcmV0", "New message")
    assert "Q0lQSEVSVEVYVA" not in msgspec.json.encode(note).decode()


@both_queues
async def test_a_gone_target_is_removed_and_the_device_sees_why(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    server = await push_server()
    answered = outcomes(server)
    alice = await server.new_client("alice")
    bob, bob_id = await away_bob(server, hook)
    chat = await alice.create_chat([bob_id])
    hook.replies = [(410, {})]
    await alice.send(chat["id"], "anyone there?")
    assert (await asyncio.wait_for(answered.get(), 5))[0] == "gone"
    status, doc = await rest(server, "GET", "/v1/devices/me/push", bob.token)
    assert status == 200 and doc == {"removed": "HTTP 410"}
    bob_client = await server.client(bob)
    assert await bob_client.request("push_status") == {"removed": "HTTP 410"}


async def test_registration_is_checked(push_server: PushServerFactory, hook: FakeHook) -> None:
    server = await push_server()
    client = await server.new_client("dora")
    target = {"kind": "webhook", "url": hook.url}
    await client.request("push_register", target=target)
    assert await client.request("push_status") == {"target": target}
    refusals = [
        ({"kind": "fcm", "token": "abc"}, "push_unsupported"),  # no FCM credentials here
        ({"kind": "webhook", "url": "https://elsewhere.example/hook"}, "forbidden"),
        ({"kind": "webhook"}, "bad_request"),
        ({"kind": "webhook", "url": hook.url, "token": "x"}, "bad_request"),
        (
            {"kind": "webpush", "endpoint": "https://push.example/x", "p256dh": "AA", "auth": "AA"},
            "bad_request",
        ),
        ({"kind": "pager"}, "bad_request"),
    ]
    for bad, code in refusals:
        with pytest.raises(ClientError) as err:
            await client.request("push_register", target=bad)
        assert err.value.code == code, bad
    assert await client.request("push_status") == {"target": target}  # unchanged
    await client.request("push_unregister")
    assert await client.request("push_status") == {}
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/v1/push/vapid-key") as r:
        assert r.status == 200 and len((await r.json())["key"]) == 87  # 65 bytes, base64url


async def test_push_is_refused_clearly_when_it_is_off(
    push_server: PushServerFactory, hook: FakeHook
) -> None:
    server = await push_server(push={"enabled": False})
    client = await server.new_client("erin")
    with pytest.raises(ClientError) as err:
        await client.request("push_register", target={"kind": "webhook", "url": hook.url})
    assert err.value.code == "push_unsupported"
    await client.request("push_unregister")  # nothing to remove: fine
    assert await client.request("push_status") == {}


@pytest.fixture
def node_env(own_store: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of a `pigeon serve` process on the test's store: the SQLite file in its
    data directory, or (the other stacks) the test's PostgreSQL database or DynamoDB tables
    and the shared Redis."""
    if "store" not in own_store:
        return {
            "PIGEON_ARGON2_TIME_COST": "1",
            "PIGEON_ARGON2_MEMORY_KIB": "8",
            "PIGEON_STORE__SYNCHRONOUS": "FULL",
        }
    store, redis_url = own_store["store"], request.getfixturevalue("redis_url")
    if store["type"] == "dynamodb":
        return dynamodb_cluster_env(store["endpoint_url"], store["table_prefix"], redis_url)
    return cluster_env(store["dsn"], redis_url)


def process_env(base: dict[str, str], **push: str) -> dict[str, str]:
    env = {
        **base,
        "PIGEON_PUSH__WEBHOOK_HOSTS": '["127.0.0.1"]',
        "PIGEON_PUSH__ALLOW_PRIVATE_TARGETS": "true",
        "PIGEON_PUSH__POLL_INTERVAL": "0.05",
    }
    return env | {f"PIGEON_PUSH__{k.upper()}": v for k, v in push.items()}


async def offline_bob(node: Node, hook: FakeHook) -> tuple[PigeonClient, str, Account]:
    """alice (connected) and bob (a device with the hook as target, offline) in a chat."""
    await register(node.url, "alice", PASSWORD)
    bob_id = await register(node.url, "bob", PASSWORD)
    alice = PigeonClient(node.url, (await login(node.url, "alice", PASSWORD)).token)
    alice.reconnect = False
    await alice.connect()
    bob = await login(node.url, "bob", PASSWORD)
    await register_hook(node.url, bob, hook)
    chat = await alice.create_chat([bob_id])
    hook.secret = load_or_create_secret(node.data_dir / "push-webhook-secret")
    return alice, chat["id"], bob


async def test_a_node_killed_right_after_the_commit_loses_no_push(
    tmp_path: Path, hook: FakeHook, node_env: dict[str, str]
) -> None:
    node = Node(process_env(node_env, grace="3"), tmp_path / "data")
    await node.start()
    try:
        alice, chat, bob = await offline_bob(node, hook)
        await alice.send(chat, "sent, then the node dies")
        node.kill()  # the push was due only 3 s after the commit
        assert node.proc is not None
        await node.proc.wait()
        await alice.close()
        assert hook.received.empty()
        await node.start()
        note = await hook.next(timeout=15)
        assert (note["device"], note["chat"], note["count"]) == (bob.device, chat, 1)
    finally:
        await node.close()


async def test_a_push_in_flight_when_its_worker_dies_is_sent_after_the_lease(
    tmp_path: Path, hook: FakeHook, node_env: dict[str, str]
) -> None:
    env = process_env(node_env, grace="0", visibility_timeout="1", gateway_timeout="0.4")
    node = Node(env, tmp_path / "data")
    await node.start()
    try:
        hook.hold = asyncio.Event()  # the gateway takes the request and never answers
        alice, chat, bob = await offline_bob(node, hook)
        await alice.send(chat, "in flight")
        first = await hook.next(timeout=10)
        node.kill()
        assert node.proc is not None
        await node.proc.wait()
        await alice.close()
        hook.hold.set()
        hook.hold = None
        await node.start()  # the job is leased for 1 s from the first attempt: then sent again
        again = await hook.next(timeout=15)
        assert again == first and first["device"] == bob.device
    finally:
        await node.close()
