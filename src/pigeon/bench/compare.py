"""`pigeon bench compare`: one 1:1 workload against Pigeon, the bare relay and, when it is
installed, ejabberd (`bench/ejabberd.py`), with a generator light enough not to be the limit
(`bench/wire.py`), reported as Pigeon's ratios to each.

Workloads, each run against a freshly spawned target pinned to `server_cpu`, the generator
pinned to `client_cpu`:
- saturation: `pairs` closed-loop pairs with `inflight` sends outstanding each;
- open loop at each of `rates` msgs/s: sends leave on a 1 ms schedule whatever the replies do
  (the generator stays far from saturation, so a stalled server cannot slow its sends), and
  latency counts from the moment a send left, not from its slot in the schedule, so the
  schedule's granularity does not add to every figure.

Per run: delivered msgs/s, send-to-receive latency (the body starts with the send time,
CLOCK_MONOTONIC, comparable across processes), the server's CPU per delivered message, and for
Pigeon the messages committed but never received (must be 0).

ejabberd speaks XMPP and acknowledges nothing to a sender, so there a delivery drives the
closed loop (the receiver's pair sends its next message), `committed` counts messages sent and
`lost` those sent but never received.

With `e2e` (Pigeon only) the chats are created encrypted and every message is an `e2e` envelope
instead of a body: a fixed algorithm, sender key and session id, and a base64 ciphertext of the
body's size (rounded up to a multiple of 4) that starts with the send time, so the server does
its envelope checks and the receiver still reads its stamp. The receiver and sender ack
events as the SDK does (`bench/acks.py`: a message within 5 ms, a receipt on the sender's next
send or after 2 s), so Pigeon does the work a real client causes: send, recipient ack,
delivered receipt, sender ack.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
import psutil

from pigeon.bench import ejabberd
from pigeon.bench.accounts import bounded, make_devices
from pigeon.bench.acks import Acker
from pigeon.bench.one_to_one import STAMP_DIGITS
from pigeon.bench.report import latency_summary, loadavg
from pigeon.bench.server import (
    Node,
    Target,
    free_port,
    pin,
    raise_nofile,
    server,
    stop,
    wait_healthy,
)
from pigeon.bench.store import CpuSample, cpu_percent
from pigeon.bench.wire import WireSocket

_EVENT = b'{"t":"event","iseq":'
_OK = b'{"t":"ok","rid":'
_BODY = b'"body":"'
_CIPHERTEXT = b'"ciphertext":"'
#: A valid-looking envelope's fixed fields: 32 bytes of base64 for the key, a session id.
_E2E_HEAD = (
    b'"e2e":{"algorithm":"pigeon.megolm.v1","sender_key":"'
    + base64.b64encode(bytes(range(32))).rstrip(b"=")
    + b'","session_id":"'
    + base64.b64encode(bytes(range(32, 64))).rstrip(b"=")
    + b'","ciphertext":"'
)
TICK = 0.001  # open-loop scheduling granularity


@dataclass
class Workload:
    """One run's load: closed loop (`rate` None) or open loop at `rate` msgs/s in total."""

    pairs: int = 100
    inflight: int = 10
    rate: float | None = None
    duration: float = 8.0
    warmup: float = 2.0
    size: int = 100
    #: Senders' acks ride on their next `send` (as the SDK does); off for servers before it.
    ride_acks: bool = True
    #: Encrypted chats, messages sent as `e2e` envelopes of the same size (Pigeon only).
    e2e: bool = False

    @property
    def name(self) -> str:
        name = "saturation" if self.rate is None else f"{self.rate:g} msgs/s"
        return f"{name} e2e" if self.e2e else name


@dataclass
class Result:
    """What one run measured."""

    target: str
    workload: str
    delivered_per_s: float
    latency_ms: dict[str, Any]
    server_cpu_pct: float | None
    cpu_us_per_msg: float | None
    committed: int
    lost: int
    generator_cpu_pct: float
    load: list[float] = field(default_factory=list)
    #: CPU of the services the server uses, when they run here (PostgreSQL's backends of the
    #: server's database, Redis), in µs per delivered message.
    services_us_per_msg: dict[str, float] = field(default_factory=dict)


class _Socket(Acker):
    """One generator socket: counts what arrives and acks Pigeon events like the SDK."""

    __slots__ = ("gen", "pair")

    def __init__(self, gen: _Generator) -> None:
        super().__init__(gen.loop)
        self.gen = gen
        self.pair: _Pair | None = None  # the pair it sends for (on ejabberd, receives for too)

    def on_frame(self, frame: bytes) -> None:
        if frame.startswith(_EVENT):
            start = len(_EVENT)
            iseq = int(frame[start : frame.index(b",", start)])
            self.on_event(iseq, self.gen.on_event(frame))
        elif frame.startswith(_OK):
            if frame[len(_OK)] != 0x22:  # a numeric rid: a send's reply (acks use "a<n>")
                self.gen.on_sent(self)
        elif self.gen.relay:  # the relay forwards the sender's frame as it is
            self.gen.on_event(frame)


class _XmppSocket(_Socket):
    """One socket on ejabberd. XMPP has no server ack, so a delivery frees its pair's slot:
    `pair` is set on the receiver too, and only the receiver counts a message (a bounce to the
    sender would carry the body too; it stays uncounted, so it shows as lost)."""

    __slots__ = ()

    def on_frame(self, frame: bytes) -> None:
        pair = self.pair
        if (
            pair is not None
            and pair.rx is self
            and frame.startswith(ejabberd.MESSAGE)
            and self.gen.on_event(frame)
        ):
            self.gen.on_sent(pair.tx)


@dataclass
class _Pair:
    tx: _Socket
    rx: _Socket
    #: Where tx sends: Pigeon's chat id, the relay's room, rx's full JID on ejabberd.
    chat: bytes


class _Generator:
    """Drives the pairs and gathers the figures of the measured window."""

    def __init__(self, w: Workload, relay: bool) -> None:
        self.w = w
        self.relay = relay
        self.loop = asyncio.get_running_loop()
        self.pairs: list[_Pair] = []
        if w.e2e:  # base64 text: a length of 4k, characters of its alphabet
            self.pad = b"x" * max(0, -(-w.size // 4) * 4 - STAMP_DIGITS)
            self.marker = _CIPHERTEXT
        else:
            self.pad = b"x" * max(0, w.size - STAMP_DIGITS)
            self.marker = _BODY
        self.sending = False
        self.measuring = False
        self.samples: list[int] = []
        self.received = 0
        self.received_in_window = 0
        self.committed = 0
        self.rid = 0
        self.drained = asyncio.Event()
        self._schedule: asyncio.Task[None] | None = None

    def frame(self, pair: _Pair, stamp: int) -> bytes:
        self.rid += 1
        ack = pair.tx.ride() if self.w.ride_acks else b""  # the ack rides along, as in the SDK
        if self.w.e2e:
            return b'{"t":"send","rid":%d,"chat":"%s","cmid":"%d",%s%020d%s"}%s}' % (
                self.rid,
                pair.chat,
                self.rid,
                _E2E_HEAD,
                stamp,
                self.pad,
                ack,
            )
        return b'{"t":"send","rid":%d,"chat":"%s","cmid":"%d","body":"%020d%s"%s}' % (
            self.rid,
            pair.chat,
            self.rid,
            stamp,
            self.pad,
            ack,
        )

    def on_sent(self, tx: _Socket) -> None:
        self.committed += 1
        if self.sending and self.w.rate is None:
            pair = tx.pair
            assert pair is not None and pair.tx.sock is not None
            pair.tx.sock.send(self.frame(pair, time.perf_counter_ns()))

    def on_event(self, frame: bytes) -> bool:
        """Count a message (True) or a receipt to its sender (False)."""
        i = frame.find(self.marker)
        if i < 0:
            return False
        now = time.perf_counter_ns()
        i += len(self.marker)
        self.received += 1
        if self.measuring:
            self.received_in_window += 1
            self.samples.append(now - int(frame[i : i + STAMP_DIGITS]))
        if not self.sending and self.received >= self.committed:
            self.drained.set()
        return True

    def start(self) -> None:
        self.sending = True
        if self.w.rate is None:
            for pair in self.pairs:
                assert pair.tx.sock is not None
                now = time.perf_counter_ns()
                pair.tx.sock.send_many([self.frame(pair, now) for _ in range(self.w.inflight)])
        else:
            self._schedule = self.loop.create_task(self._open_loop(self.w.rate))

    async def _open_loop(self, rate: float) -> None:
        t0 = time.perf_counter_ns()
        k = 0
        n = len(self.pairs)
        interval_ns = 1e9 / rate
        while self.sending:
            now = time.perf_counter_ns()
            due = int((now - t0) / interval_ns)
            batches: dict[int, list[bytes]] = {}
            while k < due:
                pair_index = k % n
                batches.setdefault(pair_index, []).append(self.frame(self.pairs[pair_index], now))
                k += 1
            for index, frames in batches.items():
                sock = self.pairs[index].tx.sock
                assert sock is not None
                sock.send_many(frames)
            await asyncio.sleep(TICK)  # the schedule's clock tick, not synchronisation


class _XmppGenerator(_Generator):
    """The generator for ejabberd: XMPP message frames, and a closed loop driven by deliveries
    (`on_sent` on receipt), since nothing acknowledges a send."""

    def __init__(self, w: Workload) -> None:
        super().__init__(w, relay=False)
        self.marker = ejabberd.BODY

    def frame(self, pair: _Pair, stamp: int) -> bytes:
        self.rid += 1
        self.committed += 1  # every frame built is sent at once: committed counts sends
        return ejabberd.message(pair.chat, self.rid, stamp, self.pad)

    def on_sent(self, tx: _Socket) -> None:
        if self.sending and self.w.rate is None:
            pair = tx.pair
            assert pair is not None and pair.tx.sock is not None
            pair.tx.sock.send(self.frame(pair, time.perf_counter_ns()))


async def _connect(url: str, s: _Socket) -> None:
    s.sock = await WireSocket.connect(url, s.on_frame)


async def _run_pigeon(w: Workload, target: Target) -> Result:
    async with server(target) as handle:
        accounts, _ = await make_devices(handle.url, 2 * w.pairs, 1)
        gen = _Generator(w, relay=False)
        ws = handle.url.replace("http://", "ws://") + "/v1/ws?token="
        socks = [_Socket(gen) for _ in accounts]
        try:
            await bounded(
                100,
                [partial(_connect, ws + a.token, s) for a, s in zip(accounts, socks, strict=True)],
            )
            chats = await bounded(
                50,
                [
                    partial(_create_chat, socks[2 * i], accounts[2 * i + 1].user, w.e2e)
                    for i in range(w.pairs)
                ],
            )
            _pair_up(gen, socks, [chat.encode() for chat in chats])
            return await _measure(gen, w, "pigeon", handle.cpu_seconds, handle.service_cpu)
        finally:
            _close(socks)


def _pair_up(gen: _Generator, socks: list[_Socket], chats: list[bytes]) -> None:
    """Socket 2i sends to socket 2i+1 in chats[i]."""
    for i, chat in enumerate(chats):
        pair = _Pair(socks[2 * i], socks[2 * i + 1], chat)
        pair.tx.pair = pair
        gen.pairs.append(pair)


def _close(socks: list[_Socket]) -> None:
    for s in socks:
        if s.sock is not None:
            s.sock.close()


async def _create_chat(s: _Socket, peer: str, encrypted: bool = False) -> str:
    """create_chat through the raw socket (set-up only, so a plain decode is fine)."""
    assert s.sock is not None
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()
    previous = s.sock.on_frame

    def on_frame(frame: bytes) -> None:
        if frame.startswith(b'{"t":"ok","rid":"c"') or frame.startswith(b'{"t":"error"'):
            if not reply.done():
                reply.set_result(frame)
        else:
            previous(frame)

    s.sock.on_frame = on_frame
    request: dict[str, Any] = {"t": "create_chat", "rid": "c", "participants": [peer]}
    request |= {"kind": "direct", "encrypted": True} if encrypted else {"kind": "direct"}
    body = msgspec.json.encode(request)
    s.sock.send(body)
    async with asyncio.timeout(30):
        frame = await reply
    s.sock.on_frame = previous
    decoded = msgspec.json.decode(frame)
    if decoded.get("t") != "ok" or decoded["result"].get("encrypted", False) != encrypted:
        raise RuntimeError(f"create_chat failed: {frame!r}")
    return str(decoded["result"]["id"])


def _spawn_relay(port: int, cpu: int | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pigeon.bench.relay", "--port", str(port)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=lambda: pin(cpu))


@contextlib.asynccontextmanager
async def _relay(target: Target) -> AsyncIterator[tuple[str, Node]]:
    port = free_port()
    proc = _spawn_relay(port, target.server_cpu)
    node = Node(f"http://127.0.0.1:{port}", proc.pid)
    try:
        await wait_healthy(node, proc, 20.0)
        yield f"ws://127.0.0.1:{port}/ws", node
    finally:
        stop(proc, grace=3.0)  # it may wait for sockets the generator dropped


async def _run_relay(w: Workload, target: Target) -> Result:
    if w.e2e:
        raise ValueError("e2e applies to the pigeon target only")
    async with _relay(target) as (url, node):
        gen = _Generator(w, relay=True)
        socks = [_Socket(gen) for _ in range(2 * w.pairs)]
        jobs: list[Callable[[], Awaitable[None]]] = []
        for i in range(w.pairs):
            jobs.append(partial(_connect, url, socks[2 * i]))
            jobs.append(partial(_connect, f"{url}?chat=p{i}", socks[2 * i + 1]))
        try:
            await bounded(100, jobs)
            _pair_up(gen, socks, [b"p%d" % i for i in range(w.pairs)])
            return await _measure(gen, w, "relay", node.cpu_seconds)
        finally:
            _close(socks)


async def _run_ejabberd(w: Workload, target: Target) -> Result:
    if w.e2e:
        raise ValueError("e2e applies to the pigeon target only")
    async with ejabberd.running(target.server_cpu) as (url, node):
        gen = _XmppGenerator(w)
        socks: list[_Socket] = [_XmppSocket(gen) for _ in range(2 * w.pairs)]
        try:
            jids = await bounded(100, [partial(_login, url, s) for s in socks])
            _pair_up(gen, socks, jids[1::2])
            for pair in gen.pairs:
                pair.rx.pair = pair
            return await _measure(gen, w, "ejabberd", node.cpu_seconds)
        finally:
            _close(socks)


async def _login(url: str, s: _Socket) -> bytes:
    s.sock, jid = await ejabberd.login(url, s.on_frame)
    return jid


async def _measure(
    gen: _Generator,
    w: Workload,
    name: str,
    cpu_seconds: Callable[[], float | None],
    services: Callable[[], Awaitable[CpuSample]] | None = None,
) -> Result:
    me = psutil.Process()
    gen.start()
    await asyncio.sleep(w.warmup)  # the warm-up period itself, not synchronisation
    services0 = await services() if services is not None else {}
    cpu0, mine0, t0 = cpu_seconds(), me.cpu_times(), time.perf_counter()
    load0 = loadavg()
    gen.measuring = True
    await asyncio.sleep(w.duration)  # the measured window
    gen.measuring = False
    elapsed = time.perf_counter() - t0
    cpu1, mine1 = cpu_seconds(), me.cpu_times()
    services1 = await services() if services is not None else {}
    gen.sending = False
    if gen.received >= gen.committed:
        gen.drained.set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(20):
            await gen.drained.wait()
    delivered = gen.received_in_window
    server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    mine = (mine1.user + mine1.system) - (mine0.user + mine0.system)
    return Result(
        target=name,
        workload=w.name,
        delivered_per_s=delivered / elapsed,
        latency_ms=latency_summary(gen.samples),
        server_cpu_pct=None if server_cpu is None else 100 * server_cpu / elapsed,
        cpu_us_per_msg=None
        if server_cpu is None or not delivered
        else 1e6 * server_cpu / delivered,
        committed=gen.committed,
        lost=max(0, gen.committed - gen.received),
        generator_cpu_pct=100 * mine / elapsed,
        load=load0,
        services_us_per_msg={
            service: round(pct / 100 * elapsed * 1e6 / delivered, 1)
            for service, pct in cpu_percent(services0, services1, elapsed).items()
        }
        if delivered
        else {},
    )


RUNNERS: dict[str, Callable[[Workload, Target], Any]] = {
    "relay": _run_relay,
    "pigeon": _run_pigeon,
    "ejabberd": _run_ejabberd,  # when installed (`ejabberd.installed()`)
}


async def compare(
    targets: list[str], workloads: list[Workload], target: Target, rounds: int
) -> list[Result]:
    """Every workload against every target, `rounds` times, interleaved within a round."""
    raise_nofile(65536)
    results: list[Result] = []
    for _ in range(rounds):
        for w in workloads:
            for name in targets:
                results.append(await RUNNERS[name](w, target))
    return results


def table(results: list[Result], targets: list[str]) -> list[str]:
    """Medians per (workload, target), with Pigeon's ratio to each other target."""
    lines = []
    by: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by.setdefault((r.workload, r.target), []).append(r)
    workloads = list(dict.fromkeys(r.workload for r in results))
    header = f"{'workload':<16}{'target':<10}{'msgs/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
    header += f"{'cpu %':>8}{'us/msg':>8}{'lost':>6}{'gen %':>7}"
    lines.append(header)
    for wname in workloads:
        med: dict[str, dict[str, float | None]] = {}
        for t in targets:
            runs = by.get((wname, t), [])
            if not runs:
                continue
            m = {
                "rate": statistics.median(r.delivered_per_s for r in runs),
                "p50": _median([r.latency_ms.get("p50_ms") for r in runs]),
                "p99": _median([r.latency_ms.get("p99_ms") for r in runs]),
                "cpu": _median([r.server_cpu_pct for r in runs]),
                "us": _median([r.cpu_us_per_msg for r in runs]),
                "gen": statistics.median(r.generator_cpu_pct for r in runs),
            }
            med[t] = m
            lost = sum(r.lost for r in runs)
            lines.append(
                f"{wname:<16}{t:<10}{m['rate']:>10.0f}{_f(m['p50']):>9}{_f(m['p99']):>9}"
                f"{_f(m['cpu'], 0):>8}{_f(m['us'], 0):>8}{lost:>6}{_f(m['gen'], 0):>7}"
            )
            services = sorted({s for r in runs for s in r.services_us_per_msg})
            if services:
                each = [
                    f"{s} {_f(_median([r.services_us_per_msg.get(s) for r in runs]), 0)}"
                    for s in services
                ]
                lines.append(f"{'':<16}{t} services, us/msg: " + ", ".join(each))
        if "pigeon" in med:
            for other, m in med.items():
                if other == "pigeon":
                    continue
                p = med["pigeon"]
                ratios = [
                    f"msgs/s {_ratio(p['rate'], m['rate'])}",
                    f"p99 {_ratio(p['p99'], m['p99'])}",
                    f"us/msg {_ratio(p['us'], m['us'])}",
                ]
                lines.append(f"{'':<16}pigeon/{other}: " + ", ".join(ratios))
    return lines


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"
