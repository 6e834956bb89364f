"""Scenario "push": what push costs the message path, and how the queue behaves.

Senders (connected) write to recipients that are logged in but offline, one direct chat per
pair, and the recipients' push targets point at a fake webhook gateway that this process runs on
loopback. The server pushes every message (`push.window` = 0), so each push is one message's.

Phases, in order:
1. **off / on**: closed-loop sends for `duration` s with no push target registered (off) and
   with every recipient registered (on; the worker pushes meanwhile), as off, on, on, off: the
   cost of push on the message path is the ratio (the issue's target: at most a 10% drop).
2. **outage**: sends at `rate` msgs/s while the gateway answers 503 for `outage` s, then again
   200: the queue's depth (devices with a message not yet pushed) and lag (age of the oldest)
   every half second, the time to drain, and the push rate while draining (the worker's
   throughput with a backlog).
3. **steady**: `rate` msgs/s with the gateway up: commit-to-gateway latency (from the `sent`
   reply to the push reaching the gateway), which includes `push.grace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from pigeon.bench.accounts import make_devices
from pigeon.bench.clients import close_all
from pigeon.bench.report import Run, fmt_latency, latency_summary, rate
from pigeon.bench.server import ServerHandle, server_section
from pigeon.client import Account, PigeonClient

#: What the spawned server needs for this scenario (see `bench.cli.push_cmd`).
SERVER_ENV = {
    "PIGEON_PUSH__WEBHOOK_HOSTS": '["127.0.0.1"]',
    "PIGEON_PUSH__ALLOW_PRIVATE_TARGETS": "true",
    "PIGEON_PUSH__WINDOW": "0",
}


@dataclass
class Params:
    senders: int = 20
    recipients: int = 400
    inflight: int = 5
    duration: float = 8.0
    rate: float = 500.0
    outage: float = 10.0
    timeout: float = 120.0


class _Note(msgspec.Struct):
    device: str
    count: int


class Gateway:
    """The fake webhook gateway: answers 200 (or 503 while `down`), notes what arrived when."""

    def __init__(self) -> None:
        self.down = False
        self.accepted = 0
        self.refused = 0
        #: device -> when (perf_counter) its oldest message not yet pushed was committed.
        self.pending: dict[str, float] = {}
        self.latencies_ns: list[int] = []
        self.recording = False
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._decode = msgspec.json.Decoder(_Note).decode

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def committed(self, device: str) -> None:
        self.pending.setdefault(device, time.perf_counter())

    async def _handle(self, request: web.Request) -> web.Response:
        note = self._decode(await request.read())
        if self.down:
            self.refused += 1
            return web.Response(status=503)
        self.accepted += 1
        since = self.pending.pop(note.device, None)
        if since is not None and self.recording:
            self.latencies_ns.append(int((time.perf_counter() - since) * 1e9))
        return web.Response(status=200)

    def depth_and_lag(self) -> tuple[int, float]:
        now = time.perf_counter()
        oldest = min(self.pending.values(), default=now)
        return len(self.pending), round(now - oldest, 3)


@dataclass
class _Pair:
    client: PigeonClient
    chats: list[tuple[str, str]] = field(default_factory=list)  # (chat id, recipient device)


async def _sends(
    pairs: list[_Pair], gateway: Gateway, seconds: float, inflight: int, per_s: float | None
) -> int:
    """Send for `seconds`: closed loop (`inflight` per sender) or at `per_s` msgs/s in all."""
    done = 0
    stop = time.perf_counter() + seconds
    cycles = [itertools.cycle(p.chats) for p in pairs]

    async def one(i: int) -> None:
        nonlocal done
        chat, device = next(cycles[i])
        await pairs[i].client.send(chat, "x" * 64)
        gateway.committed(device)
        done += 1

    if per_s is None:

        async def loop(i: int) -> None:
            while time.perf_counter() < stop:
                await one(i)

        await asyncio.gather(*(loop(i) for i in range(len(pairs)) for _ in range(inflight)))
        return done
    tasks: set[asyncio.Task[None]] = set()
    start, n = time.perf_counter(), 0
    while (now := time.perf_counter()) < stop:
        due = start + n / per_s
        if due > now:
            await asyncio.sleep(due - now)  # pacing an open-loop load, not synchronisation
        task = asyncio.get_running_loop().create_task(one(n % len(pairs)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.gather(*tasks)
    return done


async def _drained(gateway: Gateway, timeout: float, samples: list[Any], t0: float) -> bool:
    """Sample depth and lag every 0.5 s until nothing is pending (or `timeout`)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        depth, lag = gateway.depth_and_lag()
        samples.append({"t": round(time.perf_counter() - t0, 1), "depth": depth, "lag_s": lag})
        if depth == 0:
            return True
        await asyncio.sleep(0.5)  # a sampling interval
    return False


async def _register(url: str, accounts: list[Account], hook: str | None) -> None:
    """Point every account's push target at `hook` (None: remove the targets)."""
    async with aiohttp.ClientSession() as http:
        for a in accounts:
            async with http.request(
                "PUT" if hook else "DELETE",
                f"{url}/v1/devices/me/push",
                json={"kind": "webhook", "url": hook} if hook else None,
                headers={"Authorization": f"Bearer {a.token}"},
            ) as resp:
                if resp.status != 204:
                    raise RuntimeError(f"push registration refused: {await resp.text()}")


async def run(handle: ServerHandle, p: Params, *, client_cpu: int | None = None) -> dict[str, Any]:
    """Run the scenario against `handle`; returns the result document."""
    report = Run("push", asdict(p) | {"client_cpu": client_cpu})
    gateway = Gateway()
    await gateway.start()
    accounts, _ = await make_devices(handle.url, p.senders + p.recipients, 1)
    senders, recipients = accounts[: p.senders], accounts[p.senders :]
    pairs = [_Pair(PigeonClient(handle.url, a.token)) for a in senders]
    results: dict[str, Any] = {}
    try:
        await asyncio.gather(*(pair.client.connect(timeout=60) for pair in pairs))
        for i, r in enumerate(recipients):
            pair = pairs[i % len(pairs)]
            chat = await pair.client.create_chat([r.user])
            pair.chats.append((str(chat["id"]), r.device))
        # The offline recipients' inboxes grow all along: the first seconds on a fresh database
        # ran ~1.3x faster than any later phase, with or without targets. So a warm-up first,
        # then ABBA, which cancels what drift remains.
        await _sends(pairs, gateway, p.duration, p.inflight, None)
        registered = False
        for i, phase in enumerate(("off", "on", "on", "off")):
            if (phase == "on") != registered:
                await _register(handle.url, recipients, gateway.url if phase == "on" else None)
                registered = phase == "on"
            gateway.pending.clear()
            cpu0, t0 = handle.cpu_seconds(), time.perf_counter()
            sent = await _sends(pairs, gateway, p.duration, p.inflight, None)
            elapsed, cpu1 = time.perf_counter() - t0, handle.cpu_seconds()
            cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            results[f"{phase}{1 + i // 2}"] = {
                "msgs_per_s": rate(sent, elapsed),
                "server_us_per_msg": None if cpu is None else round(cpu / sent * 1e6, 1),
            }
        for phase in ("off", "on"):
            runs = [results.pop(f"{phase}{n}") for n in (1, 2)]
            results[phase] = {
                key: round(sum(r[key] for r in runs if r[key] is not None) / 2, 1)
                for key in ("msgs_per_s", "server_us_per_msg")
            } | {"runs": runs}
        results["on_vs_off"] = round(results["on"]["msgs_per_s"] / results["off"]["msgs_per_s"], 3)
        results["pushes_during_on"] = gateway.accepted
        results["pushes_per_s_during_on"] = rate(gateway.accepted, 2 * p.duration)
        await _register(handle.url, recipients, gateway.url)
        backlog: list[Any] = []
        await _drained(gateway, p.timeout, backlog, time.perf_counter())
        results["after_on_drain_s"] = backlog[-1]["t"] if backlog else 0.0

        samples: list[Any] = []
        gateway.pending.clear()  # entries of the last phase without targets are never pushed
        t0 = time.perf_counter()
        gateway.down = True
        sampler = asyncio.get_running_loop().create_task(_drained(gateway, p.outage, samples, t0))
        await _sends(pairs, gateway, p.outage, p.inflight, p.rate)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        gateway.down = False
        backlog_depth = gateway.depth_and_lag()[0]
        accepted0, t_up = gateway.accepted, time.perf_counter()
        drained = await _drained(gateway, p.timeout, samples, t0)
        drain_s = time.perf_counter() - t_up
        results["outage"] = {
            "refused_during": gateway.refused,
            "depth_at_recovery": backlog_depth,
            "drain_s": round(drain_s, 2),
            "drained": drained,
            "pushes_per_s_draining": rate(gateway.accepted - accepted0, drain_s),
            "samples": samples,
        }
        if not drained:
            report.problems.append(f"the queue did not drain within {p.timeout} s")

        gateway.recording = True
        await _sends(pairs, gateway, p.duration, p.inflight, p.rate)
        await _drained(gateway, p.timeout, [], time.perf_counter())
        results["steady"] = {
            "rate": p.rate,
            "commit_to_gateway": latency_summary(gateway.latencies_ns),
        }
    finally:
        await close_all([pair.client for pair in pairs])
        await gateway.aclose()
    return report.finish(results=results, server=server_section(handle))


def summary(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human summary lines of a result document."""
    r = doc["results"]
    o = r["outage"]
    return [
        ("push off", f"{r['off']['msgs_per_s']} msgs/s, {r['off']['server_us_per_msg']} us/msg"),
        ("push on", f"{r['on']['msgs_per_s']} msgs/s, {r['on']['server_us_per_msg']} us/msg"),
        ("on / off", f"{r['on_vs_off']}x ({r['pushes_per_s_during_on']} pushes/s while on)"),
        (
            "gateway outage",
            f"depth {o['depth_at_recovery']} at recovery, drained in {o['drain_s']} s"
            f" at {o['pushes_per_s_draining']} pushes/s",
        ),
        (
            f"commit->gateway at {r['steady']['rate']}/s",
            fmt_latency(r["steady"]["commit_to_gateway"]),
        ),
        ("load average", f"{doc['loadavg_start']} -> {doc['loadavg_end']}"),
    ]
