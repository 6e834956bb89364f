"""`pigeon bench keys`: `keys_claim` latency when many devices claim one user's keys at once.

One target user logs in `target_devices` devices, each publishing identity keys, a fallback
key and `keys_per_device` one-time keys (random bytes of the right sizes: the server checks
shape only). `claimers` other users, each sharing a group with the target and connected with
the SDK, claim a key for every target device at the same moment, `rounds` times (the target
devices upload fresh one-time keys before each round). Per claim: the time from sending
`keys_claim` to its reply. Also counted: the fallback keys handed out (claims beyond the
one-time keys), and any one-time key handed out twice (must be 0).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pigeon.bench.accounts import make_devices
from pigeon.bench.clients import close_all, connect_all
from pigeon.bench.report import Run, latency_summary
from pigeon.bench.server import ServerHandle
from pigeon.client.client import PigeonClient


@dataclass
class Params:
    claimers: int = 50
    target_devices: int = 3
    #: One-time keys each target device uploads before each round (at most the server's
    #: `e2e.max_one_time_keys`); fewer than `claimers` leaves some claims to the fallback key.
    keys_per_device: int = 40
    rounds: int = 10


def _b64(size: int) -> str:
    return base64.b64encode(os.urandom(size)).decode().rstrip("=")


def _signed(key_id: str) -> dict[str, str]:
    return {"id": key_id, "key": _b64(32), "signature": _b64(64)}


def _identity(user: str, device: str) -> dict[str, str]:
    curve, ed = _b64(32), _b64(32)
    bundle = f'{{"curve25519":"{curve}","device":"{device}","ed25519":"{ed}","user":"{user}"}}'
    return {"curve25519": curve, "ed25519": ed, "bundle": bundle, "signature": _b64(64)}


async def _claim(
    client: PigeonClient, devices: list[str], go: asyncio.Event
) -> tuple[int, list[dict[str, Any]]]:
    await go.wait()
    start = time.perf_counter_ns()
    reply = await client.request("keys_claim", devices=devices)
    return time.perf_counter_ns() - start, list(reply["keys"])


async def run(handle: ServerHandle, p: Params) -> dict[str, Any]:
    run_doc = Run("keys", dataclasses.asdict(p))
    targets, _ = await make_devices(handle.url, 1, p.target_devices)
    claimer_accounts, _ = await make_devices(handle.url, p.claimers, 1)
    owners = await connect_all(handle.url, [a.token for a in targets])
    claimers = await connect_all(handle.url, [a.token for a in claimer_accounts])
    problems = run_doc.problems
    samples: list[int] = []
    fallback = 0
    handed: Counter[tuple[str, str]] = Counter()
    try:
        user = targets[0].user
        await owners[0].request(
            "create_chat", participants=[a.user for a in claimer_accounts], kind="group"
        )
        devices = [a.device for a in targets]
        for a, owner in zip(targets, owners, strict=True):
            await owner.request(
                "keys_upload", identity=_identity(user, a.device), fallback_key=_signed("fb")
            )
        for r in range(p.rounds):
            for owner in owners:
                keys = [_signed(f"r{r}-{i}") for i in range(p.keys_per_device)]
                await owner.request("keys_upload", one_time_keys=keys)
            go = asyncio.Event()
            tasks = [asyncio.create_task(_claim(c, devices, go)) for c in claimers]
            await asyncio.sleep(0)  # let every claimer reach the start line
            go.set()
            for elapsed, claimed in await asyncio.gather(*tasks):
                samples.append(elapsed)
                if len(claimed) != len(devices):
                    problems.append(f"a claim returned {len(claimed)} keys, not {len(devices)}")
                for key in claimed:
                    if key.get("fallback"):
                        fallback += 1
                    else:
                        handed[(key["device"], key["id"])] += 1
        duplicates = sum(n - 1 for n in handed.values() if n > 1)
        if duplicates:
            problems.append(f"{duplicates} one-time keys handed out more than once")
        expected = p.rounds * p.target_devices * min(p.keys_per_device, p.claimers)
        if len(handed) != expected:
            problems.append(f"{len(handed)} one-time keys handed out, expected {expected}")
    finally:
        await close_all([*owners, *claimers])
    return run_doc.finish(
        results={
            "claims": len(samples),
            "keys_per_claim": p.target_devices,
            "latency_ms": latency_summary(samples),
            "one_time_keys_handed": sum(handed.values()),
            "fallback_keys_handed": fallback,
            "duplicates": sum(n - 1 for n in handed.values() if n > 1),
        }
    )


def summary(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    r = doc["results"]
    lat = r["latency_ms"]
    return [
        ("claims", f"{r['claims']} (each for {r['keys_per_claim']} devices)"),
        ("claim latency", f"p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms"),
        ("one-time keys handed", r["one_time_keys_handed"]),
        ("fallback keys handed", r["fallback_keys_handed"]),
        ("one-time keys handed twice", r["duplicates"]),
    ]
