"""From two readings of the counters to the figures of `pigeon bench capacity`: the deltas per
message (CPU, store calls, PostgreSQL rows, DynamoDB units, Redis, wire), the detail behind
them, and the same net of what an idle cluster spends in the same time.

Pure arithmetic on `probes.Live` and PostgreSQL readings, apart from the reading itself so the
meaning of every figure sits in one place.
"""

from __future__ import annotations

from typing import Any

from pigeon.bench.capacity.probes import BILLED, SERIES_PREFIX, STORED, Live
from pigeon.bench.store import cpu_percent

#: The figures an idle cluster moves, hence the ones given net of idle.
_NET = (
    "node_cpu_us",
    "postgres_cpu_us",
    "redis_cpu_us",
    "store_calls",
    "redis_commands",
    "pg_transactions",
    "dynamodb_calls",
    "dynamodb_billed_rcu",
    "dynamodb_billed_wcu",
)


def costs(
    before: Live,
    after: Live,
    pg_before: dict[str, float],
    pg_after: dict[str, float],
    count: int,
) -> dict[str, Any]:
    """The deltas between two readings, per message (`count` of them), and in detail."""
    seconds = after.at - before.at
    per = 1.0 / count if count else 0.0
    series = _delta(after.series, before.series)
    pg = _delta(pg_after, pg_before)
    redis = _delta(after.redis, before.redis)
    figures = _live_figures(before, after, redis, series, seconds, per)
    if pg_before:
        figures |= _pg_figures(pg, per)
    dynamo = {k: v for k, v in series.items() if k.startswith(SERIES_PREFIX)}
    if dynamo:
        figures |= _dynamodb_figures(dynamo, per)
    return {
        "seconds": round(seconds, 3),
        "per_message": {k: None if v is None else round(v, 3) for k, v in figures.items()},
        "detail": {
            "redis_calls": _per(_prefixed(redis, "calls."), per),
            "metrics": _per(series, per),
            "pg_writes_by_table": _per(_prefixed(pg, "writes."), per),
            "pg": _per({k: v for k, v in pg.items() if "." not in k}, per),
        },
    }


def _live_figures(
    before: Live,
    after: Live,
    redis: dict[str, float],
    series: dict[str, float],
    seconds: float,
    per: float,
) -> dict[str, float | None]:
    cpu = {
        name: pct / 100 * seconds * 1e6 * per
        for name, pct in cpu_percent(before.services, after.services, seconds).items()
    }
    node_cpu = (
        None
        if before.node_cpu is None or after.node_cpu is None
        else (after.node_cpu - before.node_cpu) * 1e6 * per
    )
    return {
        "node_cpu_us": node_cpu,
        "postgres_cpu_us": cpu.get("postgres"),
        "redis_cpu_us": cpu.get("redis"),
        "store_server_cpu_us": cpu.get("store_server"),
        "store_calls": _sum(series, "pigeon_store_operation_seconds_count") * per,
        "bus_frames": _sum(series, "pigeon_bus_published_frames") * per,
        "redis_commands": _per_or_none(after.redis, redis, "total_commands_processed", per),
        "redis_bytes_in": _per_or_none(after.redis, redis, "total_net_input_bytes", per),
        "redis_bytes_out": _per_or_none(after.redis, redis, "total_net_output_bytes", per),
        "wire_bytes_sent": (after.wire_sent - before.wire_sent) * per,
        "wire_bytes_received": (after.wire_received - before.wire_received) * per,
    }


def _pg_figures(pg: dict[str, float], per: float) -> dict[str, float | None]:
    return {
        "pg_transactions": (pg.get("xact_commit", 0.0) + pg.get("xact_rollback", 0.0)) * per,
        "pg_rows_inserted": pg.get("n_tup_ins", 0.0) * per,
        "pg_rows_updated": pg.get("n_tup_upd", 0.0) * per,
        "pg_rows_deleted": pg.get("n_tup_del", 0.0) * per,
        "pg_rows_read": (pg.get("tup_returned", 0.0) + pg.get("tup_fetched", 0.0)) * per,
        "pg_index_scans": pg.get("idx_scan", 0.0) * per,
        "pg_seq_scans": pg.get("seq_scan", 0.0) * per,
    }


def _dynamodb_figures(dynamo: dict[str, float], per: float) -> dict[str, float | None]:
    return {
        "dynamodb_rcu": _sum(_labelled(dynamo, "capacity_units", "kind=read"), "") * per,
        "dynamodb_wcu": _sum(_labelled(dynamo, "capacity_units", "kind=write"), "") * per,
        "dynamodb_billed_rcu": _sum(_labelled(dynamo, BILLED, "kind=read"), "") * per,
        "dynamodb_billed_wcu": _sum(_labelled(dynamo, BILLED, "kind=write"), "") * per,
        "dynamodb_stored_bytes": _sum(dynamo, STORED) * per,
        "dynamodb_calls": _sum(dynamo, "pigeon_dynamodb_calls") * per,
        "dynamodb_retries": _sum(dynamo, "pigeon_dynamodb_retries") * per,
        "dynamodb_throttled": _sum(dynamo, "pigeon_dynamodb_throttled") * per,
    }


def net_of_idle(
    per_message: dict[str, float | None],
    idle_per_s: dict[str, float | None],
    seconds: float,
    settle: float,
    count: int,
) -> dict[str, float]:
    """`per_message` less what the idle cluster spends in the same time (PostgreSQL's window
    is a settle longer), for the figures an idle cluster moves."""
    out = {}
    for key in _NET:
        value, idle = per_message.get(key), idle_per_s.get(key)
        if value is None or idle is None or not count:
            continue
        window = seconds + settle if key.startswith("pg_") else seconds
        out[key] = round(value - idle * window / count, 3)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def _sum(delta: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in delta.items() if k.startswith(prefix))


def _prefixed(values: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}


def _per_or_none(
    read: dict[str, float], delta: dict[str, float], key: str, per: float
) -> float | None:
    """`delta[key] * per`, None when nothing was read (no such service)."""
    return delta.get(key, 0.0) * per if read else None


def _labelled(series: dict[str, float], name: str, label: str) -> dict[str, float]:
    return {k: v for k, v in series.items() if name in k and label in k}


def _per(values: dict[str, float], per: float) -> dict[str, float]:
    return {k: round(v * per, 4) for k, v in sorted(values.items(), key=lambda kv: -kv[1])}
