"""Figures and results: percentiles, machine facts, the JSON result file and the human summary.

Kept free of I/O except `write_result`/`print_summary` so the maths can be unit-tested alone.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

PERCENTILES = (50.0, 99.0, 99.9)
N = TypeVar("N", int, float)


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} outside 0..100")
    rank = max(1, math.ceil(round(p * len(sorted_values) / 100.0, 9)))  # no float fuzz
    return sorted_values[rank - 1]


def latency_summary(samples_ns: Iterable[int]) -> dict[str, Any]:
    """count, mean, p50, p99, p99.9 and max in milliseconds of nanosecond latency samples."""
    values = sorted(samples_ns)
    out: dict[str, Any] = {"count": len(values)}
    if not values:
        return out | {"mean_ms": None, "p50_ms": None, "p99_ms": None, "p999_ms": None}
    ms = [v / 1e6 for v in values]
    out["mean_ms"] = round(sum(ms) / len(ms), 3)
    for p in PERCENTILES:
        key = "p" + f"{p:g}".replace(".", "") + "_ms"
        value = percentile(ms, p)
        out[key] = None if value is None else round(value, 3)
    out["max_ms"] = round(ms[-1], 3)
    return out


def rate(count: int, seconds: float) -> float:
    """Events per second, 0 when no time passed."""
    return round(count / seconds, 1) if seconds > 0 else 0.0


def total(values: Sequence[N | None]) -> N | None:
    """The sum of figures, None when one is unknown (e.g. a remote server's RSS)."""
    known = [v for v in values if v is not None]
    return sum(known) if len(known) == len(values) else None


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, memory, Python, kernel."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        import psutil

        info["memory_total_mib"] = psutil.virtual_memory().total // (1024 * 1024)
    except ImportError:  # pragma: no cover - psutil is a dependency
        pass
    return info


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


class Run:
    """One scenario's result document, started when the scenario starts."""

    def __init__(self, scenario: str, params: dict[str, Any]) -> None:
        self.scenario = scenario
        self.started = time.time()
        self.doc: dict[str, Any] = {
            "scenario": scenario,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "params": params,
            "machine": machine_info(),
            "loadavg_start": loadavg(),
        }
        self.problems: list[str] = []

    def finish(self, **sections: Any) -> dict[str, Any]:
        """Close the document: end load average, wall time, the given sections, problems."""
        self.doc.update(sections)
        self.doc["loadavg_end"] = loadavg()
        self.doc["wall_s"] = round(time.time() - self.started, 2)
        self.doc["problems"] = self.problems
        return self.doc


def result_path(out_dir: Path, scenario: str, at: float | None = None) -> Path:
    """`<out_dir>/<scenario>-<YYYYmmdd-HHMMSS>.json`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(at if at is not None else time.time()))
    return out_dir / f"{scenario}-{stamp}.json"


def write_result(out_dir: Path, doc: dict[str, Any]) -> Path:
    """Write the document as indented JSON; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(out_dir, str(doc["scenario"]))
    path.write_bytes(msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n")
    return path


def print_summary(title: str, lines: Iterable[tuple[str, Any]], problems: Sequence[str]) -> None:
    """A short aligned summary on stdout."""
    rows = list(lines)
    width = max((len(k) for k, _ in rows), default=0)
    print(f"== {title}")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")


def fmt_latency(summary: dict[str, Any]) -> str:
    """`p50 / p99 / p99.9 ms` of a `latency_summary`."""
    if not summary.get("count"):
        return "no samples"
    return (
        f"p50 {summary['p50_ms']:.2f}  p99 {summary['p99_ms']:.2f}  "
        f"p99.9 {summary['p999_ms']:.2f}  max {summary['max_ms']:.2f} ms "
        f"(n={summary['count']})"
    )
