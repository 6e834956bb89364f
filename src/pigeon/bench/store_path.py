"""`pigeon bench store-path`: CPU per delivered message on the SQLite store path, by how many
jobs share a commit and how many messages an ack covers.

Why: at moderate load a message is acked on its own and a commit carries a few jobs; at
saturation an ack covers the sends in flight and commits carry hundreds. What the store costs
in each shape, with no sockets, gateway or services, is the floor under what the server can
cost per message (docs/architecture.md, "Seventh round"). CPU time, unlike callgrind's
instructions (`pigeon bench instructions`), includes the kernel's part: WAL writes, `fdatasync`,
the writer thread's hand-offs.

The workload is `instructions.drive`: each round, every one of `pairs` senders sends `per_ack`
messages at once, every recipient acks them, every sender acks its receipt; so a round's jobs of
one kind reach the writer together, about `pairs` per commit. Two runs on fresh stores, of a
short and a long number of rounds, in this process (all its threads counted, by
`getrusage`); their difference divided by the messages between them leaves out the set-up.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pigeon.bench.instructions import drive
from pigeon.bench.workers import run_loop
from pigeon.cli import tune_gc
from pigeon.config import Settings


@dataclass(frozen=True)
class Shape:
    """`pairs` chats (about the jobs per commit), `per_ack` messages covered by each ack."""

    pairs: int
    per_ack: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """`PAIRSxPER_ACK`, e.g. `8x1`."""
        pairs, sep, per_ack = text.strip().partition("x")
        if not sep or not pairs.isdigit() or not per_ack.isdigit():
            raise ValueError(f"a shape is PAIRSxPER_ACK, e.g. 8x1, not {text!r}")
        shape = cls(int(pairs), int(per_ack))
        if shape.pairs < 1 or shape.per_ack < 1:
            raise ValueError(f"pairs and messages per ack must be at least 1: {text!r}")
        return shape


@dataclass(frozen=True)
class Row:
    """One shape's CPU per message (µs), user and system, over `messages` messages."""

    pairs: int
    per_ack: int
    messages: int
    user_us: float
    system_us: float

    @property
    def cpu_us(self) -> float:
        return self.user_us + self.system_us


def rounds_for(shape: Shape, messages: int) -> tuple[int, int]:
    """Short and long rounds: the long run delivers about `messages`, the short a fifth."""
    long = max(5, messages // (shape.pairs * shape.per_ack))
    return long // 5, long


def measure(shape: Shape, messages: int = 6000, size: int = 100, sync: str = "FULL") -> Row:
    """Both runs of one shape, and the CPU per message between them."""
    short, long = rounds_for(shape, messages)
    with _collected_as_served():
        _run(shape, 1, size, sync)  # warm-up: imports, the first statements' compilation
        user0, system0, delivered0 = _run(shape, short, size, sync)
        user1, system1, delivered1 = _run(shape, long, size, sync)
    n = delivered1 - delivered0
    return Row(
        shape.pairs, shape.per_ack, n, (user1 - user0) / n * 1e6, (system1 - system0) / n * 1e6
    )


@contextlib.contextmanager
def _collected_as_served() -> Iterator[None]:
    """The garbage collector's thresholds of `pigeon serve` (its defaults), and what exists
    before the runs left out of collections, as the server leaves its start-up: the store's
    cost as the server pays it, not the command-line process's."""
    fields = Settings.model_fields
    before = gc.get_threshold()
    tune_gc(fields["gc_threshold"].default, fields["gc_threshold_gen1"].default)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _run(shape: Shape, rounds: int, size: int, sync: str) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory(prefix="pigeon-store-path-") as tmp:
        before = resource.getrusage(resource.RUSAGE_SELF)
        delivered = run_loop(  # on uvloop, as the server
            drive(Path(tmp) / "store.db", shape.pairs, rounds, size, sync, shape.per_ack)
        )
        after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, delivered


def table(rows: list[Row]) -> list[str]:
    """Lines for the console."""
    lines = [f"{'pairs':>6} {'per ack':>8} {'messages':>9} {'cpu µs':>8} {'user':>7} {'sys':>7}"]
    for r in rows:
        lines.append(
            f"{r.pairs:>6} {r.per_ack:>8} {r.messages:>9} {r.cpu_us:>8.1f}"
            f" {r.user_us:>7.1f} {r.system_us:>7.1f}"
        )
    return lines
