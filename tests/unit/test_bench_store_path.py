"""`pigeon bench store-path`: its shapes, its runs and what it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pigeon.bench import store_path
from pigeon.bench.cli import bench_app


def test_a_shape_is_pairs_x_messages_per_ack() -> None:
    assert store_path.Shape.parse(" 8x10") == store_path.Shape(8, 10)
    for bad in ("8", "8x", "x1", "0x1", "8x0", "8*1", "-1x2"):
        with pytest.raises(ValueError, match=r"8x1|at least 1"):
            store_path.Shape.parse(bad)


def test_the_long_run_delivers_about_the_messages_asked_and_the_short_a_fifth() -> None:
    assert store_path.rounds_for(store_path.Shape(10, 2), 6000) == (60, 300)
    assert store_path.rounds_for(store_path.Shape(100, 100), 6000) == (1, 5)  # at least 5


def test_it_reports_the_messages_between_its_runs_and_their_cpu(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench_app,
        ["store-path", "--shapes", "2x1,2x3", "--messages", "300", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    [path] = tmp_path.glob("store-path-*.json")
    rows = json.loads(path.read_text())["results"]
    # 2x1: 150 rounds against 30, 2 messages each; 2x3: 50 rounds against 10, 6 each
    expected = [(2, 1, 240), (2, 3, 240)]
    assert [(r["pairs"], r["per_ack"], r["messages"]) for r in rows] == expected
    # the CPU clock ticks coarsely: 240 messages (~0.1 s of CPU) are well above a tick
    assert all(r["user_us"] + r["system_us"] > 0 for r in rows)
    assert "per ack" in result.output


def test_a_malformed_shape_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench_app, ["store-path", "--shapes", "8x1,eight", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "PAIRSxPER_ACK" in result.output
    assert not list(tmp_path.iterdir())
