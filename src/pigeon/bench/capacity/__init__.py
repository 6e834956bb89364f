"""`pigeon bench capacity`: what one message costs, per node count, for the capacity model
(docs/capacity.md).

For each node count (several `pigeon serve` processes on one shared store, the Redis bus and
presence), two workloads at a fixed rate well below saturation:

- `one_to_one`: pairs of devices in direct chats; pair k's sender on node k % n and its receiver
  on node (k + 1) % n, so with n > 1 every message crosses nodes (the worst case: the bus
  carries every delivery);
- `group`: one group of `members` users (one device each) spread round-robin over the nodes, a
  few of them sending in turn, so (n - 1) / n of the deliveries cross nodes.

Every device acks what it receives as the SDK does (`bench/acks.py`): a message within 5 ms,
receipts and chat updates on the device's next send or after 2 s (a read mark is never sent).
The load comes from this process (the raw WebSocket client of `bench/wire.py`, pinned to
`client_cpu`), the nodes are pinned to `server_cpu`.

Each workload runs a warm-up, drains, waits `settle` seconds (PostgreSQL publishes a busy
backend's statistics at most once a second and an idle one's within 10 s), takes a snapshot,
runs the measured phase, drains until every ack went out and no frame arrived for a moment,
snapshots what is read live (CPU from /proc, Redis INFO, each node's /metrics, the bytes this
process put on and read from the WebSockets), waits `settle` again and reads PostgreSQL's
statistics. Figures are the deltas divided by the messages of the phase (and, for the group, by
its deliveries). An idle window before the workloads gives what the cluster costs with nothing
to do (timers, presence refreshes), per second.

What is counted, and where from:
- CPU: user + system of every node's processes, of PostgreSQL's backends of the run's database
  and of the Redis server (`store.service_cpu`, /proc);
- store: the nodes' store calls by operation (`pigeon_store_operation_seconds_count`); on
  PostgreSQL transactions and rows from `pg_stat_database` and `pg_stat_user_tables` (statements
  would need `pg_stat_statements` preloaded, i.e. a restart); on DynamoDB the adapter's
  `pigeon_dynamodb_*` counters (capacity units by table and kind, calls by operation, retries,
  throttles) and, on the moto server the bench starts, the units DynamoDB would bill for the
  same requests (`BillingMeter`: moto's own are not DynamoDB's); SQLite cannot be counted from
  outside the process;
- Redis: `total_commands_processed`, `total_net_input_bytes`, `total_net_output_bytes` and the
  calls per command (INFO commandstats). The bench runs a private `redis-server` when it can
  (the shared one's counters include whoever else uses it);
- the client wire: bytes of WebSocket frames sent and received by the devices, headers included.

The parts: `params` (what is asked), `load` (the devices and their schedule), `probes` (the
counters read), `costs` (readings to figures), `phases` (the measured windows), `moto` (the
moto server and its billing meter), `runner` (a run from start to finish), `report` (the
printed tables).
"""

from pigeon.bench.capacity.moto import BillingMeter
from pigeon.bench.capacity.params import Backend, Params, parse_nodes
from pigeon.bench.capacity.report import table
from pigeon.bench.capacity.runner import run

__all__ = ["Backend", "BillingMeter", "Params", "parse_nodes", "run", "table"]
