"""Scenario "idle": what an idle authenticated connection costs the server in memory.

The server's RSS is read with every bench device registered and no connection open, then with
`connections` WebSockets open, authenticated (each got its `ready`) and idle for `hold` seconds;
the difference over the count is the figure. The generator uses raw aiohttp WebSockets with the
Bearer header (lighter than a full `PigeonClient`), each with a reader so pings are answered.
A user may have only a few devices, so devices are spread over ceil(C / devices_per_user) users.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import aiohttp
import msgspec
import psutil

from pigeon.bench.accounts import bounded, make_devices
from pigeon.bench.report import Run, fmt_latency, latency_summary
from pigeon.bench.server import ServerHandle, server_section
from pigeon.bench.workers import Gate, Generators, split


@dataclass
class Params:
    connections: int = 10_000
    devices_per_user: int = 3
    procs: int = 2
    hold: float = 3.0
    concurrency: int = 50


@dataclass
class Spec:
    url: str
    tokens: list[str]
    concurrency: int


@dataclass
class Outcome:
    connected: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    closed_early: dict[str, int] = field(default_factory=dict)
    connect_s: float = 0.0
    connect_ns: list[int] = field(default_factory=list)
    rss_kib: int = 0


class _Frame(msgspec.Struct):
    t: str


_decode_frame = msgspec.json.Decoder(_Frame).decode


class _Idle:
    """One generator's connections."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.url = spec.url.rstrip("/") + "/v1/ws"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.failures: Counter[str] = Counter()
        self.closed_early: Counter[str] = Counter()
        self.connect_ns: list[int] = []
        self.stopping = False

    async def open(self, token: str) -> None:
        start = time.perf_counter_ns()
        try:
            ws = await self.session.ws_connect(
                self.url, headers={"Authorization": f"Bearer {token}"}, autoping=True
            )
            msg = await ws.receive(timeout=60)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.failures[type(exc).__name__] += 1
            return
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            self.failures[f"no ready: {msg.type.name}"] += 1
            await ws.close()
            return
        if _decode_frame(msg.data).t != "ready":
            self.failures["first frame not ready"] += 1
        self.connect_ns.append(time.perf_counter_ns() - start)
        self.sockets.append(ws)
        self.readers.append(asyncio.create_task(self.read(ws)))

    async def read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read (and so answer pings) until closed; a close before the end is counted."""
        async for _ in ws:
            pass
        if not self.stopping:
            self.closed_early[str(ws.close_code)] += 1

    async def close(self) -> None:
        self.stopping = True
        await bounded(500, [ws.close for ws in self.sockets])
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        await self.session.close()


async def generate(spec: Spec, gate: Gate) -> Outcome:
    """Open every connection, report ready, hold them until go, then close them."""
    idle = _Idle(spec)
    out = Outcome()
    try:
        start = time.perf_counter()
        await bounded(spec.concurrency, [partial(idle.open, t) for t in spec.tokens])
        out.connect_s = time.perf_counter() - start
        out.connected = len(idle.sockets)
        out.rss_kib = int(psutil.Process().memory_info().rss // 1024)
        await gate.ready({"connected": out.connected, "connect_s": round(out.connect_s, 2)})
    finally:
        await idle.close()
    out.failures = dict(idle.failures)
    out.closed_early = dict(idle.closed_early)
    out.connect_ns = idle.connect_ns
    return out


async def run(
    handle: ServerHandle, p: Params, *, inline: bool = False, client_cpu: int | None = None
) -> dict[str, Any]:
    """Run the scenario against `handle`; returns the result document."""
    report = Run("idle", asdict(p) | {"client_cpu": client_cpu})
    rss_start = handle.rss_kib()
    users = math.ceil(p.connections / p.devices_per_user)
    accounts, accounts_s = await make_devices(
        handle.url, users, p.devices_per_user, total=p.connections
    )
    base = await handle.connections()
    rss_before = handle.rss_kib()
    specs = [
        Spec(handle.url, [a.token for a in s], p.concurrency) for s in split(accounts, p.procs)
    ]
    gens = Generators(generate, specs, inline=inline, cpu=client_cpu, nofile=p.connections + 4096)
    try:
        await gens.start()
        ready = await gens.wait_ready(300 + p.connections / 20)
        connected = sum(int(r["connected"]) for r in ready)
        seen = await handle.wait_connections(base + connected, 60)
        await asyncio.sleep(p.hold)  # the idle period being measured
        rss_after = handle.rss_kib()
        after_hold = await handle.connections() - base
        gens.go()
        outcomes = await gens.results(300)
    finally:
        await gens.aclose()
    failures: Counter[str] = Counter()
    closed_early: Counter[str] = Counter()
    for o in outcomes:
        failures.update(o.failures)
        closed_early.update(o.closed_early)
    per_conn = None
    if rss_after is not None and rss_before is not None and connected:
        per_conn = round((rss_after - rss_before) / connected, 2)
    results = {
        "connected": connected,
        "server_connections_seen": seen - base,
        "server_connections_after_hold": after_hold,
        "accounts_setup_s": round(accounts_s, 2),
        "connect_s": round(max(o.connect_s for o in outcomes), 2),
        "connect_latency": latency_summary(s for o in outcomes for s in o.connect_ns),
        "kib_per_connection": per_conn,
        "failures": dict(failures),
        "closed_early": dict(closed_early),
        "generator_rss_kib": [o.rss_kib for o in outcomes],
    }
    if connected < p.connections:
        report.problems.append(f"only {connected} of {p.connections} connected: {dict(failures)}")
    if after_hold != connected:
        report.problems.append(f"server counts {after_hold} connections after the hold")
    if closed_early:
        report.problems.append(f"connections closed while idle: {dict(closed_early)}")
    server = server_section(
        handle,
        rss_kib_startup=rss_start,
        rss_kib_before=rss_before,
        rss_kib_after=rss_after,
        rss_kib_peak=handle.peak_rss_kib(),
    )
    return report.finish(results=results, server=server)


def summary(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human summary lines of a result document."""
    r, s = doc["results"], doc["server"]
    return [
        ("connections", f"{r['connected']} open in {r['connect_s']:.1f} s"),
        ("connect (to ready)", fmt_latency(r["connect_latency"])),
        (
            "server RSS",
            f"startup {s.get('rss_kib_startup')}, before {s.get('rss_kib_before')},"
            f" after {s.get('rss_kib_after')} KiB",
        ),
        ("per idle connection", f"{r['kib_per_connection']} KiB"),
        ("load average", f"{doc['loadavg_start']} -> {doc['loadavg_end']}"),
    ]
