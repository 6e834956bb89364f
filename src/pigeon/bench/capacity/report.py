"""The printed summary of a `pigeon bench capacity` result: one table per workload (a column
per node count, a row per figure), then the idle cluster's cost per second. The result file
holds everything; this is what a reader compares at a glance."""

from __future__ import annotations

from typing import Any

_ROWS: list[tuple[str, str | tuple[str, ...], int]] = [
    ("node CPU, µs", "node_cpu_us", 0),
    ("PostgreSQL CPU, µs", "postgres_cpu_us", 0),
    ("Redis CPU, µs", "redis_cpu_us", 0),
    ("store server CPU, µs", "store_server_cpu_us", 0),
    ("store calls (node side)", "store_calls", 2),
    ("PG transactions", "pg_transactions", 2),
    ("PG rows ins / upd / del", ("pg_rows_inserted", "pg_rows_updated", "pg_rows_deleted"), 1),
    ("PG rows read", "pg_rows_read", 1),
    ("PG index scans", "pg_index_scans", 1),
    ("DynamoDB RCU / WCU reported", ("dynamodb_rcu", "dynamodb_wcu"), 2),
    ("DynamoDB RCU / WCU billed", ("dynamodb_billed_rcu", "dynamodb_billed_wcu"), 2),
    ("DynamoDB calls", "dynamodb_calls", 2),
    ("DynamoDB bytes stored", "dynamodb_stored_bytes", 0),
    ("Redis commands", "redis_commands", 2),
    ("Redis bytes in / out", ("redis_bytes_in", "redis_bytes_out"), 0),
    ("bus frames published", "bus_frames", 2),
    ("wire bytes sent / received", ("wire_bytes_sent", "wire_bytes_received"), 0),
]


_WIDTH = 24


def _cell(figures: dict[str, Any], key: str | tuple[str, ...], digits: int) -> str | None:
    keys = (key,) if isinstance(key, str) else key
    values = [figures.get(k) for k in keys]
    if all(v is None for v in values):
        return None
    return " / ".join("-" if v is None else f"{v:,.{digits}f}" for v in values)


def _row(label: str, cells: list[str | None]) -> str:
    return f"  {label:<32}" + "".join(f"{c or '-':>{_WIDTH}}" for c in cells)


def _workload_lines(name: str, phases: list[tuple[int, dict[str, Any]]]) -> list[str]:
    title = "1:1, per delivered message"
    if name == "group":
        fan = phases[0][1]["expected_deliveries"] // max(1, phases[0][1]["messages"])
        title = f"group of {fan + 1}, per group message ({fan} deliveries)"
    lines = [f"{title:<34}" + "".join(f"{f'{n} node(s)':>{_WIDTH}}" for n, _ in phases)]
    for label, key, digits in _ROWS:
        cells = [_cell(ph["per_message"], key, digits) for _, ph in phases]
        if any(c is not None for c in cells):
            lines.append(_row(label, cells))
    net = ("node_cpu_us", "postgres_cpu_us")
    lines.append(
        _row(
            "net of idle: node / PG CPU, µs",
            [_cell(ph.get("net_per_message", {}), net, 0) for _, ph in phases],
        )
    )
    billed = ("dynamodb_billed_rcu", "dynamodb_billed_wcu")
    cells = [_cell(ph.get("net_per_message", {}), billed, 2) for _, ph in phases]
    if any(c is not None for c in cells):
        lines.append(_row("net of idle: RCU / WCU billed", cells))
    if name == "group":
        cells = [_cell(ph.get("per_delivery", {}), "node_cpu_us", 0) for _, ph in phases]
        lines.append(_row("node CPU per delivery, µs", cells))
    facts = [f"{ph['achieved_per_s']:.0f}/s {_ms(ph)} ms {ph['lost']}" for _, ph in phases]
    lines.append(_row("rate, p99, lost", list(facts)))
    lines.append(_row("load average (1 min)", [f"{ph['load'][0]:.2f}" for _, ph in phases]))
    return lines


def table(doc: dict[str, Any]) -> list[str]:
    """Per message (1:1) and per group message, one column per node count."""
    lines = []
    for name in ("one_to_one", "group"):
        phases = [(r["nodes"], r[name]) for r in doc["results"] if name in r]
        if phases:
            lines += _workload_lines(name, phases)
    idle = [r["idle"]["per_second"] for r in doc["results"]]
    lines.append("idle cluster, per second")
    for label, key, unit in (
        ("node CPU", "node_cpu_us", " µs"),
        ("Redis commands", "redis_commands", ""),
        ("PG transactions", "pg_transactions", ""),
    ):
        if any(i.get(key) is not None for i in idle):
            lines.append(_row(label, [f"{i.get(key) or 0:,.1f}{unit}" for i in idle]))
    return lines


def _ms(phase: dict[str, Any]) -> str:
    p99 = phase["latency_ms"].get("p99_ms")
    return "-" if p99 is None else f"{p99:.1f}"
