"""Uploads are streamed to storage, never held whole in memory: a 100 MiB upload (and its
download) through pigeon's blob route grows the serving process's RSS by less than 20 MiB.

The server is a separate process (a tiny script serving only the blob routes) so that its RSS
is its own; the test streams generated data (1 MiB at a time, never 100 MiB in the test either)
and samples the server's RSS with psutil after every MiB sent or received. It also prints the
throughput of both directions (run with `-s` to see it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from yarl import URL

from pigeon.adapters.blobs.local import LocalBlobStore
from pigeon.domain.ids import new_id

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
TOTAL_MIB = 100
LIMIT = 20 * MIB

SERVER = """
import asyncio, sys
from pathlib import Path
from aiohttp import web
from pigeon.adapters.blobs.local import LocalBlobStore
from pigeon.gateway.blobs import add_blob_routes

async def main() -> None:
    store = LocalBlobStore(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))
    await store.open()
    app = web.Application()
    add_blob_routes(app, store)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await runner.cleanup()

asyncio.run(main())
"""


class Peak:
    """The highest RSS seen of one process."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.base = self.value = self.process.memory_info().rss

    def sample(self) -> None:
        self.value = max(self.value, self.process.memory_info().rss)


def _chunk(i: int, block: bytes) -> bytes:
    return i.to_bytes(8, "big") + block[8:]  # every MiB differs from the others


async def _transfer(
    http: aiohttp.ClientSession, signer: LocalBlobStore, size: int, peak: Peak
) -> tuple[float, float]:
    """Upload then download `size` MiB; returns (upload, download) seconds."""
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    for i in range(size):
        digest.update(_chunk(i, block))
    key, total = new_id(), size * MIB
    ticket = await signer.upload_url(
        key,
        size=total,
        sha256=digest.hexdigest(),
        content_type="video/mp4",
        expires_at=time.time_ns() // 1_000_000 + 600_000,
    )

    async def body() -> AsyncIterator[bytes]:
        for i in range(size):
            yield _chunk(i, block)
            peak.sample()

    started = time.perf_counter()
    async with http.put(URL(ticket.url, encoded=True), data=body(), headers=ticket.headers) as r:
        assert r.status == 200, await r.text()
    upload = time.perf_counter() - started
    peak.sample()

    url = await signer.download_url(key, expires_at=time.time_ns() // 1_000_000 + 600_000)
    received, check = 0, hashlib.sha256()
    started = time.perf_counter()
    async with http.get(URL(url, encoded=True)) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(total)
        async for data in r.content.iter_chunked(MIB):
            received += len(data)
            check.update(data)
            peak.sample()
    download = time.perf_counter() - started
    assert (received, check.hexdigest()) == (total, digest.hexdigest())
    return upload, download


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_100_mib_through_the_blob_route_in_bounded_memory(tmp_path: Path) -> None:
    root, secret = tmp_path / "blobs", os.urandom(32)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        str(root),
        secret.hex(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
        signer = LocalBlobStore(root, secret, f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as http:
            await _transfer(http, signer, 2, Peak(proc.pid))  # warm-up: buffers, threads
            peak = Peak(proc.pid)
            upload, download = await _transfer(http, signer, TOTAL_MIB, peak)
        growth = peak.value - peak.base
        print(
            f"\n100 MiB through /v1/blobs: upload {TOTAL_MIB / upload:.0f} MiB/s ({upload:.2f} s,"
            f" incl. hashing and fsync), download {TOTAL_MIB / download:.0f} MiB/s"
            f" ({download:.2f} s); server RSS {peak.base / MIB:.1f} MiB,"
            f" peak growth {growth / MIB:.1f} MiB"
        )
        assert growth < LIMIT
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
