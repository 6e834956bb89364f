"""Contract of the Presence port (pigeon.ports.Presence), for every registry adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pigeon.adapters.presence.local import LocalPresence
from pigeon.domain.models import PresenceRecord
from pigeon.ports import Presence

REGISTRIES = ["local"]


@pytest.fixture(params=REGISTRIES)
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Presence]:
    r: Presence = LocalPresence()
    await r.open()
    yield r
    await r.aclose()


async def test_first_session_announces_and_last_one_leaves(registry: Presence) -> None:
    assert await registry.session_up("u", "s1")
    assert not await registry.session_up("u", "s2")  # already announced online
    assert not await registry.session_down("u", "s1", 10)  # s2 still live
    assert await registry.session_down("u", "s2", 20)
    assert await registry.lookup(["u"]) == {"u": PresenceRecord(online=True, last_seen=20)}
    assert await registry.confirm_offline("u") == PresenceRecord(online=False, last_seen=20)
    assert await registry.confirm_offline("u") is None  # announced once
    assert await registry.lookup(["u", "nobody"]) == {
        "u": PresenceRecord(online=False, last_seen=20)
    }


async def test_reconnect_within_grace_is_not_a_change(registry: Presence) -> None:
    assert await registry.session_up("u", "s1")
    assert await registry.session_down("u", "s1", 5)
    assert not await registry.session_up("u", "s2")  # never announced offline
    assert await registry.confirm_offline("u") is None  # grace timer fires: still online


async def test_unknown_sessions_are_ignored(registry: Presence) -> None:
    assert not await registry.session_down("u", "ghost", 1)
    await registry.session_up("u", "s1")
    assert not await registry.session_down("u", "ghost", 1)
    assert (await registry.lookup(["u"]))["u"].online
