"""`Readiness` (gateway/http.py): probes run concurrently, each within the timeout; a flood of
checks shares one round of probes; a failing probe is named, and logged once per outage."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from pigeon.domain.errors import Unavailable
from pigeon.gateway.http import Readiness


class Probe:
    """A backend that answers after `delay` seconds, or raises, counting its probes."""

    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay = delay
        self.error = error
        self.calls = 0
        self.called = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        self.called.set()
        await asyncio.sleep(self.delay)  # the backend's latency
        if self.error is not None:
            raise self.error


async def test_probes_run_concurrently_within_the_timeout() -> None:
    store, bus, presence = Probe(0.2), Probe(0.2), Probe(5.0)  # the registry hangs
    readiness = Readiness({"store": store, "bus": bus, "presence": presence}, timeout=0.3)
    started = time.monotonic()
    assert await readiness.failed() == ["presence"]
    assert time.monotonic() - started < 0.6  # not 0.2 + 0.2 + 0.3


async def test_a_flood_shares_one_round_and_its_result_for_a_moment() -> None:
    store = Probe(0.1)
    readiness = Readiness({"store": store}, timeout=1.0, ttl=30.0)
    answers = await asyncio.gather(*(readiness.failed() for _ in range(200)))
    assert answers == [[]] * 200
    assert await readiness.failed() == []  # within the ttl: the last round's answer
    assert store.calls == 1


async def test_a_new_round_after_the_ttl() -> None:
    store = Probe()
    readiness = Readiness({"store": store}, timeout=1.0, ttl=0.0)
    await readiness.failed()
    await readiness.failed()
    assert store.calls == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_round() -> None:
    store = Probe(0.2)
    readiness = Readiness({"store": store}, timeout=1.0, ttl=30.0)
    impatient = asyncio.ensure_future(readiness.failed())
    await store.called.wait()
    impatient.cancel()
    assert await readiness.failed() == []
    assert store.calls == 1


async def test_a_failure_is_named_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    store = Probe(error=Unavailable("store unavailable: ConnectionRefusedError"))
    readiness = Readiness({"store": store, "bus": Probe()}, timeout=1.0, ttl=0.0)
    with caplog.at_level(logging.INFO, logger="pigeon.gateway.http"):
        assert await readiness.failed() == ["store"]
        assert await readiness.failed() == ["store"]
        store.error = None
        assert await readiness.failed() == []
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "not ready: the store failed its probe: store unavailable: ConnectionRefusedError",
        "the store answers its probe again",
    ]


async def test_aclose_cancels_a_round_in_flight() -> None:
    store = Probe(30.0)
    readiness = Readiness({"store": store}, timeout=60.0)
    waiting = asyncio.ensure_future(readiness.failed())
    await store.called.wait()
    await readiness.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting
