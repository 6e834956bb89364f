"""The measured windows of `pigeon bench capacity`: a workload's phase (warm-up, drain,
settle, measure, drain, settle) and the idle window, each ending in its figures.

The order of readings is what makes the figures mean what the doc says (PostgreSQL publishes a
backend's statistics late, so it is read a settle after the live counters); it lives here,
apart from the load and the counters.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pigeon.bench.capacity.costs import costs, net_of_idle
from pigeon.bench.capacity.load import Generator, Sender
from pigeon.bench.capacity.params import Params
from pigeon.bench.capacity.probes import Probe
from pigeon.bench.report import latency_summary, loadavg


async def phase(
    gen: Generator,
    probe: Probe,
    senders: list[Sender],
    rate: float,
    p: Params,
    name: str,
    idle: dict[str, float | None],
) -> dict[str, Any]:
    """Warm-up, settle, measured phase, drain, settle: the phase's figures, also net of what
    the `idle` cluster spends per second."""
    gen.reset()
    await gen.offer(senders, rate, p.warmup)
    warm_drained = await gen.drain(p.drain_timeout)
    await asyncio.sleep(p.settle)  # PostgreSQL publishes its idle backends' statistics
    pg0 = await probe.pg()
    gen.reset()
    live0, load = await probe.live(gen.wire), loadavg()
    await gen.offer(senders, rate, p.duration)
    drained = await gen.drain(p.drain_timeout)
    live1 = await probe.live(gen.wire)
    await asyncio.sleep(p.settle)
    pg1 = await probe.pg()
    fanout = senders[0].fanout
    result: dict[str, Any] = {
        "workload": name,
        "offered_per_s": rate,
        "achieved_per_s": round(gen.committed / p.duration, 1),
        "messages": gen.committed,
        "deliveries": gen.received,
        "expected_deliveries": gen.committed * fanout,
        "lost": max(0, gen.committed * fanout - gen.received),
        "errors": gen.errors,
        "drained": drained and warm_drained,
        "latency_ms": latency_summary(gen.samples),
        "load": load,
    }
    result |= costs(live0, live1, pg0, pg1, gen.committed)
    result["net_per_message"] = net_of_idle(
        result["per_message"], idle, result["seconds"], p.settle, gen.committed
    )
    if fanout > 1 and gen.received:
        result["per_delivery"] = {
            k: None if v is None else round(v * gen.committed / gen.received, 3)
            for k, v in result["per_message"].items()
        }
    return result


async def idle(gen: Generator, probe: Probe, p: Params) -> dict[str, Any]:
    """What the connected cluster costs per second with no traffic."""
    await asyncio.sleep(p.settle)
    pg0 = await probe.pg()
    live0 = await probe.live(gen.wire)
    await asyncio.sleep(p.idle)  # the idle window itself
    live1 = await probe.live(gen.wire)
    await asyncio.sleep(p.settle)
    pg1 = await probe.pg()
    figures = costs(live0, live1, pg0, pg1, 1)
    seconds = figures["seconds"]
    per_s = {
        k: None if v is None else round(v / seconds, 3)
        for k, v in figures["per_message"].items()
        if not k.startswith("pg_") and not k.startswith("wire_")
    }
    # PostgreSQL's window is longer (a settle more): per second of that one
    pg_seconds = seconds + p.settle
    per_s |= {
        k: round(v / pg_seconds, 3)
        for k, v in figures["per_message"].items()
        if k.startswith("pg_") and v is not None
    }
    return {"seconds": seconds, "per_second": per_s, "detail_total": figures["detail"]}
