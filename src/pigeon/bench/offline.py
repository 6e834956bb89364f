"""Scenario "offline": a backlog for a device that is away, then its catch-up on connect.

A recipient device is logged in but not connected. A sender sends `count` messages to it with
`inflight` sends outstanding; phase one ends when every send was answered `sent` (durably
committed). Then the recipient connects and consumes its inbox; phase two ends when it has taken
every message. It checks they come in chat order (seq 1, 2, 3...) with nothing missing and
nothing twice, and reports every violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from pigeon.bench.accounts import make_devices
from pigeon.bench.clients import close_all
from pigeon.bench.report import Run, fmt_latency, latency_summary, rate
from pigeon.bench.server import ServerHandle, server_section
from pigeon.bench.workers import Gate, Generators
from pigeon.client.client import ClientError, PigeonClient
from pigeon.domain.events import Message

INDEX_DIGITS = 9


@dataclass
class Params:
    count: int = 10_000
    inflight: int = 200
    size: int = 64
    timeout: float = 300.0


@dataclass
class Spec:
    url: str
    sender_token: str
    recipient_user: str
    recipient_token: str
    params: Params


@dataclass
class Outcome:
    stored: int = 0
    store_s: float = 0.0
    commit_ns: list[int] = field(default_factory=list)
    send_errors: dict[str, int] = field(default_factory=dict)
    connect_s: float = 0.0
    first_message_s: float | None = None
    drain_s: float = 0.0
    received: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    missing: int = 0
    unexpected: int = 0
    timed_out: bool = False
    store_timed_out: bool = False
    close_timeouts: int = 0
    reconnects: int = 0


def _body(index: int, size: int) -> str:
    head = f"{index:0{INDEX_DIGITS}d}"
    return head + "x" * max(0, size - len(head))


async def _drain_events(client: PigeonClient) -> None:
    """Consume (and so ack) whatever the sender receives: receipts."""
    with contextlib.suppress(ClientError):
        async for _ in client.events():
            pass


async def _store(sender: PigeonClient, chat: str, p: Params, out: Outcome) -> set[int]:
    """Phase one: send every message; returns the indices the server committed."""
    indices = iter(range(p.count))
    stored: set[int] = set()
    errors: Counter[str] = Counter()

    async def worker() -> None:
        for i in indices:
            t = time.perf_counter_ns()
            try:
                await sender.send(chat, _body(i, p.size))
            except ClientError as exc:
                errors[exc.code] += 1
                continue
            out.commit_ns.append(time.perf_counter_ns() - t)
            stored.add(i)

    start = time.perf_counter()
    try:
        async with asyncio.timeout(p.timeout):
            await asyncio.gather(*(worker() for _ in range(min(p.inflight, p.count))))
    except TimeoutError:
        out.store_timed_out = True
    out.store_s = time.perf_counter() - start
    out.stored = len(stored)
    out.send_errors = dict(errors)
    return stored


async def _receive(spec: Spec, expected: set[int], out: Outcome) -> None:
    """Phase two: connect the recipient and take every message, checking order and duplicates."""
    seen: set[int] = set()
    last_seq = 0
    start = time.perf_counter()
    client = PigeonClient(spec.url, spec.recipient_token)
    await client.connect(timeout=60)
    out.connect_s = time.perf_counter() - start
    deadline = start + spec.params.timeout
    try:
        while len(seen) < len(expected):
            event = await client.next_event(max(0.001, deadline - time.perf_counter()))
            if not isinstance(event, Message):
                continue
            if out.first_message_s is None:
                out.first_message_s = time.perf_counter() - start
            index = int((event.body or "-1")[:INDEX_DIGITS])
            if event.seq != last_seq + 1:
                out.out_of_order += 1
            last_seq = max(last_seq, event.seq)
            if index in seen:
                out.duplicates += 1
            elif index not in expected:
                out.unexpected += 1
            else:
                seen.add(index)
        out.drain_s = time.perf_counter() - start
    except TimeoutError:
        out.timed_out = True
        out.drain_s = time.perf_counter() - start
    finally:
        out.received = len(seen)
        out.missing = len(expected - seen)
        out.reconnects = client.connects - 1
        out.close_timeouts += await close_all([client])


async def generate(spec: Spec, gate: Gate) -> Outcome:
    """The generator: sender connects and creates the chat, then (on go) both phases."""
    out = Outcome()
    sender = PigeonClient(spec.url, spec.sender_token)
    await sender.connect(timeout=60)
    drainer = asyncio.create_task(_drain_events(sender))
    try:
        chat = str((await sender.create_chat([spec.recipient_user]))["id"])
        await gate.ready({})
        stored = await _store(sender, chat, spec.params, out)
        await _receive(spec, stored, out)
    finally:
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer
        out.close_timeouts += await close_all([sender])
    return out


async def run(
    handle: ServerHandle, p: Params, *, inline: bool = False, client_cpu: int | None = None
) -> dict[str, Any]:
    """Run the scenario against `handle`; returns the result document."""
    report = Run("offline", asdict(p) | {"client_cpu": client_cpu})
    (sender, recipient), _ = await make_devices(handle.url, 2, 1)
    spec = Spec(handle.url, sender.token, recipient.user, recipient.token, p)
    gens = Generators(generate, [spec], inline=inline, cpu=client_cpu)
    try:
        await gens.start()
        await gens.wait_ready(120)
        rss_before = handle.rss_kib()
        gens.go()
        (o,) = await gens.results(2 * p.timeout + 120)
    finally:
        await gens.aclose()
    results = {
        "stored": o.stored,
        "store_s": round(o.store_s, 3),
        "store_per_s": rate(o.stored, o.store_s),
        "commit_latency": latency_summary(o.commit_ns),
        "send_errors": o.send_errors,
        "connect_s": round(o.connect_s, 3),
        "first_message_s": None if o.first_message_s is None else round(o.first_message_s, 3),
        "drain_s": round(o.drain_s, 3),
        "drain_per_s": rate(o.received, o.drain_s),
        "received": o.received,
        "out_of_order": o.out_of_order,
        "duplicates": o.duplicates,
        "missing": o.missing,
        "unexpected": o.unexpected,
        "timed_out": o.timed_out,
        "recipient_reconnects": o.reconnects,
        "close_timeouts": o.close_timeouts,
    }
    checks = ("out_of_order", "duplicates", "missing", "unexpected", "recipient_reconnects")
    for key in (*checks, "close_timeouts"):
        if results[key]:
            report.problems.append(f"{key}: {results[key]}")
    if o.stored < p.count:
        report.problems.append(f"only {o.stored} of {p.count} sends committed: {o.send_errors}")
    if o.store_timed_out:
        report.problems.append(f"sends were still unanswered after {p.timeout} s")
    if o.timed_out:
        report.problems.append(f"recipient did not get every message within {p.timeout} s")
    server = server_section(
        handle,
        rss_kib_before=rss_before,
        rss_kib_after=handle.rss_kib(),
        rss_kib_peak=handle.peak_rss_kib(),
    )
    return report.finish(results=results, server=server)


def summary(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human summary lines of a result document."""
    r, s = doc["results"], doc["server"]
    return [
        ("stored", f"{r['stored']} msgs in {r['store_s']} s ({r['store_per_s']} msg/s)"),
        ("send->committed", fmt_latency(r["commit_latency"])),
        (
            "drained",
            f"{r['received']} msgs in {r['drain_s']} s ({r['drain_per_s']} msg/s),"
            f" connect {r['connect_s']} s, first message {r['first_message_s']} s",
        ),
        ("order / dup / missing", f"{r['out_of_order']} / {r['duplicates']} / {r['missing']}"),
        ("server RSS", f"{s.get('rss_kib_before')} -> {s.get('rss_kib_after')} KiB"),
        ("load average", f"{doc['loadavg_start']} -> {doc['loadavg_end']}"),
    ]
