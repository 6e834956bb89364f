"""`pigeon push-worker --metrics-address`: a real push-worker process serves its Prometheus
metrics (push outcomes, the push queue's depth and lag, its store operations) while it pushes
for a real server on the same embedded store, through a fake webhook gateway on loopback.
Without the option it opens no port; an address it cannot bind is a one-line start-up error.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pigeon.adapters.push.webpush import load_or_create_vapid_key
from pigeon.adapters.secret_files import load_or_create_secret
from pigeon.bench.server import free_port
from tests import conftest
from tests.conftest import STACK, start_server, stop_server
from tests.e2e.test_metrics import Samples, parse, value
from tests.e2e.test_push import PUSH_SETTINGS, FakeHook, process_env, register_hook
from tests.e2e.test_push_rabbitmq import PushWorkerProcess, run_push_worker

# The worker shares the server's SQLite file: the shared stack would only run it again.
pytestmark = pytest.mark.skipif(STACK != "embedded", reason="runs in the embedded pass")


@pytest.fixture
async def gateway() -> AsyncIterator[FakeHook]:
    """The fake webhook gateway (as tests/e2e/test_push.py's `hook`)."""
    fake = FakeHook()
    app = web.Application()
    app.router.add_post("/hook", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield fake
    await runner.cleanup()


async def scrape_worker(url: str) -> tuple[int, Samples]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, parse(await resp.text()) if resp.status == 200 else []


async def scrape_until(
    url: str, name: str, want: float, *, falling: bool = False, **labels: str
) -> Samples:
    """Scrape until the sample reaches `want` (from below, or from above if `falling`): the
    worker is another process, which counts an outcome after the gateway answered (no event
    reaches this one)."""
    async with asyncio.timeout(20):
        while True:
            _, samples = await scrape_worker(url)
            got = value(samples, name, **labels)
            if (got <= want) if falling else (got >= want):
                return samples
            await asyncio.sleep(0.05)  # polling another process


async def test_a_push_worker_serves_its_metrics(tmp_path: Path, gateway: FakeHook) -> None:
    data = tmp_path / "data"
    settings = conftest.test_settings(data, push={**PUSH_SETTINGS, "serve_runs_worker": False})
    server = await start_server(settings)
    port = free_port()
    env = process_env(
        {"PIGEON_STORE__SYNCHRONOUS": "NORMAL", "PIGEON_LOG_JSON": "false"},
        grace="0",
        backoff_base="0.05",
        backoff_max="0.1",
    )
    worker = PushWorkerProcess(env, data, "--metrics-address", f"127.0.0.1:{port}")
    try:
        await worker.start()
        url = f"http://127.0.0.1:{port}/metrics"
        assert any(f"metrics on {url}" in line for line in worker.lines)
        status, idle = await scrape_worker(url)
        assert status == 200
        assert value(idle, "pigeon_push_queue_jobs") == 0
        assert value(idle, "pigeon_push_queue_lag_seconds") == 0
        assert value(idle, "pigeon_connections") == -1  # a serving node's metrics: not here

        gateway.secret = load_or_create_secret(data / "push-webhook-secret")
        gateway.replies.append((503, {}))  # the first attempt fails: retried
        alice = await server.new_client("alice")
        bob_name, bob_id = await server.user("bob")
        bob = await server.device(bob_name)
        await register_hook(server, bob, gateway)
        chat = await alice.create_chat([bob_id])
        await alice.send(chat["id"], "hello")

        assert (await gateway.next())["device"] == bob.device  # answered 503
        note = await gateway.next()  # the retry
        assert (note["device"], note["chat"]) == (bob.device, chat["id"])
        s = await scrape_until(url, "pigeon_push_outcomes_total", 1, result="sent")
        assert value(s, "pigeon_push_outcomes_total", result="sent") == 1
        assert value(s, "pigeon_push_outcomes_total", result="retried") == 1
        assert value(s, "pigeon_push_outcomes_total", result="dead") == 0
        # the job leaves the queue just after its outcome is counted
        s = await scrape_until(url, "pigeon_push_queue_jobs", 0, falling=True)
        assert value(s, "pigeon_push_queue_jobs") == 0  # answered
        assert value(s, "pigeon_push_queue_due_jobs") == 0
        assert value(s, "pigeon_store_operation_seconds_count", op="push_queue_claim") >= 2
        assert value(s, "pigeon_store_operation_seconds_count", op="push_context") >= 2
        async with aiohttp.ClientSession() as http, http.get(url[: -len("metrics")]) as resp:
            assert resp.status == 404  # nothing else is served
        assert await worker.terminate() == 0
    finally:
        await worker.close()
        await stop_server(server)


async def test_a_push_worker_opens_no_port_unless_asked_and_says_when_it_cannot(
    tmp_path: Path,
) -> None:
    load_or_create_vapid_key(tmp_path / "vapid.pem")  # as `pigeon serve` makes them
    load_or_create_secret(tmp_path / "push-webhook-secret")
    env = {"PIGEON_LOG_JSON": "false"}
    worker = PushWorkerProcess(env, tmp_path)
    try:
        await worker.start()
        assert not any("metrics on" in line for line in worker.lines)
        assert await worker.terminate() == 0
    finally:
        await worker.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        code, err = await run_push_worker(tmp_path, PIGEON_METRICS__PUSH_WORKER_ADDRESS=address)
    assert code == 1
    assert err[-1] == (
        f"pigeon: error: cannot listen on {address} for metrics: Address already in use"
    )
    code, err = await run_push_worker(tmp_path, PIGEON_METRICS__PUSH_WORKER_ADDRESS="9464")
    assert code == 2
    assert "metrics.push_worker_address (PIGEON_METRICS__PUSH_WORKER_ADDRESS)" in err[-1]
