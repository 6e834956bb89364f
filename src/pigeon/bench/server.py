"""The server under test: spawn one in its own process (pinned, fresh data dir) or target a URL.

Also reads what only the server's process can tell: its RSS, CPU time and log.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psutil

#: Cheap password hashing so thousands of users register quickly.
BENCH_ENV = {
    "PIGEON_ARGON2_TIME_COST": "1",
    "PIGEON_ARGON2_MEMORY_KIB": "8",
    "PIGEON_LOG_JSON": "true",
    "PIGEON_LOG_LEVEL": "INFO",
}


@dataclass
class Target:
    """Where the load goes: a URL, or a server to spawn (`url is None`)."""

    url: str | None = None
    server_pid: int | None = None
    server_cpu: int | None = None
    client_cpu: int | None = None
    data_dir: Path | None = None
    server_env: dict[str, str] = field(default_factory=dict)


class ServerHandle:
    """A server the bench talks to; `pid` is None when it is remote and unknown."""

    def __init__(self, url: str, pid: int | None, log_path: Path | None = None) -> None:
        self.url = url
        self.pid = pid
        self.log_path = log_path
        self.exit_code: int | None = None
        self._proc = psutil.Process(pid) if pid is not None else None

    def rss_kib(self) -> int | None:
        """Resident set size in KiB (VmRSS)."""
        if self._proc is None:
            return None
        return int(self._proc.memory_info().rss // 1024)

    def peak_rss_kib(self) -> int | None:
        """The high-water mark of the resident set size in KiB (VmHWM)."""
        if self.pid is None:
            return None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process (all threads)."""
        if self._proc is None:
            return None
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    async def health(self) -> dict[str, Any]:
        """GET /healthz (raises on transport errors); includes `status_code`."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp,
        ):
            body = await resp.read()
            doc: dict[str, Any] = msgspec.json.decode(body) if body else {}
            return doc | {"status_code": resp.status}

    async def wait_connections(self, expected: int, timeout: float) -> int:
        """Poll /healthz until it reports `expected` live connections; returns the last count."""
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            count = int((await self.health()).get("connections", -1))
            if count == expected:
                break
            await asyncio.sleep(0.2)  # polling an external process: there is no event to await
        return count

    def log_summary(self) -> dict[str, Any]:
        """Counts of log lines by level and the most frequent non-startup messages."""
        if self.log_path is None or not self.log_path.exists():
            return {}
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        raw_lines = 0
        for line in self.log_path.read_bytes().splitlines():
            try:
                rec = msgspec.json.decode(line)
                level, msg = str(rec.get("level", "?")), str(rec.get("msg", ""))
            except (msgspec.DecodeError, AttributeError):
                raw_lines += 1
                continue
            levels[level] += 1
            if not msg.startswith("pigeon listening"):
                messages[f"{level}: {_squash(msg)}"] += 1
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


def _spawn(target: Target, nofile: int) -> tuple[subprocess.Popen[bytes], str, Path, Path]:
    port = free_port()
    data_root = Path(tempfile.mkdtemp(prefix="pigeon-bench-", dir=target.data_dir))
    log_path = data_root / "server.log"
    env = os.environ | BENCH_ENV | target.server_env
    cmd = [sys.executable, "-c", "from pigeon.cli import main; main()", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_root / "data")]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _server_preexec(target.server_cpu, nofile),
        )
    return proc, f"http://127.0.0.1:{port}", data_root, log_path


async def _wait_healthy(
    handle: ServerHandle, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            if (await handle.health())["status_code"] == 200:
                return
        await asyncio.sleep(0.05)  # polling an external process: there is no event to await
    tail = handle.log_path.read_text()[-2000:] if handle.log_path else ""
    raise RuntimeError(f"server did not become healthy (exit {proc.poll()}):\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.asynccontextmanager
async def server(target: Target, *, nofile: int = 65536) -> AsyncIterator[ServerHandle]:
    """The server to benchmark: `target.url` as is, or a fresh one spawned (and stopped after)."""
    if target.url is not None:
        yield ServerHandle(target.url.rstrip("/"), target.server_pid)
        return
    proc, url, data_root, log_path = _spawn(target, nofile)
    handle = ServerHandle(url, proc.pid, log_path)
    try:
        await _wait_healthy(handle, proc, 30.0)
        yield handle
    finally:
        handle.exit_code = await asyncio.to_thread(_stop, proc)
        if os.environ.get("PIGEON_BENCH_KEEP_DATA") != "1":
            shutil.rmtree(data_root, ignore_errors=True)


def server_section(handle: ServerHandle, **figures: Any) -> dict[str, Any]:
    """The `server` part of a result document."""
    return {"url": handle.url, "pid": handle.pid, **figures, "log": handle.log_summary()}
