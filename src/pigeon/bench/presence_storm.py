"""Scenario "presence-storm": many devices connect and disconnect in waves while others watch.

`churners` users with one device each churn; `subscribers` users with one device each watch
them. Subscriber i watches `watch` consecutive churners starting at i * churners / subscribers
(wrapping), so every churner has about subscribers * watch / churners watchers (10 with the
defaults). Presence is visible only to people sharing a chat, so each subscriber first creates
groups with the churners it watches, in chunks of at most `group_cap - 1` (the server's group
cap counts the creator), then subscribes to all of them.

A wave: every churner connects (`concurrency` connects in flight per generator); `hold` seconds
after the last connect returned, every churner closes; then the generator polls /healthz until
the server counts no churner connection, and waits `grace + settle` more. So each user's
disconnect->reconnect gap exceeds the server's offline grace: no transition is coalesced, and
every subscriber must see one `online` and one `offline` per wave for each user it watches.
Whatever is missing, twice, or cannot be matched to a transition is reported as a problem.

Delays use the wall clock (`time.time_ns`, comparable across the processes of one machine):
- online: from the churner's `await client.connect()` returning (its `ready` arrived) to the
  subscriber taking the `online` frame. The server announces online before it sends `ready`, so
  this can be negative; the delay from the start of the connect is reported too.
- offline: from the moment the churner called `close()` to the subscriber taking the `offline`
  frame, minus the grace (the server holds offline announcements back by design).

Events/s is every presence frame the subscribers received over the storm (first connect to last
frame), pauses between waves included; the busiest one-second bucket is reported too.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import aiohttp
import psutil

from pigeon.bench import clients as bench_clients
from pigeon.bench.accounts import bounded, make_devices
from pigeon.bench.clients import connect_all
from pigeon.bench.report import Run, fmt_latency, latency_summary, rate
from pigeon.bench.server import ServerHandle, server_section
from pigeon.bench.workers import Gate, Generators, split
from pigeon.client.client import ClientError, PigeonClient
from pigeon.domain.events import PresenceFrame

ONLINE, OFFLINE = 1, 0


@dataclass
class Params:
    churners: int = 2000
    subscribers: int = 200
    watch: int = 100
    waves: int = 5
    hold: float = 1.0
    settle: float = 1.0
    grace: float = 0.5
    group_cap: int = 100
    concurrency: int = 100
    procs: int = 1
    sub_procs: int = 1
    tail_timeout: float = 10.0
    drain_timeout: float = 120.0


@dataclass
class SubSpec:
    """One subscriber generator: (token, watched churner indices) per subscriber."""

    url: str
    first: int
    subs: list[tuple[str, list[int]]]
    users: list[str]
    group_size: int
    expected: int
    tail_timeout: float


@dataclass
class SubOutcome:
    """What one subscriber generator saw; events as parallel lists."""

    subscriptions: int = 0
    chats: int = 0
    initial: dict[str, int] = field(default_factory=dict)
    ev_sub: list[int] = field(default_factory=list)
    ev_user: list[int] = field(default_factory=list)
    ev_status: list[int] = field(default_factory=list)
    ev_ns: list[int] = field(default_factory=list)
    other_signals: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    close_timeouts: int = 0
    cpu_percent: float = 0.0
    setup_s: float = 0.0


@dataclass
class ChurnSpec:
    """One churn generator: (churner index, token) per churner."""

    url: str
    churners: list[tuple[int, str]]
    params: Params
    base_connections: int
    workers: int = 1


@dataclass
class ChurnOutcome:
    """Per wave and churner (in spec order): wall-clock ns, 0 where the step failed."""

    users: list[int] = field(default_factory=list)
    connect_start: list[list[int]] = field(default_factory=list)
    connect_done: list[list[int]] = field(default_factory=list)
    close_start: list[list[int]] = field(default_factory=list)
    close_done: list[list[int]] = field(default_factory=list)
    waves: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    close_timeouts: int = 0
    drain_timeouts: int = 0
    cpu_percent: float = 0.0


def watched_slices(churners: int, subscribers: int, watch: int) -> list[list[int]]:
    """Churner indices each subscriber watches: `watch` consecutive ones, evenly spread."""
    watch = min(watch, churners)
    return [
        [(i * churners // subscribers + k) % churners for k in range(watch)]
        for i in range(subscribers)
    ]


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """`items` in near-equal chunks of at most `size`."""
    parts = max(1, -(-len(items) // max(1, size)))
    return split(items, parts)


# -- subscribers ---------------------------------------------------------------------------


class _Watchers:
    """The state of one subscriber generator."""

    def __init__(self, spec: SubSpec) -> None:
        self.spec = spec
        self.index = {u: i for i, u in enumerate(spec.users)}
        self.out = SubOutcome()
        self.clients: list[PigeonClient] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.errors: Counter[str] = Counter()
        self.count = 0
        self.all_in = asyncio.Event()
        if spec.expected <= 0:
            self.all_in.set()

    async def setup(self) -> None:
        start = time.perf_counter()
        spec = self.spec
        self.clients = await connect_all(spec.url, [t for t, _ in spec.subs])
        for i, client in enumerate(self.clients):
            self.tasks.append(asyncio.create_task(self._drain(client)))
            self.tasks.append(asyncio.create_task(self._watch(spec.first + i, client)))
        jobs: list[Callable[[], Awaitable[dict[str, Any]]]] = []
        for i, (client, (_, watched)) in enumerate(zip(self.clients, spec.subs, strict=True)):
            for k, part in enumerate(chunks(watched, spec.group_size)):
                users = [spec.users[u] for u in part]
                name = f"presence {spec.first + i}/{k}"
                jobs.append(partial(client.create_chat, users, name, "group"))
        await bounded(50, jobs)
        self.out.chats = len(jobs)
        states = await bounded(
            50,
            [
                partial(c.subscribe_presence, [spec.users[u] for u in w])
                for c, (_, w) in zip(self.clients, spec.subs, strict=True)
            ],
        )
        initial: Counter[str] = Counter()
        for frames in states:
            initial.update(str(f.get("status")) for f in frames)
        self.out.initial = dict(initial)
        self.out.subscriptions = sum(len(f) for f in states)
        self.out.setup_s = round(time.perf_counter() - start, 2)

    async def _drain(self, client: PigeonClient) -> None:
        """Take inbox events (the groups' chat_update) so the SDK acks them."""
        try:
            async for _ in client.events():
                pass
        except ClientError as exc:
            self.errors[exc.code] += 1

    async def _watch(self, sub: int, client: PigeonClient) -> None:
        out = self.out
        while True:
            frame = await client.next_signal()
            now = time.time_ns()
            if not isinstance(frame, PresenceFrame) or frame.status not in ("online", "offline"):
                out.other_signals += 1
                continue
            user = self.index.get(frame.user)
            if user is None:
                out.other_signals += 1
                continue
            out.ev_sub.append(sub)
            out.ev_user.append(user)
            out.ev_status.append(ONLINE if frame.status == "online" else OFFLINE)
            out.ev_ns.append(now)
            self.count += 1
            if self.count >= self.spec.expected:
                self.all_in.set()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.out.close_timeouts = await bench_clients.close_all(self.clients)
        self.out.reconnects = sum(c.connects - 1 for c in self.clients)
        self.out.errors = dict(self.errors)


async def observe(spec: SubSpec, gate: Gate) -> SubOutcome:
    """A subscriber generator: connect, make the groups, subscribe; record until stopped."""
    gen = _Watchers(spec)
    try:
        await gen.setup()
        await gate.ready({"subscribers": len(spec.subs), "setup_s": gen.out.setup_s})
        proc = psutil.Process()
        cpu0, wall0 = sum(proc.cpu_times()[:2]), time.perf_counter()
        await gate.stopped()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gen.all_in.wait(), spec.tail_timeout)
        cpu1, wall1 = sum(proc.cpu_times()[:2]), time.perf_counter()
        gen.out.cpu_percent = round(100 * (cpu1 - cpu0) / max(wall1 - wall0, 1e-9), 1)
    finally:
        with contextlib.suppress(Exception):
            await gen.close()
    return gen.out


# -- churners ------------------------------------------------------------------------------


class _Churn:
    """The state of one churn generator."""

    def __init__(self, spec: ChurnSpec) -> None:
        self.spec = spec
        self.p = spec.params
        n, w = len(spec.churners), spec.params.waves
        self.out = ChurnOutcome(
            users=[u for u, _ in spec.churners],
            connect_start=[[0] * n for _ in range(w)],
            connect_done=[[0] * n for _ in range(w)],
            close_start=[[0] * n for _ in range(w)],
            close_done=[[0] * n for _ in range(w)],
        )
        self.failures: Counter[str] = Counter()
        self.health = ServerHandle(spec.url, None, workers=spec.workers)

    async def _connect(self, wave: int, i: int, token: str) -> PigeonClient | None:
        start = time.time_ns()
        client = PigeonClient(self.spec.url, token)
        try:
            await client.connect(timeout=60)
        except (ClientError, TimeoutError) as exc:
            self.failures[f"connect: {getattr(exc, 'code', type(exc).__name__)}"] += 1
            return None
        self.out.connect_done[wave][i] = time.time_ns()
        self.out.connect_start[wave][i] = start
        return client

    async def _close(self, wave: int, i: int, client: PigeonClient) -> bool:
        start = time.time_ns()
        mono = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.close(), bench_clients.CLOSE_TIMEOUT)
        self.out.close_start[wave][i] = start
        self.out.close_done[wave][i] = time.time_ns()
        return time.monotonic() - mono < bench_clients.CLOSE_TIMEOUT

    async def _drain(self, client: PigeonClient) -> None:
        """Take inbox events (chat_update of the groups) so the SDK acks them."""
        with contextlib.suppress(ClientError):
            async for _ in client.events():
                pass

    async def wave(self, wave: int) -> None:
        p, spec = self.p, self.spec
        t0 = time.perf_counter()
        jobs: list[Callable[[], Awaitable[PigeonClient | None]]] = [
            partial(self._connect, wave, i, tok) for i, (_, tok) in enumerate(spec.churners)
        ]
        clients = await bounded(p.concurrency, jobs)
        t1 = time.perf_counter()
        live = [(i, c) for i, c in enumerate(clients) if c is not None]
        drains = [asyncio.create_task(self._drain(c)) for _, c in live]
        await asyncio.sleep(p.hold)  # pacing: the time the churners stay online
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        self.out.reconnects += sum(c.connects - 1 for _, c in live)
        t2 = time.perf_counter()
        closed = await bounded(p.concurrency, [partial(self._close, wave, i, c) for i, c in live])
        self.out.close_timeouts += closed.count(False)
        t3 = time.perf_counter()
        seen = await self.health.wait_connections(spec.base_connections, p.drain_timeout)
        if seen != spec.base_connections:
            self.out.drain_timeouts += 1
        t4 = time.perf_counter()
        await asyncio.sleep(p.grace + p.settle)  # pacing: disconnect->reconnect gap > grace
        self.out.waves.append(
            {
                "connected": len(live),
                "connect_s": round(t1 - t0, 3),
                "close_s": round(t3 - t2, 3),
                "server_disconnects_s": round(t4 - t3, 3),
            }
        )


async def churn(spec: ChurnSpec, gate: Gate) -> ChurnOutcome:
    """A churn generator: wait for go, then run the waves."""
    gen = _Churn(spec)
    await gate.ready({"churners": len(spec.churners)})
    proc = psutil.Process()
    cpu0, wall0 = sum(proc.cpu_times()[:2]), time.perf_counter()
    for w in range(spec.params.waves):
        await gen.wave(w)
    cpu1, wall1 = sum(proc.cpu_times()[:2]), time.perf_counter()
    gen.out.cpu_percent = round(100 * (cpu1 - cpu0) / max(wall1 - wall0, 1e-9), 1)
    gen.out.failures = dict(gen.failures)
    return gen.out


# -- the scenario --------------------------------------------------------------------------


async def run(
    handle: ServerHandle, p: Params, *, inline: bool = False, client_cpu: int | None = None
) -> dict[str, Any]:
    """Run the scenario against `handle`; returns the result document."""
    if p.churners < 1 or p.subscribers < 1 or p.waves < 1 or p.watch < 1:
        raise ValueError("churners, subscribers, watch and waves must be >= 1")
    if p.group_cap < 2:
        raise ValueError("group_cap must be >= 2")
    report = Run("presence-storm", asdict(p) | {"client_cpu": client_cpu})
    start = time.perf_counter()
    churners, _ = await make_devices(handle.url, p.churners, 1)
    subscribers, _ = await make_devices(handle.url, p.subscribers, 1)
    accounts_s = time.perf_counter() - start
    users = [a.user for a in churners]
    watched = watched_slices(p.churners, p.subscribers, p.watch)
    sub_items = list(zip([a.token for a in subscribers], watched, strict=True))
    sub_specs, first = [], 0
    for part in split(sub_items, p.sub_procs):
        expected = 2 * p.waves * sum(len(w) for _, w in part)
        sub_specs.append(
            SubSpec(handle.url, first, part, users, p.group_cap - 1, expected, p.tail_timeout)
        )
        first += len(part)
    subs = Generators(observe, sub_specs, inline=inline, cpu=client_cpu)
    churn_gens: Generators[ChurnSpec, ChurnOutcome] | None = None
    sampler: asyncio.Task[None] | None = None
    samples: list[tuple[float, int, int | None]] = []
    try:
        await subs.start()
        sub_ready = await subs.wait_ready(300 + p.subscribers)
        base = await handle.connections()
        churn_specs = [
            ChurnSpec(handle.url, part, p, base, handle.nodes[0].workers)
            for part in split([(i, a.token) for i, a in enumerate(churners)], p.procs)
        ]
        churn_gens = Generators(churn, churn_specs, inline=inline, cpu=client_cpu)
        await churn_gens.start()
        await churn_gens.wait_ready(120)
        rss_before, cpu0, t0 = handle.rss_kib(), handle.cpu_seconds(), time.perf_counter()
        if handle.pid is not None:
            sampler = asyncio.create_task(_sample(handle, samples, t0))
        subs.go()
        churn_gens.go()
        per_wave = 2 * (p.hold + p.grace + p.settle) + 60 + p.churners / 20 + p.drain_timeout
        churned = await churn_gens.results(p.waves * per_wave)
        cpu1, t1 = handle.cpu_seconds(), time.perf_counter()
        if sampler is not None:
            sampler.cancel()
        subs.stop()
        watched_out = await subs.results(p.tail_timeout + 120)
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        await subs.aclose()
        if churn_gens is not None:
            await churn_gens.aclose()
    server_cpu = None if cpu0 is None or cpu1 is None else round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
    server = server_section(
        handle,
        rss_kib_before=rss_before,
        rss_kib_after=handle.rss_kib(),
        rss_kib_peak=handle.peak_rss_kib(),
        cpu_percent_storm=server_cpu,
        base_connections=base,
        rss_kib_idle_after_wave=_idle_rss(samples, base),
        samples_t_conns_rss=samples,
    )
    results = analyse(p, watched, churned, watched_out, report.problems)
    results["accounts_setup_s"] = round(accounts_s, 2)
    results["subscriber_setup_s"] = [r.get("setup_s") for r in sub_ready]
    return report.finish(results=results, server=server)


async def _sample(
    handle: ServerHandle, samples: list[tuple[float, int, int | None]], t0: float
) -> None:
    """Every half second: (seconds since go, server connections, server RSS KiB)."""
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
            conns = await handle.connections()
            samples.append((round(time.perf_counter() - t0, 2), conns, handle.rss_kib()))
        await asyncio.sleep(0.5)  # sampling period of an external process


def _idle_rss(samples: list[tuple[float, int, int | None]], base: int) -> list[int | None]:
    """The server's RSS at the first sample back at `base` connections after each wave."""
    out, busy = [], False
    for _, conns, rss in samples:
        if conns > base:
            busy = True
        elif conns == base and busy:
            out.append(rss)
            busy = False
    return out


class _Times:
    """One churner's successful transitions: wave numbers and their times, in wave order."""

    __slots__ = ("close_done", "close_start", "connect_done", "connect_start", "waves")

    def __init__(self) -> None:
        self.waves: list[int] = []
        self.connect_start: list[int] = []
        self.connect_done: list[int] = []
        self.close_start: list[int] = []
        self.close_done: list[int] = []


def _user_times(churners: int, churned: list[ChurnOutcome]) -> list[_Times]:
    times = [_Times() for _ in range(churners)]
    for o in churned:
        for w in range(len(o.connect_done)):
            for i, user in enumerate(o.users):
                if o.connect_done[w][i] and o.close_start[w][i]:
                    t = times[user]
                    t.waves.append(w)
                    t.connect_start.append(o.connect_start[w][i])
                    t.connect_done.append(o.connect_done[w][i])
                    t.close_start.append(o.close_start[w][i])
                    t.close_done.append(o.close_done[w][i])
    return times


def analyse(
    p: Params,
    watched: list[list[int]],
    churned: list[ChurnOutcome],
    seen: list[SubOutcome],
    problems: list[str],
) -> dict[str, Any]:
    """Match every frame to the transition it announces; delays, counts and problems."""
    times = _user_times(p.churners, churned)
    grace_ns = int(p.grace * 1e9)
    online_ready: list[int] = []
    online_start: list[int] = []
    offline: list[int] = []
    matched: set[tuple[int, int, int, int]] = set()
    duplicates = unexpected = 0
    first_ns = min((t.connect_start[0] for t in times if t.connect_start), default=0)
    last_ns = 0
    bursts: dict[tuple[int, int], list[int]] = {}  # (wave, status) -> [count, first, last]
    for o in seen:
        for sub, user, status, ns in zip(o.ev_sub, o.ev_user, o.ev_status, o.ev_ns, strict=True):
            t = times[user]
            starts = t.connect_start if status == ONLINE else t.close_start
            k = bisect.bisect_right(starts, ns) - 1
            if k < 0:
                unexpected += 1
                continue
            key = (sub, user, t.waves[k], status)
            if key in matched:
                duplicates += 1
                continue
            matched.add(key)
            last_ns = max(last_ns, ns)
            burst = bursts.setdefault((t.waves[k], status), [0, ns, ns])
            burst[0], burst[1], burst[2] = burst[0] + 1, min(burst[1], ns), max(burst[2], ns)
            if status == ONLINE:
                online_ready.append(ns - t.connect_done[k])
                online_start.append(ns - t.connect_start[k])
            else:
                offline.append(ns - t.close_start[k] - grace_ns)
    expected_each = sum(len(times[u].waves) for w in watched for u in w)
    got = {s: sum(1 for k in matched if k[3] == s) for s in (ONLINE, OFFLINE)}
    received = sum(len(o.ev_ns) for o in seen)
    storm_s = (last_ns - first_ns) / 1e9 if last_ns > first_ns else 0.0
    transitions = {
        name: {"expected": expected_each, "received": got[s], "missing": expected_each - got[s]}
        for name, s in (("online", ONLINE), ("offline", OFFLINE))
    }
    watchers = Counter(u for w in watched for u in w)
    burst_list = _bursts(bursts)
    failures: Counter[str] = Counter()
    for c in churned:
        failures.update(c.failures)
    gaps = [
        t.connect_start[k + 1] - t.close_done[k]
        for t in times
        for k in range(len(t.waves) - 1)
        if t.waves[k + 1] == t.waves[k] + 1
    ]
    results: dict[str, Any] = {
        "grace_s": p.grace,
        "transitions": transitions,
        "events_expected": 2 * expected_each,
        "events_received": received,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "other_signals": sum(o.other_signals for o in seen),
        "events_per_s": rate(received, storm_s),
        "events_per_s_peak_burst": max((b["events_per_s"] for b in burst_list), default=0.0),
        "bursts": burst_list,
        "storm_s": round(storm_s, 2),
        "online_delay": latency_summary(online_ready),
        "online_delay_from_connect_start": latency_summary(online_start),
        "online_before_ready": sum(1 for d in online_ready if d < 0),
        "offline_delay_minus_grace": latency_summary(offline),
        "connect_latency": latency_summary(
            d - s for t in times for s, d in zip(t.connect_start, t.connect_done, strict=True)
        ),
        "close_latency": latency_summary(
            d - s for t in times for s, d in zip(t.close_start, t.close_done, strict=True)
        ),
        "min_reconnect_gap_s": round(min(gaps) / 1e9, 3) if gaps else None,
        "watchers_per_churner": {
            "min": min((watchers[u] for u in range(p.churners)), default=0),
            "max": max(watchers.values(), default=0),
        },
        "subscriptions": sum(o.subscriptions for o in seen),
        "initial_states": dict(sum((Counter(o.initial) for o in seen), Counter())),
        "chats": sum(o.chats for o in seen),
        "waves": [c.waves for c in churned],
        "churn_failures": dict(failures),
        "churner_reconnects": sum(c.reconnects for c in churned),
        "subscriber_reconnects": sum(o.reconnects for o in seen),
        "close_timeouts": sum(c.close_timeouts for c in churned)
        + sum(o.close_timeouts for o in seen),
        "server_disconnect_timeouts": sum(c.drain_timeouts for c in churned),
        "subscriber_errors": dict(sum((Counter(o.errors) for o in seen), Counter())),
        "generator_cpu_percent": {
            "churn": [c.cpu_percent for c in churned],
            "subscribers": [o.cpu_percent for o in seen],
        },
    }
    _problems(p, results, problems)
    return results


def _bursts(bursts: dict[tuple[int, int], list[int]]) -> list[dict[str, Any]]:
    """Per wave and status: the frames and the span from the first to the last of them."""
    out = []
    for (wave, status), (count, first, last) in sorted(bursts.items()):
        span = (last - first) / 1e9
        out.append(
            {
                "wave": wave,
                "status": "online" if status == ONLINE else "offline",
                "events": count,
                "span_s": round(span, 3),
                "events_per_s": rate(count, span),
            }
        )
    return out


def _problems(p: Params, r: dict[str, Any], problems: list[str]) -> None:
    for name, t in r["transitions"].items():
        if t["missing"]:
            problems.append(f"{name} events missing: {t['missing']} of {t['expected']}")
    if r["subscriptions"] != p.subscribers * min(p.watch, p.churners):
        problems.append(f"only {r['subscriptions']} presence subscriptions were made")
    if r["watchers_per_churner"]["min"] == 0:
        problems.append("some churners have no watcher (raise --watch or --subscribers)")
    for key in (
        "duplicates",
        "unexpected",
        "churner_reconnects",
        "subscriber_reconnects",
        "close_timeouts",
        "server_disconnect_timeouts",
    ):
        if r[key]:
            problems.append(f"{key}: {r[key]}")
    for key in ("churn_failures", "subscriber_errors"):
        if r[key]:
            problems.append(f"{key}: {r[key]}")
    gap = r["min_reconnect_gap_s"]
    if gap is not None and gap <= p.grace:
        problems.append(f"a disconnect->reconnect gap ({gap} s) was within the grace")
    cpu = r["generator_cpu_percent"]
    if any(c >= 90 for c in [*cpu["churn"], *cpu["subscribers"]]):
        problems.append(f"generator saturated (CPU {cpu}%): delays include client-side queueing")


def summary(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human summary lines of a result document."""
    r, s, p = doc["results"], doc["server"], doc["params"]
    on, off = r["transitions"]["online"], r["transitions"]["offline"]
    w = r["watchers_per_churner"]
    return [
        (
            "churn / watch",
            f"{p['churners']} churners x {p['waves']} waves, {p['subscribers']} subscribers"
            f" watching {p['watch']} each ({w['min']}-{w['max']} watchers per churner)",
        ),
        ("server grace", f"{r['grace_s']} s"),
        (
            "events",
            f"{r['events_received']} received / {r['events_expected']} expected,"
            f" {r['events_per_s']} events/s over {r['storm_s']} s"
            f" (busiest burst {r['events_per_s_peak_burst']}/s)",
        ),
        ("online  exp/recv", f"{on['expected']} / {on['received']} (missing {on['missing']})"),
        ("offline exp/recv", f"{off['expected']} / {off['received']} (missing {off['missing']})"),
        ("online (ready->sub)", fmt_latency(r["online_delay"])),
        ("online (start->sub)", fmt_latency(r["online_delay_from_connect_start"])),
        ("online before ready", r["online_before_ready"]),
        ("offline (close->sub - grace)", fmt_latency(r["offline_delay_minus_grace"])),
        ("connect to ready", fmt_latency(r["connect_latency"])),
        ("close", fmt_latency(r["close_latency"])),
        ("generator CPU %", r["generator_cpu_percent"]),
        ("server CPU %", s.get("cpu_percent_storm")),
        (
            "server RSS KiB",
            f"before {s.get('rss_kib_before')}, peak {s.get('rss_kib_peak')},"
            f" after {s.get('rss_kib_after')}, idle after each wave"
            f" {s.get('rss_kib_idle_after_wave')}",
        ),
        ("load average", f"{doc['loadavg_start']} -> {doc['loadavg_end']}"),
    ]
