"""What a `pigeon bench capacity` run is asked to do: the store, the node counts, the two
workloads' sizes and rates, the phases' lengths. Shared by the CLI and every part of the run."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class Backend(enum.StrEnum):
    """The store the nodes share (`sqlite`: one node only, no bus)."""

    sqlite = "sqlite"
    postgres = "postgres"
    dynamodb = "dynamodb"


@dataclass
class Params:
    store: Backend = Backend.postgres
    nodes: list[int] = field(default_factory=lambda: [1, 2, 4])
    #: 1:1 messages per second offered (open loop), in all.
    rate: float = 200.0
    #: Group messages per second offered (each to `members - 1` devices).
    group_rate: float = 4.0
    pairs: int = 50
    members: int = 100
    duration: float = 15.0
    warmup: float = 3.0
    #: Seconds with nothing to do, measured before the workloads.
    idle: float = 5.0
    size: int = 100
    #: Seconds to wait before reading PostgreSQL's statistics (it publishes an idle backend's
    #: within 10 s).
    settle: float = 11.0
    drain_timeout: float = 30.0
    server_cpu: int | None = None
    client_cpu: int | None = None
    data_dir: Path | None = None
    server_env: dict[str, str] = field(default_factory=dict)
    #: None: a private `redis-server` when installed, else $PIGEON_BENCH_REDIS_URL.
    redis_url: str | None = None
    #: None: a moto server spawned by the bench (DynamoDB only).
    dynamodb_endpoint: str | None = None


def describe(p: Params) -> dict[str, Any]:
    """`p` as the result file's `params` (JSON types only)."""
    params = asdict(p)
    params["store"] = str(p.store)
    params["data_dir"] = None if p.data_dir is None else str(p.data_dir)
    return params


def parse_nodes(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4] (each at least 1)."""
    nodes = [int(x) for x in text.split(",") if x.strip()]
    if not nodes or min(nodes) < 1:
        raise ValueError(f"--nodes wants positive counts like 1,2,4, got {text!r}")
    return nodes
