"""`pigeon bench abuse`: what one abuser does to everyone else, measured from the victims' side.

Scenarios, each against a freshly spawned server with the product's default limits (the other
benchmarks raise them out of the way):
- group flood: `members` users share a group; one of them sends to it flat out (`inflight`
  sends outstanding) while `pairs` bystander pairs chat 1:1 at `rate` msgs/s. Reports the
  bystanders' send-to-receive p50/p99 quiet and during the flood, and the flooder's accepted
  sends/s;
- login brute force: `guessers` concurrent wrong-password logins (real argon2 cost) while a
  user uploads a `upload_mib` MiB attachment; reports the upload time quiet and under attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pigeon.bench.accounts import PASSWORD, make_devices
from pigeon.bench.clients import close_all, connect_all
from pigeon.bench.one_to_one import body_stamp, make_body
from pigeon.bench.report import Run, latency_summary
from pigeon.bench.server import BENCH_ENV, ServerHandle
from pigeon.client.client import ClientError, PigeonClient
from pigeon.client.http import register
from pigeon.domain.events import Message

#: The server's own limits, instead of the benchmark environment's raised ones (`KEY=` unsets),
#: but for the per-address ones: every simulated user comes from this one address (the login
#: brute force then measures what isolating argon2 buys, not what the address limit refuses).
DEFAULT_LIMITS_ENV = {
    key: ""
    for key in BENCH_ENV
    if key.startswith("PIGEON_RATE_LIMITS__") and not key.endswith("_PER_ADDRESS")
}
#: The server's own password hashing cost, instead of the benchmark environment's cheap one.
REAL_ARGON2_ENV = {"PIGEON_ARGON2_TIME_COST": "", "PIGEON_ARGON2_MEMORY_KIB": ""}


@dataclass
class Params:
    members: int = 100
    inflight: int = 20
    pairs: int = 20
    rate: float = 40.0
    phase: float = 5.0
    guessers: int = 32
    upload_mib: int = 4


async def _bystanders(
    clients: list[PigeonClient], chats: list[str], rate: float, phase: float
) -> list[int]:
    """Pairs (clients[2k] sends to clients[2k+1] in chats[k]) at `rate` msgs/s in all for
    `phase` seconds; the send-to-receive latencies in ns."""
    samples: list[int] = []
    arrived = asyncio.Event()

    async def receive(client: PigeonClient) -> None:
        async for event in client.events():
            if isinstance(event, Message) and event.body:
                samples.append(time.perf_counter_ns() - body_stamp(event.body))
                arrived.set()

    receivers = [asyncio.create_task(receive(c)) for c in clients[1::2]]
    pairs = len(chats)
    loop = asyncio.get_running_loop()
    start = loop.time()
    k = 0
    sends: list[asyncio.Task[Any]] = []
    while loop.time() - start < phase:
        sender = clients[2 * (k % pairs)]
        body = make_body(time.perf_counter_ns(), 64)
        sends.append(loop.create_task(sender.send(chats[k % pairs], body)))
        k += 1
        await asyncio.sleep(1 / rate)  # the schedule, not synchronisation
    results = await asyncio.gather(*sends, return_exceptions=True)
    sent = sum(not isinstance(r, BaseException) for r in results)
    with contextlib.suppress(TimeoutError):  # a message that never comes is a missing sample
        async with asyncio.timeout(10):
            while len(samples) < sent:  # every message sent has arrived
                arrived.clear()
                await arrived.wait()
    for task in receivers:
        task.cancel()
    return samples


async def group_flood(handle: ServerHandle, p: Params) -> dict[str, Any]:
    members, _ = await make_devices(handle.url, p.members, 1)
    bystanders, _ = await make_devices(handle.url, 2 * p.pairs, 1)
    clients = await connect_all(handle.url, [a.token for a in bystanders])
    flooder = (await connect_all(handle.url, [members[0].token]))[0]
    flooder.max_rate_wait = 0.0
    chats = [
        (await clients[2 * k].create_chat([bystanders[2 * k + 1].user]))["id"]
        for k in range(p.pairs)
    ]
    group = (await flooder.create_chat([m.user for m in members[1:]], name="flood"))["id"]
    quiet = await _bystanders(clients, chats, p.rate, p.phase)
    accepted = refused = 0
    stop = asyncio.Event()

    async def flood() -> None:
        nonlocal accepted, refused
        while not stop.is_set():
            try:
                await flooder.send(group, "spam " * 20)
                accepted += 1
            except ClientError as exc:
                refused += 1
                if exc.retry_after:
                    await asyncio.sleep(min(exc.retry_after, 0.5))  # a flooder that obeys a bit

    floods = [asyncio.create_task(flood()) for _ in range(p.inflight)]
    started = time.perf_counter()
    loud = await _bystanders(clients, chats, p.rate, p.phase)
    stop.set()
    elapsed = time.perf_counter() - started
    await asyncio.gather(*floods, return_exceptions=True)
    await close_all([*clients, flooder])
    return {
        "quiet": latency_summary(quiet),
        "flood": latency_summary(loud),
        "flooder_accepted_per_s": round(accepted / elapsed, 1),
        "flooder_refused": refused,
    }


async def _upload(client: PigeonClient, path: Path) -> float:
    start = time.perf_counter()
    await client.upload_file(path)
    return time.perf_counter() - start


async def login_brute_force(handle: ServerHandle, p: Params, tmp: Path) -> dict[str, Any]:
    (owner,), _ = await make_devices(handle.url, 1, 1)
    victim = f"victim{secrets.token_hex(4)}"
    await register(handle.url, victim, PASSWORD)
    client = (await connect_all(handle.url, [owner.token]))[0]
    path = tmp / "upload.bin"
    path.write_bytes(os.urandom(p.upload_mib * 1024 * 1024))
    quiet = [await _upload(client, path) for _ in range(3)]
    stop = asyncio.Event()
    answers: Counter[int] = Counter()

    async def guess(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            # wrong passwords for a real account: a full verification each, until the
            # per-username limit refuses before the check
            body = {"username": victim, "password": secrets.token_hex(6), "device_name": "g"}
            with contextlib.suppress(aiohttp.ClientError):
                async with http.post(f"{handle.url}/v1/devices", json=body) as resp:
                    answers[resp.status] += 1
                    await resp.read()

    async with aiohttp.ClientSession() as http:
        guessers = [asyncio.create_task(guess(http)) for _ in range(p.guessers)]
        await asyncio.sleep(0.5)  # let the attack ramp up (measurement, not synchronisation)
        attacked = [await _upload(client, path) for _ in range(3)]
        stop.set()
        await asyncio.gather(*guessers, return_exceptions=True)
    await close_all([client])
    return {
        "upload_quiet_s": [round(t, 3) for t in quiet],
        "upload_attacked_s": [round(t, 3) for t in attacked],
        "guess_answers": dict(answers),
    }


async def run(handle: ServerHandle, p: Params) -> dict[str, Any]:
    """Both scenarios against one server; the result document."""
    run_doc = Run("abuse", dataclasses.asdict(p))
    flood = await group_flood(handle, p)
    with tempfile.TemporaryDirectory() as tmp:
        login = await login_brute_force(handle, p, Path(tmp))
    return run_doc.finish(group_flood=flood, login=login)


def summary(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    g, q, f = doc["group_flood"], doc["group_flood"]["quiet"], doc["group_flood"]["flood"]
    login = doc["login"]
    return [
        ("bystanders p50/p99 quiet", f"{q.get('p50_ms')}/{q.get('p99_ms')} ms"),
        ("bystanders p50/p99 in the flood", f"{f.get('p50_ms')}/{f.get('p99_ms')} ms"),
        ("flooder accepted/refused", f"{g['flooder_accepted_per_s']}/s, {g['flooder_refused']}"),
        ("upload quiet", f"{login['upload_quiet_s']} s"),
        ("upload under brute force", f"{login['upload_attacked_s']} s"),
        ("guesses by status", login["guess_answers"]),
    ]
