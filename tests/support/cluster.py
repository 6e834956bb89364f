"""Several real `pigeon serve` processes sharing PostgreSQL and Redis, and HAProxy in front.

Multi-node and fault tests start these: every node is a separate OS process on its own port
(or, with `workers`, several processes on one port), exactly as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest

from pigeon.bench.server import free_port

REPO = Path(__file__).resolve().parents[2]


def cluster_env(dsn: str, redis_url: str, *, redis_cluster: bool = False) -> dict[str, str]:
    """Environment of a node that shares state with its peers (PostgreSQL + Redis)."""
    store = {"PIGEON_STORE__TYPE": "postgres", "PIGEON_STORE__DSN": dsn}
    return store | _peer_env(redis_url, redis_cluster)


def dynamodb_cluster_env(
    endpoint: str, table_prefix: str, redis_url: str, *, redis_cluster: bool = False
) -> dict[str, str]:
    """Environment of a node that shares state with its peers on DynamoDB (the tests' moto
    server, tables `table_prefix*`, made by the first node) + Redis. The credentials are the
    environment's (tests/conftest.py sets moto's on the DynamoDB stack)."""
    store = {
        "PIGEON_STORE__TYPE": "dynamodb",
        "PIGEON_STORE__ENDPOINT_URL": endpoint,
        "PIGEON_STORE__TABLE_PREFIX": table_prefix,
        "PIGEON_STORE__CREATE_TABLES": "true",
    }
    return store | _peer_env(redis_url, redis_cluster)


def _peer_env(redis_url: str, redis_cluster: bool) -> dict[str, str]:
    """What every node of a test cluster shares besides its store: Redis, cheap hashing."""
    return {
        "PIGEON_BUS__TYPE": "redis",
        "PIGEON_PRESENCE__TYPE": "redis",
        "PIGEON_REDIS__URL": redis_url,
        "PIGEON_REDIS__CLUSTER": "true" if redis_cluster else "false",
        "PIGEON_ARGON2_TIME_COST": "1",
        "PIGEON_ARGON2_MEMORY_KIB": "8",
        "PIGEON_LOG_JSON": "false",
        # fault tests flood from one address; limits have their own tests (test_rate_limits.py)
        "PIGEON_RATE_LIMITS__ENABLED": "false",
    }


async def wait_healthy(
    url: str, timeout: float = 30.0, *, tls: ssl.SSLContext | bool = True
) -> dict[str, object]:
    """Poll /healthz until it answers 200 (a starting process has no event to wait on); `tls`
    is how an https:// URL is verified."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        while True:
            try:
                async with http.get(f"{url}/healthz", ssl=tls) as resp:
                    if resp.status == 200:
                        body: dict[str, object] = await resp.json()
                        return body
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


class Node:
    """One `pigeon serve` (possibly `--workers N`) on its own port."""

    def __init__(
        self, env: dict[str, str], data_dir: Path, *, workers: int = 1, port: int | None = None
    ) -> None:
        self.env = env
        self.data_dir = data_dir
        self.workers = workers
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log = data_dir / f"node-{self.port}.log"

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pigeon.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--workers",
                str(self.workers),
                env={**os.environ, **self.env},
                stdout=log,
                stderr=log,
                cwd=REPO,
            )
        healthy = asyncio.ensure_future(wait_healthy(self.url))
        exited = asyncio.ensure_future(self.proc.wait())
        await asyncio.wait([healthy, exited], return_when=asyncio.FIRST_COMPLETED)
        for task in (healthy, exited):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await task
        if exited.done() and not exited.cancelled():  # it died starting: say why
            raise RuntimeError(
                f"pigeon serve exited {exited.result()}:\n{self.log.read_text()[-2000:]}"
            )
        await healthy

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush."""
        assert self.proc is not None
        self.proc.kill()

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class HAProxy:
    """deploy/haproxy.cfg in front of three nodes (the same one thrice for a single node), on
    its own port. With `tls_cert` (certificate, chain and key in one PEM file) it terminates
    TLS there (`PIGEON_LB_TLS_CERT`), and its URL is https://, verified with `ca_file`."""

    def __init__(
        self, nodes: list[Node], *, tls_cert: Path | None = None, ca_file: Path | None = None
    ) -> None:
        assert len(nodes) == 3, "deploy/haproxy.cfg names three nodes"
        self.nodes = nodes
        self.port = free_port()
        self.tls_cert = tls_cert
        self.tls: ssl.SSLContext | bool = True
        if ca_file is not None:
            self.tls = ssl.create_default_context(cafile=str(ca_file))
        self.url = f"{'https' if tls_cert else 'http'}://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        if shutil.which("haproxy") is None:
            pytest.skip("haproxy is not installed (.ci/run installs it: apt-get install haproxy)")
        env = {
            **os.environ,
            "PIGEON_LB_BIND": f"127.0.0.1:{self.port}",
            **{f"PIGEON_NODE{i + 1}": n.address for i, n in enumerate(self.nodes)},
        }
        if self.tls_cert is not None:
            env["PIGEON_LB_TLS_CERT"] = str(self.tls_cert)
        self.proc = await asyncio.create_subprocess_exec(
            "haproxy",
            "-db",
            "-f",
            str(REPO / "deploy" / "haproxy.cfg"),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_healthy(self.url, tls=self.tls)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


class HAProxyWithStats(HAProxy):
    """`HAProxy` (deploy/haproxy.cfg as it is) plus an admin socket, declared in a second config
    file of one `global` section, through which a test reads what HAProxy makes of each node."""

    def __init__(self, nodes: list[Node], socket_dir: Path) -> None:
        super().__init__(nodes)
        self.socket = socket_dir / "haproxy.sock"
        self._extra = socket_dir / "stats.cfg"

    async def start(self) -> None:
        if shutil.which("haproxy") is None:
            pytest.skip("haproxy is not installed (.ci/run installs it: apt-get install haproxy)")
        self._extra.write_text(f"global\n    stats socket {self.socket} mode 600 level admin\n")
        env = {
            **os.environ,
            "PIGEON_LB_BIND": f"127.0.0.1:{self.port}",
            **{f"PIGEON_NODE{i + 1}": n.address for i, n in enumerate(self.nodes)},
        }
        self.proc = await asyncio.create_subprocess_exec(
            "haproxy",
            "-db",
            "-f",
            str(REPO / "deploy" / "haproxy.cfg"),
            "-f",
            str(self._extra),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_healthy(self.url)

    async def command(self, line: str) -> str:
        """One command on the admin socket; its whole answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()
            await writer.wait_closed()

    async def up(self, backend: str) -> dict[str, bool]:
        """Per server of `backend`: whether HAProxy has it UP (`show servers state`)."""
        answer = await self.command(f"show servers state {backend}")
        states: dict[str, bool] = {}
        for line in answer.splitlines()[1:]:  # the first line is the format's version
            fields = line.split()
            if len(fields) > 5 and not line.startswith("#"):
                states[fields[3]] = fields[5] == "2"  # srv_name, srv_op_state (2: running)
        return states
