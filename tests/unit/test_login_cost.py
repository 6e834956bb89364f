"""An unknown username costs a login the same argon2 work as a known one (no timing oracle),
on the service's own hashing threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from pigeon.adapters.bus.local import LocalBus
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.domain.errors import Unauthorized
from pigeon.domain.limits import Limits
from pigeon.services.accounts import AccountService
from pigeon.services.clock import SystemClock


class CountingHasher(PasswordHasher):
    """Real argon2; remembers which threads verified."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified_on: list[str] = []
        self.niceness: list[int] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified_on.append(threading.current_thread().name)
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().verify(hash, password)


async def test_unknown_and_known_usernames_cost_one_verification_each(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.db", synchronous="NORMAL")
    await store.open()
    hasher = CountingHasher()
    accounts = AccountService(store.accounts, LocalBus(), SystemClock(), Limits(), hasher)
    await accounts.register("known_user", "a good password")
    with pytest.raises(Unauthorized):
        await accounts.login("known_user", "a wrong password", "d")
    with pytest.raises(Unauthorized):
        await accounts.login("nobody_here", "a wrong password", "d")
    assert len(hasher.verified_on) == 2
    assert all(name.startswith("argon2") for name in hasher.verified_on)
    # below the event loop's priority: on a busy core, hashing yields to live traffic
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert all(nice > mine for nice in hasher.niceness)
    accounts.close()
    await store.aclose()
