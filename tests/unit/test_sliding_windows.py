"""The in-process sliding-window counters, on a hand-moved clock: what passes, what waits, and
that waiting the time they say is enough."""

from __future__ import annotations

import pytest

from pigeon.adapters.ratelimit import local
from pigeon.adapters.ratelimit.local import SlidingWindows
from pigeon.domain.limits import Rate


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_window_fills_then_slides() -> None:
    clock = Clock()
    windows = SlidingWindows(clock)
    rate = Rate(10, 10)
    assert [windows.hit(rate, "k") for _ in range(10)] == [None] * 10
    wait = windows.hit(rate, "k")
    assert wait is not None and 0 < wait <= 20
    clock.t += wait + 0.001
    assert windows.hit(rate, "k") is None  # the wait it said was enough
    assert windows.hit(rate, "other") is None


def test_the_previous_window_counts_by_its_remaining_weight() -> None:
    clock = Clock()  # 1000.0: the start of a 10 s window
    windows = SlidingWindows(clock)
    rate = Rate(10, 10)
    for _ in range(10):
        windows.hit(rate, "k")
    clock.t += 10 + 5  # half way into the next window: the old count weighs 10 * 0.5 = 5
    assert [windows.hit(rate, "k") for _ in range(5)] == [None] * 5
    wait = windows.hit(rate, "k")
    assert wait is not None
    clock.t += wait + 0.001
    assert windows.hit(rate, "k") is None


def test_costs_count_in_units() -> None:
    windows = SlidingWindows(Clock())
    rate = Rate(1000, 60)
    assert windows.hit(rate, "b", 600) is None
    assert windows.hit(rate, "b", 600) is not None  # refused: nothing counted
    assert windows.hit(rate, "b", 400) is None
    assert windows.hit(rate, "b", 2000) == 60.0  # can never fit: a whole period


def test_dead_counters_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_SWEEP_AT", 3)
    clock = Clock()
    windows = SlidingWindows(clock)
    rate = Rate(5, 1)
    for key in ("a", "b", "c"):
        windows.hit(rate, key)
    clock.t += 5  # every counter is two windows old
    windows.hit(rate, "d")
    assert len(windows._counts) == 1


def test_live_counters_are_not_rescanned_for_every_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Long windows keep many counters alive: a sweep that frees nothing waits until the live
    counters double, instead of scanning them all again for the next new counter."""
    monkeypatch.setattr(local, "_SWEEP_AT", 3)
    windows = SlidingWindows(Clock())
    sweeps = []
    sweep = windows._sweep
    monkeypatch.setattr(windows, "_sweep", lambda now: sweeps.append(now) or sweep(now))
    rate = Rate(5, 3600)
    for i in range(12):
        windows.hit(rate, f"k{i}")
    assert len(windows._counts) == 12
    assert len(sweeps) == 2  # at 3 live counters, then at 6 (the next would be at 12)
