"""The bench's percentile and summary helpers (pure functions)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from pigeon.bench.report import Run, latency_summary, percentile, rate, write_result
from pigeon.bench.workers import split


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99.9) == 7
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_latency_summary_in_milliseconds() -> None:
    samples = [i * 1_000_000 for i in range(1000, 0, -1)]  # 1..1000 ms, unsorted
    s = latency_summary(samples)
    assert s["count"] == 1000
    assert (s["p50_ms"], s["p99_ms"], s["p999_ms"], s["max_ms"]) == (500, 990, 999, 1000)
    assert s["mean_ms"] == pytest.approx(500.5)
    empty = latency_summary([])
    assert empty["count"] == 0 and empty["p99_ms"] is None


def test_rate_and_split() -> None:
    assert rate(500, 2.0) == 250.0
    assert rate(5, 0.0) == 0.0
    assert split(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split(list(range(2)), 4) == [[0], [1]]


def test_result_document_written(tmp_path: Path) -> None:
    run = Run("demo", {"n": 1})
    run.problems.append("something odd")
    doc = run.finish(results={"x": 1})
    path = write_result(tmp_path, doc)
    assert path.name.startswith("demo-") and path.suffix == ".json"
    back = msgspec.json.decode(path.read_bytes())
    assert back["params"] == {"n": 1} and back["results"] == {"x": 1}
    assert back["problems"] == ["something odd"]
    assert len(back["loadavg_start"]) == 3 and back["machine"]["nproc"] >= 1
