"""The Store contract suite runs against every adapter listed here (PostgreSQL joins later)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.ports import Store

ADAPTERS = ["sqlite"]


@pytest.fixture(params=ADAPTERS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, open store of each adapter."""
    if request.param == "sqlite":
        s: Store = SqliteStore(tmp_path / "contract.db", synchronous="NORMAL")
    else:  # pragma: no cover - extended by later adapters
        raise AssertionError(request.param)
    await s.open()
    yield s
    await s.aclose()
