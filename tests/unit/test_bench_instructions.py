"""`pigeon bench instructions`: the workload it counts, and the count itself under callgrind."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from pigeon.bench import instructions


async def test_the_workload_delivers_and_acks_every_message(tmp_path: Path) -> None:
    delivered = await instructions.drive(tmp_path / "s.db", 3, 2, 10, "NORMAL")
    assert delivered == 6
    with sqlite3.connect(tmp_path / "s.db") as conn:
        # every message acked by its recipient (body erased), every receipt by its sender
        assert conn.execute("SELECT count(*), count(raw) FROM messages").fetchone() == (6, 0)
        assert conn.execute("SELECT count(*) FROM inbox").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM receipt_log").fetchone() == (6,)


def test_without_valgrind_it_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with nothing on it
    with pytest.raises(instructions.NoValgrind, match="apt-get install valgrind"):
        instructions.count(instructions.Params(pairs=1, short=1, long=2))


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_callgrind_counts_the_difference_between_two_runs() -> None:
    p = instructions.Params(pairs=2, short=1, long=3, size=10, synchronous="NORMAL")
    result = instructions.count(p)
    assert result.messages == 4
    assert result.long_instructions > result.short_instructions
    assert result.per_message == (result.long_instructions - result.short_instructions) // 4
    assert 100_000 < result.per_message < 10_000_000  # a message is ~0.8M today
