"""The server under test: spawn one in its own process (pinned, fresh data dir) or target a URL.

A spawned server is one node by default; `workers` runs it as `pigeon serve --workers N` (a
supervisor and N processes on one port) and `nodes` spawns N separate servers on their own ports,
all sharing a fresh PostgreSQL database and Redis (see `pigeon.bench.store`). Also reads what
only the server's processes can tell: their RSS, CPU time (summed over a node's supervisor and
workers) and log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import psutil

from pigeon.bench.report import total
from pigeon.bench.store import (
    CpuSample,
    fresh_database,
    pinned_postgres,
    redis_url,
    service_cpu,
    shared_state_env,
)
from pigeon.domain.limits import RateRules

T = TypeVar("T")

#: Cheap password hashing so thousands of users register quickly.
BENCH_ENV = {
    "PIGEON_ARGON2_TIME_COST": "1",
    "PIGEON_ARGON2_MEMORY_KIB": "8",
    # The generators are one address and one user per device pushing flat out: the counters
    # run (their cost is measured) but with limits no benchmark reaches.
    **{
        f"PIGEON_RATE_LIMITS__{rule.upper()}": "1000000000/second"
        for rule in RateRules.__struct_fields__
    },
    "PIGEON_LOG_JSON": "true",
    "PIGEON_LOG_LEVEL": "INFO",
}


class Store(enum.StrEnum):
    """The spawned server's store: embedded SQLite, or a fresh PostgreSQL database (which also
    switches the bus and presence registry to Redis)."""

    sqlite = "sqlite"
    postgres = "postgres"


@dataclass
class Target:
    """Where the load goes: a URL, or a server to spawn (`url is None`)."""

    url: str | None = None
    server_pid: int | None = None
    server_cpu: int | None = None
    client_cpu: int | None = None
    data_dir: Path | None = None
    server_env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    nodes: int = 1
    store: Store = Store.sqlite
    #: With PostgreSQL on this machine: the core its processes run on during the run.
    postgres_cpu: int | None = None

    def describe(self) -> dict[str, Any]:
        """The target's part of a result document's parameters."""
        return {
            "server_cpu": self.server_cpu,
            "server_env": self.server_env,
            "spawned": self.url is None,
            "store": str(self.store),
            "workers": self.workers,
            "nodes": self.nodes,
            "postgres_cpu": self.postgres_cpu,
        }


class Node:
    """One server: a process, or a `--workers` supervisor and its workers, behind one URL.

    `pid` is None when it is remote and unknown; figures are then None too.
    """

    def __init__(
        self, url: str, pid: int | None, log_path: Path | None = None, *, workers: int = 1
    ) -> None:
        self.url = url.rstrip("/")
        self.pid = pid
        self.log_path = log_path
        self.workers = workers
        self.exit_code: int | None = None
        self._root = psutil.Process(pid) if pid is not None else None

    def processes(self) -> list[psutil.Process]:
        """The server's process and, with workers, every descendant of it."""
        if self._root is None:
            return []
        procs = [self._root]
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += self._root.children(recursive=True)
        return procs

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers, or the server itself."""
        procs = self.processes()
        return [p.pid for p in (procs[1:] if self.workers > 1 else procs)]

    def rss_kib(self) -> int | None:
        """Resident set size in KiB (VmRSS), summed over the processes."""
        if self._root is None:
            return None
        return sum(_each(self.processes(), lambda p: int(p.memory_info().rss // 1024)))

    def peak_rss_kib(self) -> int | None:
        """The high-water marks of the resident set size in KiB (VmHWM), summed over the
        processes (an upper bound of the node's peak when it has several)."""
        if self._root is None:
            return None
        return sum(_each(self.processes(), lambda p: _vm_hwm(p.pid)))

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the processes (all threads)."""
        if self._root is None:
            return None
        return sum(_each(self.processes(), _cpu))

    async def health(self) -> dict[str, Any]:
        """GET /healthz (raises on transport errors); includes `status_code`. With workers,
        whichever worker the kernel hands the connection to answers."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp,
        ):
            body = await resp.read()
            doc: dict[str, Any] = msgspec.json.decode(body) if body else {}
            return doc | {"status_code": resp.status}

    async def connections(self) -> int:
        """Live WebSocket connections: with workers, /healthz is asked (on a new TCP connection
        each time, which the kernel spreads over the workers) until every worker answered."""
        if self.workers <= 1:
            return int((await self.health()).get("connections", -1))
        seen: dict[int, int] = {}
        for _ in range(50 * self.workers):
            doc = await self.health()
            if doc["status_code"] != 200:
                raise RuntimeError(f"{self.url}: /healthz answered {doc}")
            seen[int(doc["pid"])] = int(doc["connections"])
            if len(seen) >= self.workers:
                return sum(seen.values())
        raise RuntimeError(f"{self.url}: /healthz answered from {len(seen)}/{self.workers} workers")

    def log_counts(self) -> tuple[Counter[str], Counter[str], int]:
        """Log lines by level, non-startup messages (ids blanked) and unstructured lines."""
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        raw_lines = 0
        if self.log_path is None or not self.log_path.exists():
            return levels, messages, raw_lines
        for line in self.log_path.read_bytes().splitlines():
            try:
                rec = msgspec.json.decode(line)
                level, msg = str(rec.get("level", "?")), str(rec.get("msg", ""))
            except (msgspec.DecodeError, AttributeError):
                raw_lines += 1
                continue
            levels[level] += 1
            if not msg.startswith(("pigeon listening", "worker ")):
                messages[f"{level}: {_squash(msg)}"] += 1
        return levels, messages, raw_lines

    def describe(self) -> dict[str, Any]:
        """url, pid, workers and their pids, for a result document."""
        out: dict[str, Any] = {"url": self.url, "pid": self.pid}
        if self.workers > 1:
            out |= {"workers": self.workers, "worker_pids": self.worker_pids()}
        return out


def _each(procs: Iterable[psutil.Process], fn: Callable[[psutil.Process], T]) -> list[T]:
    """`fn(p)` for each process still alive."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            out.append(fn(p))
    return out


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class ServerHandle:
    """The server a bench talks to: one node (`url`, `pid`) or a cluster (`nodes`).

    Scenarios that do not spread load talk to the first node (`url`); process figures (RSS, CPU)
    and connection counts are sums over every node.
    """

    def __init__(
        self, url: str, pid: int | None, log_path: Path | None = None, *, workers: int = 1
    ) -> None:
        self.nodes = [Node(url, pid, log_path, workers=workers)]
        #: The PostgreSQL database and Redis that spawned nodes share (None otherwise).
        self.database: str | None = None
        self.redis: str | None = None

    @classmethod
    def cluster(cls, nodes: list[Node]) -> ServerHandle:
        """A handle on several nodes that form one server."""
        first = nodes[0]
        handle = cls(first.url, first.pid, first.log_path, workers=first.workers)
        handle.nodes = list(nodes)
        return handle

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def pid(self) -> int | None:
        return self.nodes[0].pid

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def rss_kib(self) -> int | None:
        """Resident set size in KiB (VmRSS), summed over every process of every node."""
        return total([n.rss_kib() for n in self.nodes])

    def peak_rss_kib(self) -> int | None:
        """Sum of the processes' RSS high-water marks in KiB (VmHWM)."""
        return total([n.peak_rss_kib() for n in self.nodes])

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of every process of every node."""
        return total([n.cpu_seconds() for n in self.nodes])

    async def service_cpu(self) -> CpuSample:
        """CPU time of the local PostgreSQL backends and Redis the spawned nodes share."""
        if self.database is None or self.redis is None:
            return {}
        return await service_cpu(self.database, self.redis)

    async def health(self) -> dict[str, Any]:
        """The first node's /healthz (see `Node.health`)."""
        return await self.nodes[0].health()

    async def connections(self) -> int:
        """Live WebSocket connections over every node (and worker)."""
        return sum([await n.connections() for n in self.nodes])

    async def wait_connections(self, expected: int, timeout: float) -> int:
        """Poll until the nodes count `expected` live connections; returns the last count."""
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            count = await self.connections()
            if count == expected:
                break
            await asyncio.sleep(0.2)  # polling an external process: there is no event to await
        return count

    def log_summary(self) -> dict[str, Any]:
        """Counts of log lines by level and the most frequent non-startup messages, over every
        node."""
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        raw_lines = 0
        if all(n.log_path is None for n in self.nodes):
            return {}
        for node in self.nodes:
            lv, msgs, raw = node.log_counts()
            levels.update(lv)
            messages.update(msgs)
            raw_lines += raw
        return {
            "levels": dict(levels),
            "unstructured_lines": raw_lines,
            "top_messages": messages.most_common(10),
        }


def _squash(msg: str) -> str:
    """A log message with ids and numbers blanked, so similar lines count together."""
    words = []
    for w in msg.split()[:16]:
        words.append("#" if any(c.isdigit() for c in w) else w)
    return " ".join(words)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int | None = None) -> int:
    """Raise this process's open-file limit (to `wanted`, or the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted or hard)
    if target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(cpu: int | None) -> None:
    """Pin this process to one core (None: leave it on every core)."""
    cpus = {cpu} if cpu is not None else set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, cpus)


def _server_preexec(cpu: int | None, nofile: int) -> None:
    pin(cpu)
    raise_nofile(nofile)


def _spawn(
    target: Target, env: dict[str, str], data_root: Path, name: str, nofile: int
) -> tuple[subprocess.Popen[bytes], Node]:
    """Start one node (`pigeon serve`, with `--workers` when asked) on a free port."""
    port = free_port()
    log_path = data_root / f"{name}.log"
    cmd = [sys.executable, "-c", "from pigeon.cli import main; main()", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_root / name)]
    if target.workers > 1:
        cmd += ["--workers", str(target.workers)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _server_preexec(target.server_cpu, nofile),
        )
    return proc, Node(f"http://127.0.0.1:{port}", proc.pid, log_path, workers=target.workers)


async def wait_healthy(node: Node, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until /healthz answers 200 (from every worker: each opens its store on its own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
            if node.workers > 1:
                await node.connections()  # raises until every worker answered 200
                return
            if (await node.health())["status_code"] == 200:
                return
        await asyncio.sleep(0.05)  # polling an external process: there is no event to await
    tail = node.log_path.read_text()[-2000:] if node.log_path else ""
    raise RuntimeError(f"server did not become healthy (exit {proc.poll()}):\n{tail}")


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> int | None:
    """SIGTERM (a supervisor passes it on to its workers), SIGKILL to all after `grace` s."""
    if proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.asynccontextmanager
async def server(target: Target, *, nofile: int = 65536) -> AsyncIterator[ServerHandle]:
    """The server to benchmark: `target.url` as is, or fresh node(s) spawned (and stopped after,
    with their temp data dir and, for PostgreSQL, their database)."""
    if target.url is not None:
        yield ServerHandle(target.url, target.server_pid, workers=target.workers)
        return
    async with contextlib.AsyncExitStack() as stack:
        env = os.environ | BENCH_ENV
        database = redis = None
        if target.store is Store.postgres:
            database, redis = await stack.enter_async_context(fresh_database()), redis_url()
            env |= shared_state_env(database, redis)
            if target.postgres_cpu is not None:
                await stack.enter_async_context(pinned_postgres(database, target.postgres_cpu))
        env |= target.server_env
        env = {k: v for k, v in env.items() if v != ""}  # KEY= unsets (servers before a setting)
        data_root = Path(tempfile.mkdtemp(prefix="pigeon-bench-", dir=target.data_dir))
        if os.environ.get("PIGEON_BENCH_KEEP_DATA") != "1":
            stack.callback(shutil.rmtree, data_root, ignore_errors=True)
        spawned: list[tuple[subprocess.Popen[bytes], Node]] = []
        stack.push_async_callback(_stop_all, spawned)
        for i in range(target.nodes):
            name = "server" if target.nodes == 1 else f"node{i}"
            spawned.append(_spawn(target, env, data_root, name, nofile))
            if i == 0:  # the first node creates the schema; the others start once it is there
                await wait_healthy(spawned[0][1], spawned[0][0], 60.0)
        await asyncio.gather(*(wait_healthy(n, p, 60.0) for p, n in spawned[1:]))
        handle = ServerHandle.cluster([n for _, n in spawned])
        handle.database, handle.redis = database, redis
        yield handle


async def _stop_all(spawned: list[tuple[subprocess.Popen[bytes], Node]]) -> None:
    codes = await asyncio.gather(*(asyncio.to_thread(stop, p) for p, _ in spawned))
    for (_, node), code in zip(spawned, codes, strict=True):
        node.exit_code = code


def server_section(
    handle: ServerHandle, *, per_node: list[dict[str, Any]] | None = None, **figures: Any
) -> dict[str, Any]:
    """The `server` part of a result document; `per_node` figures go next to each node's
    description under `nodes`, listed when there are several nodes or workers."""
    section: dict[str, Any] = {"url": handle.url, "pid": handle.pid, **figures}
    if len(handle.nodes) > 1 or handle.nodes[0].workers > 1:
        extra = per_node or [{} for _ in handle.nodes]
        section["nodes"] = [
            n.describe() | figs for n, figs in zip(handle.nodes, extra, strict=True)
        ]
    return section | {"log": handle.log_summary()}
