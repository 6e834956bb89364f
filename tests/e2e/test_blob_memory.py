"""Uploads are streamed to storage, never held whole in memory: a 100 MiB attachment uploaded
to a real `pigeon serve` (and downloaded back) grows the server's RSS by less than 20 MiB.

The server is its own process so that its RSS is its own; the test declares the attachment over
the WebSocket, streams generated data (1 MiB at a time, never 100 MiB in the test either) to the
signed URL, confirms the upload (the server verifies size and digest), downloads it through a
signed URL, and samples the server's RSS with psutil after every MiB. It also prints the
throughput of both directions (run with `-s` to see it).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from pigeon.client import PigeonClient, login, register
from pigeon.client.media import resolve
from tests.conftest import PASSWORD
from tests.support.cluster import Node

MIB = 1024 * 1024
TOTAL_MIB = 100
LIMIT = 20 * MIB


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
    http: aiohttp.ClientSession, client: PigeonClient, size: int, peak: Peak
) -> tuple[float, float]:
    """Upload then download `size` MiB; returns (upload, download) seconds."""
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    for i in range(size):
        digest.update(_chunk(i, block))
    total = size * MIB
    created = await client.request(
        "create_attachment", content_type="video/mp4", size=total, sha256=digest.hexdigest()
    )
    ticket = created["upload"]

    async def body() -> AsyncIterator[bytes]:
        for i in range(size):
            yield _chunk(i, block)
            peak.sample()

    started = time.perf_counter()
    async with http.put(
        resolve(client.url, ticket["url"]), data=body(), headers=ticket["headers"]
    ) as r:
        assert r.status == 200, await r.text()
    await client.request("attachment_uploaded", attachment=created["id"])
    upload = time.perf_counter() - started
    peak.sample()

    url = resolve(client.url, await client.attachment_url(created["id"]))
    received, check = 0, hashlib.sha256()
    started = time.perf_counter()
    async with http.get(url) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(total)
        async for data in r.content.iter_chunked(MIB):
            received += len(data)
            check.update(data)
            peak.sample()
    download = time.perf_counter() - started
    assert (received, check.hexdigest()) == (total, digest.hexdigest())
    return upload, download


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_100_mib_attachment_in_bounded_server_memory(tmp_path: Path) -> None:
    node = Node({"PIGEON_ARGON2_TIME_COST": "1", "PIGEON_ARGON2_MEMORY_KIB": "8"}, tmp_path)
    await node.start()
    try:
        await register(node.url, "uploader", PASSWORD)
        account = await login(node.url, "uploader", PASSWORD)
        assert node.proc is not None
        async with PigeonClient(node.url, account.token) as client, aiohttp.ClientSession() as http:
            await _transfer(http, client, 2, Peak(node.proc.pid))  # warm-up: buffers, threads
            peak = Peak(node.proc.pid)
            upload, download = await _transfer(http, client, TOTAL_MIB, peak)
        growth = peak.value - peak.base
        print(
            f"\n100 MiB attachment: upload {TOTAL_MIB / upload:.0f} MiB/s ({upload:.2f} s, incl."
            f" hashing, fsync and verification), download {TOTAL_MIB / download:.0f} MiB/s"
            f" ({download:.2f} s); server RSS {peak.base / MIB:.1f} MiB,"
            f" peak growth {growth / MIB:.1f} MiB"
        )
        assert growth < LIMIT
    finally:
        await node.close()
