"""`pigeon push-worker` processes on PostgreSQL + RabbitMQ, as a cluster runs them.

One `pigeon serve` node serves the clients (with `push.serve_runs_worker = false`) and two
`pigeon push-worker` processes push, through a fake webhook gateway on loopback. What is asserted:
every due push goes out exactly once while nothing fails; when one worker is killed with
SIGKILL while its pushes hang at the gateway, none is lost, and the pushes that go twice are
exactly those the killed worker had in flight (the gateway had not accepted them: it never
answered), which RabbitMQ redelivers to the other worker.
A worker stops gracefully on SIGTERM (exit 0); a start-up failure is one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from pigeon.adapters.push.rabbitmq import masked
from pigeon.adapters.push.webpush import load_or_create_vapid_key
from pigeon.adapters.secret_files import load_or_create_secret
from pigeon.client import Account, PigeonClient, login, register
from tests.conftest import PASSWORD
from tests.contract.rabbit_support import RABBITMQ_URL, rabbit_topology
from tests.e2e.test_push import FakeHook, process_env, register_hook
from tests.support.cluster import REPO, Node, cluster_env
from tests.support.postgres import fresh_database

#: Offline devices (one per user) in each group.
N = 20
#: Pushes in flight per worker process (and its RabbitMQ prefetch).
CONCURRENCY = 4


class PushWorkerProcess:
    """A `pigeon push-worker` OS process; its log lines are collected as they come."""

    def __init__(self, env: dict[str, str], data_dir: Path, *args: str) -> None:
        self.env = env
        self.data_dir = data_dir
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._running = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pigeon.cli",
            "push-worker",
            "--data-dir",
            str(self.data_dir),
            *self.args,
            env={**os.environ, **self.env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        self._reader = asyncio.ensure_future(self._read())
        exited = asyncio.ensure_future(self.proc.wait())
        running = asyncio.ensure_future(self._running.wait())
        await asyncio.wait([exited, running], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for task in (exited, running):
            task.cancel()
        if not self._running.is_set():
            raise RuntimeError("pigeon push-worker did not start:\n" + "\n".join(self.lines))

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:  # drained to the end: a full pipe would block it
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if "push-worker running" in line:
                self._running.set()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader is not None:
            await self._reader
        return code

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


@pytest.fixture
async def gateway() -> AsyncIterator[FakeHook]:
    """The fake webhook gateway (as tests/e2e/test_push.py's `hook`)."""
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


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Wait until `check()` is true: for what other processes write to the database, which
    sends no event here."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - another process: no event to wait on
            await asyncio.sleep(0.05)


async def received(hook: FakeHook, count: int, timeout: float = 20.0) -> list[dict[str, object]]:
    return [await hook.next(timeout) for _ in range(count)]


async def test_push_workers_deliver_every_push_and_a_killed_one_loses_none(
    tmp_path: Path, gateway: FakeHook, redis_url: str
) -> None:
    async with fresh_database() as dsn, rabbit_topology() as prefix:
        push = {
            "queue": "rabbitmq",
            "rabbitmq_url": RABBITMQ_URL,
            "rabbitmq_prefix": prefix,
            "serve_runs_worker": "false",
            "grace": "0",
            "concurrency": str(CONCURRENCY),
            "gateway_timeout": "2",
            "visibility_timeout": "5",
            "relay_lease": "6",  # a job a killed relay had claimed comes back after it
        }
        env = process_env(cluster_env(dsn, redis_url), **push)
        data_dir = tmp_path / "data"
        node = Node(env, data_dir)
        workers = [PushWorkerProcess(env, data_dir) for _ in range(2)]
        db = await asyncpg.connect(dsn)
        try:
            await node.start()  # it makes the push keys the workers share
            gateway.secret = load_or_create_secret(data_dir / "push-webhook-secret")
            await asyncio.gather(*(w.start() for w in workers))
            alice, devices = await offline_devices(node, gateway)

            async def idle() -> bool:
                return not await db.fetchval("SELECT count(*) FROM push_jobs WHERE pending")

            # 1. every invited device is pushed, exactly once
            await alice.create_chat([d.user for d in devices], name="first")
            notes = await received(gateway, N)
            await eventually(idle)
            assert sorted(str(n["device"]) for n in notes) == sorted(d.device for d in devices)
            assert gateway.received.empty()  # answered, and no second copy exists

            # 2. the gateway hangs; both workers have their pushes in flight; one is killed
            gateway.hold = asyncio.Event()
            second = await alice.create_chat([d.user for d in devices], name="second")
            in_flight = await received(gateway, 2 * CONCURRENCY)  # both workers' full loads
            workers[0].kill()
            assert workers[0].proc is not None
            await workers[0].proc.wait()
            gateway.hold.set()
            gateway.hold = None
            rest = await received(gateway, N - CONCURRENCY)  # the others, and the killed ones'
            await eventually(idle)
            notes = in_flight + rest
            while not gateway.received.empty():
                notes.append(await gateway.next())
            assert {n["chat"] for n in notes} == {second["id"]}
            times = Counter(str(n["device"]) for n in notes)
            assert sorted(times) == sorted(d.device for d in devices)  # none lost
            # twice: exactly what the killed worker had in flight (the gateway never answered)
            twice = {device for device, n in times.items() if n == 2}
            assert len(twice) == CONCURRENCY and set(times.values()) == {1, 2}
            assert twice <= {str(n["device"]) for n in in_flight}

            assert await workers[1].terminate() == 0
            assert any("push-worker stopped" in line for line in workers[1].lines)
            await alice.close()
        finally:
            await db.close()
            for w in workers:
                await w.close()
            await node.close()


async def offline_devices(node: Node, hook: FakeHook) -> tuple[PigeonClient, list[Account]]:
    """alice, connected, and N users with one device each whose target is the gateway, never
    connected."""
    await register(node.url, "alice", PASSWORD)
    alice = PigeonClient(node.url, (await login(node.url, "alice", PASSWORD)).token)
    alice.reconnect = False
    await alice.connect()

    async def one(i: int) -> Account:
        await register(node.url, f"bob{i}", PASSWORD)
        account = await login(node.url, f"bob{i}", PASSWORD)
        await register_hook(node.url, account, hook)
        return account

    devices = await asyncio.gather(*(one(i) for i in range(N)))
    return alice, list(devices)


async def run_push_worker(data_dir: Path, **env: str) -> tuple[int, list[str]]:
    """`pigeon push-worker` that is expected to stop by itself: its exit status and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pigeon.cli",
        "push-worker",
        "--data-dir",
        str(data_dir),
        env={**os.environ, "PIGEON_STORE__SYNCHRONOUS": "NORMAL", **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode().splitlines()


async def test_push_worker_start_up_failures_are_one_line(tmp_path: Path) -> None:
    rabbit = {"PIGEON_PUSH__QUEUE": "rabbitmq"}
    code, err = await run_push_worker(tmp_path, **rabbit)
    assert code == 1
    assert err[-1] == (
        f"pigeon: error: {tmp_path / 'vapid.pem'} is missing: copy it from a node that ran"
        " `pigeon serve`"
    )
    load_or_create_vapid_key(tmp_path / "vapid.pem")  # as `pigeon serve` makes them
    load_or_create_secret(tmp_path / "push-webhook-secret")
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        url = f"amqp://guest:secret@127.0.0.1:{unused.getsockname()[1]}/"
        code, err = await run_push_worker(tmp_path, **rabbit, PIGEON_PUSH__RABBITMQ_URL=url)
    assert code == 1
    assert err[-1].startswith(f"pigeon: error: cannot start: RabbitMQ at {masked(url)}: ")
    assert "guest:secret" not in "\n".join(err) and "Traceback" not in "\n".join(err)
    code, err = await run_push_worker(tmp_path, **rabbit, PIGEON_PUSH__RELAY_LEASE="1")
    assert code == 2 and "push.relay_lease must be > push.visibility_timeout" in err[-1]
