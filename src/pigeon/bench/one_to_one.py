"""Scenario "one-to-one": N online devices in N/2 direct chats, a sender and a receiver each.

Each sender keeps `inflight` sends outstanding (closed loop), or all senders together offer a
fixed `rate` (open loop: sends start on schedule whatever the replies do, and latency counts from
the scheduled time so a stalled server cannot hide its queueing). A message's body starts with
its send time (`perf_counter_ns`, CLOCK_MONOTONIC: comparable across processes of one machine);
the receiver, which consumes every event so the SDK acks it, takes the difference. Throughput is
the messages received in the measured window divided by its length. After the window every
receiver must catch up with its sender's last committed seq: what never arrives is reported lost.

Against a cluster of N nodes (`ServerHandle.nodes`), pair k's sender connects to node k % N and
its receiver to node (k + 1) % N, so with N > 1 every delivery crosses nodes (through the bus);
the `cross_node` figures count those deliveries alone. Accounts and chats are made on node 0.

With presence (`presence_watchers` K > 0), before the measurement every device subscribes to
the presence of its pair partner (they share the direct chat) and, for K > 1, of the other
members of its block: the generator's devices, in pair order, are cut in blocks of K + 1 that
each share a group, so each device has K watchers (K + 1 when its partner falls outside its
block). With `presence_churn` C > 0, C extra users (one device each, spread over the generators)
churn during the whole run: each is watched by max(1, K) devices of its generator (sharing a
group with them) and cycles online for `presence_churn_period / 2` seconds, then offline for
max(that, `presence_grace` + 0.25 s) so that the server's grace never coalesces a transition,
with phases staggered over the period. Presence frames are taken and counted by the devices; the
figures say how many flowed in the window next to the message figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import psutil

from pigeon.bench.accounts import bounded, make_devices
from pigeon.bench.clients import CLOSE_TIMEOUT, close_all, connect_all
from pigeon.bench.report import Run, fmt_latency, latency_summary, rate, total
from pigeon.bench.server import ServerHandle, server_section
from pigeon.bench.store import cpu_percent
from pigeon.bench.workers import Gate, Generators, split
from pigeon.client.client import ClientError, PigeonClient
from pigeon.client.http import Account
from pigeon.domain.events import Message, PresenceFrame

STAMP_DIGITS = 20


@dataclass
class Params:
    devices: int = 200
    inflight: int = 10
    duration: float = 10.0
    warmup: float = 2.0
    rate: float | None = None
    size: int = 64
    procs: int = 1
    drain_timeout: float = 20.0
    presence_watchers: int = 0
    presence_churn: int = 0
    presence_churn_period: float = 2.0
    presence_grace: float = 0.5


@dataclass
class PairSpec:
    """A direct chat's two ends: the sender's token and node, the receiver's id, token, node."""

    tx_token: str
    rx_user: str
    rx_token: str
    tx_url: str
    rx_url: str


@dataclass
class Spec:
    """One generator's share: its pairs, and the node its churners use."""

    url: str
    pairs: list[PairSpec]
    params: Params
    rate: float | None = None
    churners: list[tuple[str, str]] = field(default_factory=list)  # (user id, token)


@dataclass
class Outcome:
    """What one generator measured."""

    pairs: int
    window_s: float
    delivered: int = 0
    committed: int = 0
    latency_ns: list[int] = field(default_factory=list)
    commit_ns: list[int] = field(default_factory=list)
    cross_pairs: int = 0
    cross_delivered: int = 0
    cross_latency_ns: list[int] = field(default_factory=list)
    committed_total: int = 0
    received_total: int = 0
    missing: int = 0
    duplicates: int = 0
    seq_gaps: int = 0
    send_errors: dict[str, int] = field(default_factory=dict)
    consumer_errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    skipped: int = 0
    stuck_sends: int = 0
    close_timeouts: int = 0
    drained: bool = True
    cpu_percent: float = 0.0
    setup_s: float = 0.0
    presence_subscriptions: int = 0
    presence_chats: int = 0
    presence_events: int = 0
    presence_events_in_window: int = 0
    churn_cycles: int = 0
    churn_failures: dict[str, int] = field(default_factory=dict)


def make_body(stamp_ns: int, size: int) -> str:
    """A body carrying its send time, padded to `size` characters."""
    head = f"{stamp_ns:0{STAMP_DIGITS}d}"
    return head + "x" * max(0, size - len(head))


def body_stamp(body: str | None) -> int:
    return int((body or "0")[:STAMP_DIGITS])


class _Pair:
    __slots__ = (
        "caught_up",
        "chat",
        "committed",
        "crosses",
        "dups",
        "gaps",
        "last_seq",
        "received",
        "rx",
        "rx_user",
        "tx",
    )

    def __init__(self, tx: PigeonClient, rx: PigeonClient, spec: PairSpec) -> None:
        self.tx, self.rx, self.rx_user = tx, rx, spec.rx_user
        self.crosses = spec.tx_url != spec.rx_url
        self.chat = ""
        self.committed = self.received = self.last_seq = self.dups = self.gaps = 0
        self.caught_up: asyncio.Event | None = None


class _Generator:
    """The state of one generator process (or inline run)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.p = spec.params
        self.pairs: list[_Pair] = []
        self.by_chat: dict[str, _Pair] = {}
        self.win_start = self.win_end = 1 << 62
        self.stopping = False
        self.out = Outcome(pairs=len(spec.pairs), window_s=spec.params.duration)
        self.errors: Counter[str] = Counter()
        self.consumer_errors: Counter[str] = Counter()
        self.consumers: list[asyncio.Task[None]] = []
        self.sends: set[asyncio.Task[None]] = set()
        self.presence = _Presence(self)

    async def setup(self) -> None:
        start = time.perf_counter()
        pairs = self.spec.pairs
        tokens = [t for p in pairs for t in (p.tx_token, p.rx_token)]
        clients = await connect_all([u for p in pairs for u in (p.tx_url, p.rx_url)], tokens)
        for i, ends in enumerate(pairs):
            self.pairs.append(_Pair(clients[2 * i], clients[2 * i + 1], ends))
        self.out.cross_pairs = sum(p.crosses for p in self.pairs)
        for c in clients:
            self.consumers.append(asyncio.create_task(self._consume(c)))
        chats = await bounded(100, [partial(p.tx.create_chat, [p.rx_user]) for p in self.pairs])
        for pair, chat in zip(self.pairs, chats, strict=True):
            pair.chat = str(chat["id"])
            self.by_chat[pair.chat] = pair
        await self.presence.setup(clients)
        self.out.setup_s = round(time.perf_counter() - start, 2)

    async def _consume(self, client: PigeonClient) -> None:
        try:
            async for event in client.events():
                if isinstance(event, Message):
                    self._on_message(event, time.perf_counter_ns())
        except ClientError as exc:
            self.consumer_errors[exc.code] += 1

    def _on_message(self, msg: Message, now: int) -> None:
        pair = self.by_chat.get(msg.chat)
        if pair is None:
            return
        if msg.seq <= pair.last_seq:
            pair.dups += 1
            return
        pair.gaps += msg.seq - pair.last_seq - 1
        pair.last_seq = msg.seq
        pair.received += 1
        if self.win_start <= now < self.win_end:
            latency = now - body_stamp(msg.body)
            self.out.delivered += 1
            self.out.latency_ns.append(latency)
            if pair.crosses:
                self.out.cross_delivered += 1
                self.out.cross_latency_ns.append(latency)
        if pair.caught_up is not None and pair.last_seq >= pair.committed:
            pair.caught_up.set()

    async def _send(self, pair: _Pair, stamp: int) -> None:
        try:
            sent = await pair.tx.send(pair.chat, make_body(stamp, self.p.size))
        except ClientError as exc:
            self.errors[exc.code] += 1
            await asyncio.sleep(0.05)  # back off after an error instead of spinning
            return
        done = time.perf_counter_ns()
        pair.committed = max(pair.committed, sent.seq)
        if self.win_start <= done < self.win_end:
            self.out.committed += 1
            self.out.commit_ns.append(done - stamp)

    async def _closed_loop(self, pair: _Pair) -> None:
        while not self.stopping:
            await self._send(pair, time.perf_counter_ns())

    async def _open_loop(self, total_rate: float, end: int) -> None:
        interval = 1e9 / total_rate
        cap = max(1000, 50 * len(self.pairs) * self.p.inflight)
        due = float(time.perf_counter_ns())
        k = 0
        while not self.stopping and due < end:
            now = time.perf_counter_ns()
            while due <= now and due < end:
                if len(self.sends) >= cap:
                    self.out.skipped += 1
                else:
                    pair = self.pairs[k % len(self.pairs)]
                    task = asyncio.create_task(self._send(pair, int(due)))
                    self.sends.add(task)
                    task.add_done_callback(self.sends.discard)
                k += 1
                due += interval
            await asyncio.sleep(max(0.0, (due - time.perf_counter_ns()) / 1e9))  # pacing

    async def measure(self) -> None:
        p = self.p
        t0 = time.perf_counter_ns()
        self.win_start = t0 + int(p.warmup * 1e9)
        self.win_end = self.win_start + int(p.duration * 1e9)
        if self.spec.rate:
            senders = [asyncio.create_task(self._open_loop(self.spec.rate, self.win_end))]
        else:
            senders = [
                asyncio.create_task(self._closed_loop(pair))
                for pair in self.pairs
                for _ in range(p.inflight)
            ]
        self.presence.start_churn()
        proc = psutil.Process()
        await asyncio.sleep(p.warmup)  # measurement timer
        cpu0, wall0 = sum(proc.cpu_times()[:2]), time.perf_counter()
        await asyncio.sleep(max(0.0, (self.win_end - time.perf_counter_ns()) / 1e9))
        cpu1, wall1 = sum(proc.cpu_times()[:2]), time.perf_counter()
        self.stopping = True
        await self.presence.stop_churn()
        self.out.cpu_percent = round(100 * (cpu1 - cpu0) / max(wall1 - wall0, 1e-9), 1)
        await self._settle(senders)
        await self._settle(list(self.sends))  # open loop: the sends it started

    async def _settle(self, tasks: list[asyncio.Task[None]]) -> None:
        """Give sends still in flight `drain_timeout` to finish; count and cancel the rest."""
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.p.drain_timeout)
        self.out.stuck_sends += len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def drain(self) -> None:
        waits = []
        for pair in self.pairs:
            if pair.last_seq < pair.committed:
                pair.caught_up = asyncio.Event()
                waits.append(pair.caught_up.wait())
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.p.drain_timeout)
        except TimeoutError:
            self.out.drained = False

    async def close(self) -> Outcome:
        await self.presence.stop_churn()
        for task in self.consumers:
            task.cancel()
        await asyncio.gather(*self.consumers, return_exceptions=True)
        clients = [c for pair in self.pairs for c in (pair.tx, pair.rx)]
        self.out.close_timeouts = await close_all(clients)
        out = self.out
        out.committed_total = sum(p.committed for p in self.pairs)
        out.received_total = sum(p.received for p in self.pairs)
        out.missing = sum(max(0, p.committed - p.received) for p in self.pairs)
        out.duplicates = sum(p.dups for p in self.pairs)
        out.seq_gaps = sum(p.gaps for p in self.pairs)
        out.send_errors = dict(self.errors)
        out.consumer_errors = dict(self.consumer_errors)
        out.reconnects = sum(c.connects - 1 for c in clients)
        out.churn_failures = dict(self.presence.failures)
        return out


class _Presence:
    """Presence subscriptions of a generator's devices, and its churning extra users."""

    def __init__(self, gen: _Generator) -> None:
        self.gen = gen
        self.p = gen.p
        self.failures: Counter[str] = Counter()
        self.churn_tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()

    async def setup(self, clients: list[PigeonClient]) -> None:
        """Make the groups, subscribe, and start taking presence frames."""
        k, out = self.p.presence_watchers, self.gen.out
        if k <= 0 and not self.gen.spec.churners:
            return
        watch: list[set[str]] = [set() for _ in clients]
        creates: list[Callable[[], Awaitable[dict[str, Any]]]] = []
        if k >= 1:
            for i, mine in enumerate(watch):  # the pair partner: they share the direct chat
                mine.add(str(clients[i ^ 1].user))
        if k >= 2:
            for b in range(0, len(clients), k + 1):
                block = list(range(b, min(b + k + 1, len(clients))))
                if len(block) < 2:
                    continue
                users = [str(clients[j].user) for j in block]
                creates.append(partial(clients[block[0]].create_chat, users[1:], None, "group"))
                for j in block:
                    watch[j].update(u for u in users if u != clients[j].user)
        w = min(max(1, k), len(clients))
        for n, (user, _) in enumerate(self.gen.spec.churners):
            first = n * len(clients) // max(1, len(self.gen.spec.churners))
            watchers = [(first + m) % len(clients) for m in range(w)]
            others = [str(clients[j].user) for j in watchers[1:]]
            creates.append(
                partial(clients[watchers[0]].create_chat, [user, *others], None, "group")
            )
            for j in watchers:
                watch[j].add(user)
        await bounded(50, creates)
        out.presence_chats = len(creates)
        subs: list[Callable[[], Awaitable[list[dict[str, Any]]]]] = [
            partial(c.subscribe_presence, sorted(u))
            for c, u in zip(clients, watch, strict=True)
            if u
        ]
        states = await bounded(50, subs)
        out.presence_subscriptions = sum(len(s) for s in states)
        for c in clients:
            self.gen.consumers.append(asyncio.create_task(self._signals(c)))

    async def _signals(self, client: PigeonClient) -> None:
        gen = self.gen
        while True:
            frame = await client.next_signal()
            if isinstance(frame, PresenceFrame):
                gen.out.presence_events += 1
                if gen.win_start <= time.perf_counter_ns() < gen.win_end:
                    gen.out.presence_events_in_window += 1

    def start_churn(self) -> None:
        churners = self.gen.spec.churners
        for n, (_, token) in enumerate(churners):
            phase = self.p.presence_churn_period * n / len(churners)
            self.churn_tasks.append(asyncio.create_task(self._churn(token, phase)))

    async def stop_churn(self) -> None:
        """Let every churner finish its cycle (closing its connection); cancel stragglers."""
        self.stop.set()
        tasks, self.churn_tasks = self.churn_tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=40 + CLOSE_TIMEOUT)
        self.failures["churner stuck at the end"] += len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self.failures["churner stuck at the end"]:
            del self.failures["churner stuck at the end"]

    async def _pause(self, seconds: float) -> bool:
        """Pacing: wait `seconds` unless told to stop first; True once stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        return self.stop.is_set()

    async def _churn(self, token: str, phase: float) -> None:
        """Online half a period, offline at least the grace, until stopped."""
        online = self.p.presence_churn_period / 2
        offline = max(online, self.p.presence_grace + 0.25)
        if await self._pause(phase):  # stagger the churners over the period
            return
        while True:
            client = PigeonClient(self.gen.spec.url, token)
            try:
                await client.connect(timeout=30)
            except (ClientError, TimeoutError) as exc:
                self.failures[getattr(exc, "code", type(exc).__name__)] += 1
                if await self._pause(offline):  # retry at the next cycle
                    return
                continue
            drain = asyncio.create_task(self._drain(client))
            stopping = await self._pause(online)  # the time the churner stays online
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
            self.gen.out.churn_cycles += 1
            if stopping or await self._pause(offline):  # offline longer than the grace
                return

    @staticmethod
    async def _drain(client: PigeonClient) -> None:
        """Take inbox events (the group's chat_update) so the SDK acks them."""
        with contextlib.suppress(ClientError):
            async for _ in client.events():
                pass


async def generate(spec: Spec, gate: Gate) -> Outcome:
    """A generator: connect its pairs, wait for go, measure, drain, report."""
    gen = _Generator(spec)
    try:
        await gen.setup()
        await gate.ready({"pairs": len(gen.pairs), "setup_s": gen.out.setup_s})
        await gen.measure()
        await gen.drain()
    finally:
        with contextlib.suppress(Exception):
            await gen.close()
    return gen.out


async def _sample_server(
    handle: ServerHandle, p: Params
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each node's CPU % (of one core, summed over its processes) over the measured window and
    its RSS at the end of it; the CPU % of the PostgreSQL and Redis they share."""
    await asyncio.sleep(p.warmup)  # measurement timer, aligned with the generators' window
    t0, cpu0 = time.perf_counter(), [n.cpu_seconds() for n in handle.nodes]
    services0 = await handle.service_cpu()
    await asyncio.sleep(max(0.0, p.duration - (time.perf_counter() - t0)))
    t1, cpu1 = time.perf_counter(), [n.cpu_seconds() for n in handle.nodes]
    services = cpu_percent(services0, await handle.service_cpu(), t1 - t0)
    per_node = [
        {"cpu_percent_window": _percent(a, b, t1 - t0), "rss_kib_end_of_window": node.rss_kib()}
        for node, a, b in zip(handle.nodes, cpu0, cpu1, strict=True)
    ]
    return per_node, services


def _percent(cpu0: float | None, cpu1: float | None, seconds: float) -> float | None:
    """CPU % of one core between two readings of CPU seconds."""
    return None if cpu0 is None or cpu1 is None else round(100 * (cpu1 - cpu0) / seconds, 1)


def _pair_specs(accounts: list[Account], urls: list[str]) -> list[PairSpec]:
    """Consecutive accounts paired; pair k's sender on node k % N, receiver on (k + 1) % N."""
    n = len(urls)
    return [
        PairSpec(a.token, b.user, b.token, urls[k % n], urls[(k + 1) % n])
        for k, (a, b) in enumerate(zip(accounts[::2], accounts[1::2], strict=True))
    ]


async def run(
    handle: ServerHandle, p: Params, *, inline: bool = False, client_cpu: int | None = None
) -> dict[str, Any]:
    """Run the scenario against `handle`; returns the result document."""
    if p.devices < 2 or p.devices % 2:
        raise ValueError("--devices must be an even number >= 2")
    report = Run("one-to-one", asdict(p) | {"client_cpu": client_cpu})
    if not 0 <= p.presence_watchers <= 99:
        raise ValueError("--presence-watchers must be within 0..99 (a group holds 100)")
    accounts, accounts_s = await make_devices(handle.url, p.devices, 1)
    pairs = _pair_specs(accounts, handle.urls)
    slices = split(pairs, p.procs)
    churners: list[tuple[str, str]] = []
    if p.presence_churn > 0:
        extra, _ = await make_devices(handle.url, p.presence_churn, 1)
        churners = [(a.user, a.token) for a in extra]
    specs = [
        Spec(
            handle.url,
            s,
            p,
            rate=p.rate * len(s) / len(pairs) if p.rate else None,
            churners=churners[i :: len(slices)],
        )
        for i, s in enumerate(slices)
    ]
    gens = Generators(generate, specs, inline=inline, cpu=client_cpu)
    try:
        await gens.start()
        ready = await gens.wait_ready(120 + p.devices / 10)
        rss_before = handle.rss_kib()
        gens.go()
        sampler = asyncio.create_task(_sample_server(handle, p))
        outcomes = await gens.results(p.warmup + p.duration + p.drain_timeout + 120)
        per_node, services = await sampler
    finally:
        await gens.aclose()
    server_figures = {"rss_kib_before": rss_before, "services_cpu_percent_window": services}
    return _document(report, handle, p, outcomes, ready, accounts_s, server_figures, per_node)


def _document(
    report: Run,
    handle: ServerHandle,
    p: Params,
    outcomes: list[Outcome],
    ready: list[dict[str, Any]],
    accounts_s: float,
    server_figures: dict[str, Any],
    per_node: list[dict[str, Any]],
) -> dict[str, Any]:
    latency = latency_summary(s for o in outcomes for s in o.latency_ns)
    commit = latency_summary(s for o in outcomes for s in o.commit_ns)
    delivered = sum(o.delivered for o in outcomes)
    errors: Counter[str] = Counter()
    for o in outcomes:
        errors.update(o.send_errors)
        errors.update({f"consumer:{k}": v for k, v in o.consumer_errors.items()})
    totals = {
        k: sum(getattr(o, k) for o in outcomes)
        for k in ("committed_total", "received_total", "missing", "duplicates", "seq_gaps")
    }
    totals |= {
        k: sum(getattr(o, k) for o in outcomes)
        for k in ("reconnects", "skipped", "stuck_sends", "close_timeouts")
    }
    gen_cpu = [o.cpu_percent for o in outcomes]
    results = {
        "delivered_per_s": rate(delivered, p.duration),
        "delivered_in_window": delivered,
        "committed_per_s": rate(sum(o.committed for o in outcomes), p.duration),
        "latency": latency,
        "commit_latency": commit,
        **totals,
        "errors": dict(errors),
        "drained": all(o.drained for o in outcomes),
        "generator_cpu_percent": gen_cpu,
        "generator_setup_s": [r.get("setup_s") for r in ready],
        "accounts_setup_s": round(accounts_s, 2),
        "presence": _presence_results(p, outcomes),
        "cross_node": _cross_node_results(p, len(handle.nodes), outcomes),
    }
    if results["presence"]["churn_failures"]:
        report.problems.append(f"presence churn failures: {results['presence']['churn_failures']}")
    problems = ("missing", "duplicates", "seq_gaps", "reconnects", "skipped", "stuck_sends")
    for key in (*problems, "close_timeouts"):
        if totals[key]:
            report.problems.append(f"{key}: {totals[key]}")
    if errors:
        report.problems.append(f"errors: {dict(errors)}")
    if not results["drained"]:
        report.problems.append("receivers did not catch up with senders after the window")
    if any(c >= 90 for c in gen_cpu):
        report.problems.append(
            f"generator saturated (CPU {gen_cpu}%): figures are a lower bound of the server's"
        )
    server = server_section(
        handle,
        **server_figures,
        cpu_percent_window=_round(total([n["cpu_percent_window"] for n in per_node])),
        rss_kib_end_of_window=total([n["rss_kib_end_of_window"] for n in per_node]),
        per_node=per_node,
    )
    return report.finish(results=results, server=server)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _cross_node_results(p: Params, nodes: int, outcomes: list[Outcome]) -> dict[str, Any]:
    delivered = sum(o.cross_delivered for o in outcomes)
    return {
        "nodes": nodes,
        "pairs": sum(o.cross_pairs for o in outcomes),
        "delivered_in_window": delivered,
        "delivered_per_s": rate(delivered, p.duration),
        "latency": latency_summary(s for o in outcomes for s in o.cross_latency_ns),
    }


def _presence_results(p: Params, outcomes: list[Outcome]) -> dict[str, Any]:
    failures: Counter[str] = Counter()
    for o in outcomes:
        failures.update(o.churn_failures)
    in_window = sum(o.presence_events_in_window for o in outcomes)
    return {
        "watchers": p.presence_watchers,
        "churners": p.presence_churn,
        "subscriptions": sum(o.presence_subscriptions for o in outcomes),
        "chats": sum(o.presence_chats for o in outcomes),
        "churn_cycles": sum(o.churn_cycles for o in outcomes),
        "churn_failures": dict(failures),
        "events_received": sum(o.presence_events for o in outcomes),
        "events_in_window": in_window,
        "events_per_s": rate(in_window, p.duration),
    }


def summary(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human summary lines of a result document."""
    r, s, p = doc["results"], doc["server"], doc["params"]
    mode = f"open loop at {p['rate']} msg/s" if p["rate"] else f"{p['inflight']} in flight/pair"
    return [
        ("devices / mode", f"{p['devices']} devices, {mode}, {p['procs']} generator proc(s)"),
        ("delivered", f"{r['delivered_per_s']} msg/s over {p['duration']} s"),
        ("send->receive", fmt_latency(r["latency"])),
        ("send->committed", fmt_latency(r["commit_latency"])),
        *_cross_node_lines(r.get("cross_node"), s),
        ("lost / dup / gaps", f"{r['missing']} / {r['duplicates']} / {r['seq_gaps']}"),
        ("presence", _presence_line(r.get("presence"))),
        ("generator CPU %", r["generator_cpu_percent"]),
        (
            "server CPU % / RSS",
            f"{s.get('cpu_percent_window')} / {s.get('rss_kib_end_of_window')} KiB",
        ),
        *_services_line(s.get("services_cpu_percent_window")),
        ("load average", f"{doc['loadavg_start']} -> {doc['loadavg_end']}"),
    ]


def _services_line(cpu: dict[str, float] | None) -> list[tuple[str, Any]]:
    if not cpu:
        return []
    return [("services CPU %", ", ".join(f"{k} {v}" for k, v in cpu.items()))]


def _cross_node_lines(cn: dict[str, Any] | None, s: dict[str, Any]) -> list[tuple[str, Any]]:
    if not cn or cn["nodes"] <= 1:
        return []
    per_node = ", ".join(
        f"{n['cpu_percent_window']}% / {n['rss_kib_end_of_window']} KiB" for n in s["nodes"]
    )
    return [
        ("nodes", f"{cn['nodes']}: {cn['pairs']} pairs send across nodes"),
        ("cross-node delivery", fmt_latency(cn["latency"])),
        ("CPU % / RSS by node", per_node),
    ]


def _presence_line(pr: dict[str, Any] | None) -> str:
    if not pr or (not pr["watchers"] and not pr["churners"]):
        return "off"
    return (
        f"{pr['watchers']} watchers/device, {pr['subscriptions']} subscriptions,"
        f" {pr['churners']} churners ({pr['churn_cycles']} cycles),"
        f" {pr['events_per_s']} presence events/s in the window"
    )
