"""Redis for tests: the shared server, test-owned servers and a 3-master Redis Cluster.

The shared server (`PIGEON_TEST_REDIS_URL`, default redis://127.0.0.1:6379/0) is used by many
test sessions at once: tests only touch channels and keys with unique names and never flush it.
Fault tests start their own `RedisServer` (a `redis-server` process on a free loopback port,
no persistence) so they can stop, restart or freeze it. `RedisCluster` runs three cluster-enabled
masters for the sharded pub/sub and hash-tag code paths; one is shared by the whole session.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pigeon.bench.server import free_port

ENV_URL = "PIGEON_TEST_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT = 15.0


def answers_ping(url: str) -> bool:
    """Whether a Redis server answers PING at `url` right now."""
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def poll(predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Call `predicate` until it returns True; raise TimeoutError after `timeout` seconds.

    For processes we do not control: they have no event to wait on, so we ask again."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def require_redis_server() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed")


class RedisServer:
    """A test-owned `redis-server` on a free loopback port: no persistence, its own directory.

    `start`, `stop`, `restart` (same port, so clients can reconnect), `pause`/`resume` (SIGSTOP:
    the socket stays open but nothing answers) and `close`. The blocking `launch`/`halt` are for
    synchronous (session-scoped) fixtures; the async methods run them off the event loop.
    """

    def __init__(self, directory: Path, *, port: int | None = None, cluster: bool = False) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.url = f"redis://{self.host}:{self.port}/0"
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0  # cluster gossip, any free port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def spawn(self) -> None:
        """Start the process without waiting for it to answer (see `wait_ready`)."""
        require_redis_server()
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_port),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        """Block until the server answers PING (fail early if the process died)."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{log}")
            return answers_ping(self.url)

        poll(ready, f"redis-server on port {self.port}")

    def launch(self) -> None:
        """Blocking start: spawn and wait until PING answers."""
        self.spawn()
        self.wait_ready()

    def halt(self) -> None:
        """Blocking stop (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def start(self) -> None:
        await asyncio.to_thread(self.launch)

    async def stop(self) -> None:
        await asyncio.to_thread(self.halt)

    async def restart(self) -> None:
        """Stop, then start again on the same port (every client connection breaks)."""
        await self.stop()
        await self.start()

    def pause(self) -> None:
        """Freeze the process: connections stay open, nothing is answered (a network stall)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def close(self) -> None:
        await self.stop()


class RedisCluster:
    """Three cluster-enabled masters on their own ports (no replicas), created with
    `redis-cli --cluster create`; `url` names one node (clients discover the others)."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(masters)]
        self.url = self.nodes[0].url

    def launch(self) -> None:
        """Blocking: start every node, join them into one cluster, wait for cluster_state:ok."""
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready()
        nodes = [n.address for n in self.nodes]
        create = ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0"]
        subprocess.run(
            [*create, "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        for node in self.nodes:
            poll(lambda node=node: cluster_ok(node), f"cluster_state:ok on {node.address}")

    def close(self) -> None:
        for node in self.nodes:
            node.halt()


def cluster_ok(node: RedisServer) -> bool:
    """Whether `node` reports cluster_state:ok."""
    client = redis.Redis(host=node.host, port=node.port, socket_timeout=1.0)
    try:
        info = client.execute_command("CLUSTER INFO")
    except redis.RedisError:
        return False
    finally:
        client.close()
    if isinstance(info, dict):  # redis-py parses the reply
        return info.get("cluster_state") == "ok"
    return b"cluster_state:ok" in info


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared Redis server's URL. If none answers at the default URL (and the variable is
    not set), a server owned by this test session stands in for it."""
    url = os.environ.get(ENV_URL, DEFAULT_URL)
    if answers_ping(url):
        yield url
        return
    if ENV_URL in os.environ:
        pytest.fail(f"{ENV_URL}={url}: no Redis answers there")
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    server.launch()
    try:
        yield server.url
    finally:
        server.halt()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A running 3-master Redis Cluster, shared by the whole test session."""
    require_redis_server()
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.launch()
        yield cluster
    finally:
        cluster.close()
