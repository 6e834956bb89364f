"""`/metrics`: what a real server counts after real traffic; the Grafana dashboard queries only
metrics that exist; `--workers 2` sums its workers (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pigeon.app import PUSH_WORKER
from pigeon.bench.server import free_port
from pigeon.client import PigeonClient, login, register
from pigeon.domain.events import Message, Receipt
from pigeon.domain.ids import new_id
from pigeon.metrics import METRICS
from pigeon.ports import PushJob
from tests import conftest
from tests.conftest import (
    PASSWORD,
    STACK,
    ManualClock,
    Server,
    next_of,
    start_server,
    stop_server,
)
from tests.support.cluster import Node, cluster_env
from tests.support.postgres import fresh_database

# The servers here choose their own stack (the multiprocess test needs PostgreSQL and Redis):
# the shared-stack pass of `make test` would only run them again.
pytestmark = pytest.mark.skipif(STACK != "embedded", reason="runs in the embedded pass")

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "pigeon.json"

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (-1: none exists)."""
    found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
    return sum(found) if found else -1.0


async def scrape(url: str) -> Samples:
    """GET /metrics on a fresh connection (with --workers: answered by any worker)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"{url}/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """An embedded server whose push worker polls often and pushes at once (no grace), to
    webhooks on loopback, and that reads its inboxes' depth often."""
    settings = conftest.test_settings(
        tmp_path / "data",
        metrics={"inbox_interval": 0.1},
        push={
            "grace": 0.0,
            "poll_interval": 0.05,
            "webhook_hosts": ["127.0.0.1"],
            "allow_private_targets": True,
        },
    )
    server = await start_server(settings)
    yield server
    await stop_server(server)


async def traffic(server: Server, tmp_path: Path) -> dict[str, Any]:
    """alice sends bob a message and a file, which bob receives, acks and downloads; a bad
    frame; a push to bob's other device (away) fails (nothing listens): retried."""
    alice = await server.new_client("alice")
    bob_name, bob_id = await server.user("bob")
    bob = await server.client(await server.device(bob_name))
    away = await server.device(bob_name, "away")
    target = {"kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/hook"}
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            f"{server.url}/v1/devices/me/push",
            json=target,
            headers={"Authorization": f"Bearer {away.token}"},
        ) as resp,
    ):
        assert resp.status == 204
    outcomes: asyncio.Queue[str] = asyncio.Queue()
    (worker,) = server.app[PUSH_WORKER]

    def answered(outcome: str, job: PushJob) -> None:
        outcomes.put_nowait(outcome)

    worker.observe(answered)

    chat = (await alice.create_chat([bob_id]))["id"]
    sent = await alice.send(chat, "hello")
    assert (await next_of(bob, Message)).id == sent.id
    await next_of(alice, Receipt)  # bob's ack is committed
    source = tmp_path / "note.txt"
    source.write_bytes(b"pigeon " * 1000)
    await alice.send_file(chat, source, "a file")
    got = await next_of(bob, Message)
    assert got.attachment is not None
    size = await bob.download(got.attachment.id, tmp_path / "copy.txt")
    ws = await server.raw_ws(away)
    await ws.send_str('{"t":"send","rid":1}')  # no chat, no cmid: does not decode
    assert (await error_reply(ws))["code"] == "bad_request"
    unknown = {"t": "send", "rid": 2, "chat": new_id(), "cmid": "c1", "body": "?"}
    await ws.send_str(json.dumps(unknown))
    assert (await error_reply(ws))["code"] == "not_found"
    assert await asyncio.wait_for(outcomes.get(), 10) == "retried"  # connection refused
    return {"size": size}


async def error_reply(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next error frame (skipping `ready`, `synced` and events)."""
    while True:
        frame: dict[str, Any] = json.loads((await ws.receive(timeout=5)).data)
        if frame.get("t") == "error":
            return frame


async def test_metrics_after_a_send_between_two_clients(server: Server, tmp_path: Path) -> None:
    seen = await traffic(server, tmp_path)
    s = await scrape(server.url)

    assert value(s, "pigeon_connections") == 3  # alice, bob and the raw socket
    assert value(s, "pigeon_commands_total", command="send", code="ok") == 2
    assert value(s, "pigeon_commands_total", command="create_chat", code="ok") == 1
    assert value(s, "pigeon_commands_total", command="ack", code="ok") >= 1
    assert value(s, "pigeon_commands_total", command="invalid", code="bad_request") == 1
    assert value(s, "pigeon_commands_total", command="send", code="not_found") == 1
    assert value(s, "pigeon_send_commit_seconds_count") == 2
    assert value(s, "pigeon_send_commit_seconds_bucket", le="+Inf") == 2
    assert 0 < value(s, "pigeon_send_commit_seconds_sum") < 5
    assert value(s, "pigeon_send_delivery_seconds_count") == 2
    assert value(s, "pigeon_sync_seconds_count") >= 2  # on connect
    for op in ("send", "ack", "read_inbox", "device_status", "attachment_create", "push_context"):
        assert value(s, "pigeon_store_operation_seconds_count", op=op) >= 1, op
    assert value(s, "pigeon_store_operation_seconds_count", op="push_queue_claim") >= 1
    assert value(s, "pigeon_bus_publish_seconds_count") >= 2
    assert value(s, "pigeon_bus_published_frames_total") >= 2
    assert value(s, "pigeon_push_outcomes_total", result="retried") == 1
    assert value(s, "pigeon_push_outcomes_total", result="sent") == 0
    assert value(s, "pigeon_push_queue_jobs") == 1  # waiting for its retry
    assert value(s, "pigeon_push_queue_due_jobs") == 0  # its backoff is not over
    assert value(s, "pigeon_push_queue_lag_seconds") == 0
    assert value(s, "pigeon_blob_received_bytes_total") == 7000
    assert value(s, "pigeon_blob_sent_bytes_total") == seen["size"] == 7000


async def test_the_inbox_gauges_say_what_waits_in_the_store(tmp_path: Path) -> None:
    """Read by a task every `metrics.inbox_interval`: entries waiting for an ack on every
    device, and how old the oldest is (by the server's clock)."""
    clock = ManualClock()
    settings = conftest.test_settings(tmp_path / "data", metrics={"inbox_interval": 0.05})
    server = await start_server(settings, clock)
    try:
        inbox = server.app[METRICS].inbox
        alice = await server.new_client("alice", auto_ack=False)
        bob_name, bob_id = await server.user("bob")
        await server.device(bob_name)  # never connects: what is sent to bob waits for it
        chat = await alice.create_chat([bob_id])  # a chat_update for alice and one for bob
        for i in range(3):
            await alice.send(chat["id"], f"m{i}")
        clock.offset_ms += 90_000
        depth = await asyncio.wait_for(inbox.next_reading(), 5)
        assert depth.entries == 5
        s = await scrape(server.url)
        assert value(s, "pigeon_inbox_entries") == 5
        assert 90 <= value(s, "pigeon_inbox_oldest_entry_age_seconds") < 120
        assert value(s, "pigeon_store_operation_seconds_count", op="inbox_depth") >= 1

        await alice.ack(1)  # her chat_update
        await asyncio.wait_for(inbox.next_reading(), 5)
        assert value(await scrape(server.url), "pigeon_inbox_entries") == 4
    finally:
        await stop_server(server)


async def test_no_inbox_gauges_when_their_reading_is_off(tmp_path: Path) -> None:
    settings = conftest.test_settings(tmp_path / "data", metrics={"inbox_interval": 0})
    server = await start_server(settings)
    try:
        s = await scrape(server.url)
        assert value(s, "pigeon_store_operation_seconds_count", op="inbox_depth") == -1
        assert value(s, "pigeon_inbox_entries") == -1  # absent: a zero would say "empty"
    finally:
        await stop_server(server)


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


async def test_the_dashboard_queries_only_metrics_a_server_exposes(
    server: Server, tmp_path: Path
) -> None:
    exprs = dashboard_queries()
    assert len(exprs) >= 12
    await traffic(server, tmp_path)
    await asyncio.wait_for(server.app[METRICS].inbox.next_reading(), 5)  # the inbox gauges
    exposed = {name for name, _, _ in await scrape(server.url)}
    used = {name for expr in exprs for name in re.findall(r"\bpigeon_[a-z0-9_]+", expr)}
    assert used, "the dashboard queries no pigeon metric"
    assert used <= exposed, f"queried but not exposed: {sorted(used - exposed)}"


async def _worker_connections(url: str, workers: int) -> dict[int, int]:
    """Each worker's WebSocket count from /healthz (fresh connections land on any worker)."""
    counts: dict[int, int] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, asyncio.timeout(20):
        while len(counts) < workers:
            async with http.get(f"{url}/healthz") as resp:
                body = await resp.json()
            counts[int(body["pid"])] = int(body["connections"])
    return counts


async def _until(url: str, check: Any, what: str) -> Samples:
    """Scrape until `check(samples)` holds: a worker folds its counts into the shared files
    every second (metrics.FLUSH_INTERVAL)."""
    async with asyncio.timeout(15):
        while True:
            samples = await scrape(url)
            if check(samples):
                return samples
            await asyncio.sleep(0.1)  # polling the other worker's next flush


async def test_workers_are_summed_and_a_dead_workers_connections_leave(
    redis_url: str, tmp_path: Path
) -> None:
    async with fresh_database() as dsn:
        (tmp_path / "tmp").mkdir()
        env = {**cluster_env(dsn, redis_url), "TMPDIR": str(tmp_path / "tmp")}
        node = Node(env, tmp_path / "node", workers=2)
        clients: list[PigeonClient] = []
        try:
            await node.start()
            users: list[str] = []
            counts: dict[int, int] = {}
            # until both workers hold connections (the kernel spreads them at random)
            while len(users) < 4 or min(counts.values()) == 0:
                name = f"metrics_user{len(users)}"
                users.append(await register(node.url, name, PASSWORD))
                token = (await login(node.url, name, PASSWORD)).token
                client = PigeonClient(node.url, token, reconnect=False)
                await client.connect()
                clients.append(client)
                counts = await _worker_connections(node.url, 2)
            n = len(clients)
            assert sum(counts.values()) == n
            for i, client in enumerate(clients):  # every worker sends
                chat = await client.create_chat([users[(i + 1) % n]])
                await client.send(chat["id"], f"from {i}")

            def everything(s: Samples) -> bool:
                return (
                    value(s, "pigeon_commands_total", command="send", code="ok") == n
                    and value(s, "pigeon_send_commit_seconds_count") == n
                    and value(s, "pigeon_store_operation_seconds_count", op="send") == n
                )

            s = await _until(node.url, everything, "the sends of both workers")
            assert value(s, "pigeon_connections") == n
            assert value(s, "pigeon_commands_total", command="create_chat", code="ok") == n

            dead = next(iter(counts))
            os.kill(dead, signal.SIGKILL)  # the supervisor marks it dead, then restarts it
            left = n - counts[dead]
            s = await _until(
                node.url,
                lambda s: value(s, "pigeon_connections") == left,
                "the dead worker's connections gone",
            )
            # what it counted stays counted
            assert value(s, "pigeon_commands_total", command="send", code="ok") == n
            for client in clients:
                await client.close()
            clients.clear()
            assert await node.terminate() == 0
            assert not os.listdir(tmp_path / "tmp")  # the metrics directory, removed at exit
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            await node.close()


async def test_workers_show_the_store_wide_inbox_depth_once(redis_url: str, tmp_path: Path) -> None:
    """Every worker of `--workers 2` reads the same store-wide figures: a scrape shows them
    once (the newest reading of a live worker), not summed over the workers."""
    async with fresh_database() as dsn:
        (tmp_path / "tmp").mkdir()
        env = {
            **cluster_env(dsn, redis_url),
            "TMPDIR": str(tmp_path / "tmp"),
            "PIGEON_METRICS__INBOX_INTERVAL": "0.05",
        }
        node = Node(env, tmp_path / "node", workers=2)
        alice: PigeonClient | None = None
        try:
            await node.start()
            await register(node.url, "inbox_alice", PASSWORD)
            bob_id = await register(node.url, "inbox_bob", PASSWORD)
            await login(node.url, "inbox_bob", PASSWORD)  # a device that never connects
            token = (await login(node.url, "inbox_alice", PASSWORD)).token
            alice = PigeonClient(node.url, token, reconnect=False, auto_ack=False)
            await alice.connect()
            chat = await alice.create_chat([bob_id])  # a chat_update for each device
            for i in range(3):
                await alice.send(chat["id"], f"m{i}")
            readings = "pigeon_store_operation_seconds_count"
            before = max(0.0, value(await scrape(node.url), readings, op="inbox_depth"))

            def both_read_since(s: Samples) -> bool:  # each worker reads 20 times a second
                return value(s, readings, op="inbox_depth") >= before + 40

            s = await _until(node.url, both_read_since, "readings of both workers")
            assert value(s, "pigeon_inbox_entries") == 5
            assert 0 <= value(s, "pigeon_inbox_oldest_entry_age_seconds") < 60
        finally:
            if alice is not None:
                await alice.close()
            await node.close()
