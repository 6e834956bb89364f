"""Prometheus counters of what a node asked of DynamoDB, read from `DynamoDb.capacity`.

Why it exists: DynamoDB bills (and throttles) by capacity units, so the capacity model of the
store (docs/architecture.md) and an operator's dashboards need the units each node consumed,
per table and kind, beside the calls, retries and throttles behind them. The adapter already
adds them up on the event loop (`Capacity`, db.py); this collector turns those sums into
counters when `/metrics` is read, so the data path pays nothing more:

- `pigeon_dynamodb_capacity_units_total{table,kind}`: units DynamoDB reported as consumed,
  `kind` = `read` or `write`, `table` without the deployment's prefix (`inbox`, `messages`);
- `pigeon_dynamodb_calls_total{op}`: answered data and control calls by client operation
  (`transact_write_items`, `get_item`...);
- `pigeon_dynamodb_retries_total`: attempts sent again after a throttle or a transient error;
- `pigeon_dynamodb_throttled_total`: throttles (and conflicts) DynamoDB answered.

One process's counts: `pigeon serve --workers` does not run on this store (each worker would
need a multiprocess counter).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from pigeon.adapters.store.dynamodb.db import Capacity


class CapacityCollector(Collector):
    """Exports a `Capacity` at each scrape. `prefix` is the deployment's table prefix, left
    out of the `table` label."""

    def __init__(self, capacity: Capacity, prefix: str) -> None:
        self._capacity = capacity
        self._prefix = prefix

    def collect(self) -> Iterable[Metric]:
        c = self._capacity
        units = CounterMetricFamily(
            "pigeon_dynamodb_capacity_units",
            "Capacity units DynamoDB reported as consumed, by table and kind (read, write).",
            labels=["table", "kind"],
        )
        for (table, kind), value in sorted(c.units_by_kind.items()):
            units.add_metric([table.removeprefix(self._prefix), kind], value)
        calls = CounterMetricFamily(
            "pigeon_dynamodb_calls", "DynamoDB calls answered, by operation.", labels=["op"]
        )
        for op, n in sorted(c.calls.items()):
            calls.add_metric([op], n)
        yield units
        yield calls
        yield CounterMetricFamily(
            "pigeon_dynamodb_retries",
            "DynamoDB attempts sent again after a throttle or a transient failure.",
            value=c.retries,
        )
        yield CounterMetricFamily(
            "pigeon_dynamodb_throttled",
            "DynamoDB throttles and transaction conflicts (each retried while attempts last).",
            value=c.throttled,
        )
