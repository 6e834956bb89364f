"""The counters `pigeon bench capacity` reads: CPU from /proc, Redis INFO, the nodes' /metrics
(and the bench's moto meter), PostgreSQL's statistics views.

Each reading is a snapshot of cumulative counters; `costs.py` turns two of them into figures.
Kept apart because each source has its own client and its own caveats: what is counted where,
and why (statements are not: `pg_stat_statements` would need a restart).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import aiohttp
import asyncpg
import msgspec
import psutil
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from pigeon.bench.capacity.load import WireBytes
from pigeon.bench.server import ServerHandle
from pigeon.bench.store import CpuSample, service_cpu

#: /metrics series kept (summed over nodes): store calls by operation, DynamoDB counters, bus.
SERIES = ("pigeon_store_operation_seconds_count", "pigeon_bus_published_frames")
SERIES_PREFIX = "pigeon_dynamodb_"
#: Units the bench's moto computed as DynamoDB would bill them (`BillingMeter`).
BILLED = "pigeon_dynamodb_billed_units"
STORED = "pigeon_dynamodb_stored_bytes"


@dataclass
class Live:
    """What can be read at any moment: CPU, Redis, the nodes' /metrics, the wire."""

    at: float
    node_cpu: float | None
    services: CpuSample
    redis: dict[str, float]
    series: dict[str, float]
    wire_sent: int
    wire_received: int


class Probe:
    """Reads the counters of one cluster and of the services it shares."""

    def __init__(
        self,
        handle: ServerHandle,
        redis: str | None,
        database: str | None,
        extra: list[int],
        billing: str | None = None,
    ) -> None:
        self.handle = handle
        self.redis_url = redis  # None: the nodes use no Redis (SQLite)
        self.database = database
        self.extra_pids = extra  # e.g. moto's server
        self.billing = billing  # the bench's moto: its `BillingMeter`

    async def live(self, wire: WireBytes) -> Live:
        services: CpuSample = await service_cpu(self.database or "", self.redis_url or "")
        if self.database is None:
            services.pop("postgres", None)
        for pid in self.extra_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = psutil.Process(pid).cpu_times()
                services.setdefault("store_server", {})[pid] = float(t.user + t.system)
        return Live(
            at=time.perf_counter(),
            node_cpu=self.handle.cpu_seconds(),
            services=services,
            redis=await redis_counters(self.redis_url) if self.redis_url else {},
            series=await self._series(),
            wire_sent=wire.sent,
            wire_received=wire.received,
        )

    async def _series(self) -> dict[str, float]:
        out: dict[str, float] = {}
        async with aiohttp.ClientSession() as http:
            for url in self.handle.urls:
                async with http.get(f"{url}/metrics") as resp:
                    text = await resp.text()
                for key, value in metric_samples(text).items():
                    out[key] = out.get(key, 0.0) + value
            if self.billing is not None:
                async with http.get(self.billing) as resp:
                    units: dict[str, float] = await resp.json()
                for key, value in units.items():
                    table, kind = key.rsplit(",", 1)
                    table = table.partition("_")[2] or table  # the run's prefix left out
                    name = STORED if kind == "bytes" else BILLED
                    out[f"{name}{{kind={kind},table={table}}}"] = value
        return out

    async def pg(self) -> dict[str, float]:
        """PostgreSQL's statistics of the run's database (empty when not on PostgreSQL)."""
        if self.database is None:
            return {}
        return await pg_counters(self.database)


def metric_samples(text: str) -> dict[str, float]:
    """The kept samples of a Prometheus exposition: `name{labels}` -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name.startswith(SERIES_PREFIX) or name.startswith(SERIES):
                if name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{name}{{{labels}}}"] = float(sample.value)
    return out


async def redis_counters(url: str) -> dict[str, float]:
    """Commands, network bytes and calls per command, from INFO."""
    client = aioredis.from_url(url)
    try:
        info = await client.info("all")
    finally:
        await client.aclose()
    out = {
        key: float(info[key])
        for key in ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes")
    }
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            out[f"calls.{key.removeprefix('cmdstat_')}"] = float(value.get("calls", 0))
    return out


_PG_QUERY = """
SELECT d.xact_commit, d.xact_rollback, d.tup_returned, d.tup_fetched, d.tup_inserted,
       d.tup_updated, d.tup_deleted, d.blks_read, d.blks_hit,
       t.seq_scan, t.idx_scan, t.n_tup_ins, t.n_tup_upd, t.n_tup_hot_upd, t.n_tup_del, t.per_table
FROM pg_stat_database d,
     (SELECT coalesce(sum(seq_scan), 0) AS seq_scan, coalesce(sum(idx_scan), 0) AS idx_scan,
             coalesce(sum(n_tup_ins), 0) AS n_tup_ins, coalesce(sum(n_tup_upd), 0) AS n_tup_upd,
             coalesce(sum(n_tup_hot_upd), 0) AS n_tup_hot_upd,
             coalesce(sum(n_tup_del), 0) AS n_tup_del,
             coalesce(json_object_agg(relname, n_tup_ins + n_tup_upd + n_tup_del), '{}')::text
               AS per_table
      FROM pg_stat_user_tables) t
WHERE d.datname = current_database()
"""


async def pg_counters(dsn: str) -> dict[str, float]:
    """Transactions, rows and scans of the database (one statement: one transaction of its
    own, counted in the next reading)."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(_PG_QUERY)
    finally:
        await conn.close()
    assert row is not None
    out = {key: float(value) for key, value in row.items() if key != "per_table"}
    for table, writes in msgspec.json.decode(row["per_table"]).items():
        out[f"writes.{table}"] = float(writes)
    return out
