"""Group commit of the PostgreSQL message path: how calls are gathered into batches, and who gets
which answer when a batch fails. The batches' SQL is tested on PostgreSQL (contract suite)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pigeon.adapters.store.postgres.batching import GroupCommit
from pigeon.domain.errors import BadRequest, Unavailable


class Runner:
    """Doubles each number; holds every batch until `release` is set; fails as told."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.arrivals: asyncio.Queue[list[int]] = asyncio.Queue()
        self.fail_on: int | None = None
        self.fail_with: Exception = BadRequest("bad element")

    async def __call__(self, batch: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(batch))
        self.started.set()
        self.arrivals.put_nowait(list(batch))
        await self.release.wait()
        if self.fail_on in batch:
            raise self.fail_with
        return [2 * n for n in batch]


async def test_a_lone_call_leaves_at_once() -> None:
    runner = Runner()
    runner.release.set()
    commit = GroupCommit(runner, max_inflight=1)
    assert await commit.call(21) == 42
    assert runner.batches == [[21]]


async def test_calls_made_while_batches_run_leave_together() -> None:
    runner = Runner()
    commit = GroupCommit(runner, max_inflight=1, max_batch=4)
    first = asyncio.ensure_future(commit.call(1))
    await asyncio.wait_for(runner.started.wait(), 5)
    rest = [asyncio.ensure_future(commit.call(n)) for n in range(2, 8)]
    await asyncio.sleep(0)
    assert runner.batches == [[1]]  # the others wait for the batch in flight
    runner.release.set()
    assert await asyncio.wait_for(asyncio.gather(first, *rest), 5) == [2 * n for n in range(1, 8)]
    assert runner.batches == [[1], [2, 3, 4, 5], [6, 7]]  # at most max_batch each, in order
    assert (commit.batches, commit.calls) == (3, 7)


async def test_a_failed_batch_is_run_again_one_by_one() -> None:
    runner = Runner()
    runner.fail_on = 3
    commit = GroupCommit(runner, max_inflight=1)
    first = asyncio.ensure_future(commit.call(1))
    await asyncio.wait_for(runner.started.wait(), 5)
    rest = [asyncio.ensure_future(commit.call(n)) for n in (2, 3, 4)]
    runner.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest, return_exceptions=True), 5)
    assert results[:2] == [2, 4] and results[3] == 8
    assert isinstance(results[2], BadRequest)  # only the bad one fails
    assert runner.batches == [[1], [2, 3, 4], [2], [3], [4]]


async def test_an_unavailable_store_fails_the_whole_batch_without_retries() -> None:
    runner = Runner()
    runner.fail_on = 3
    runner.fail_with = Unavailable("down")
    commit = GroupCommit(runner, max_inflight=1)
    first = asyncio.ensure_future(commit.call(1))
    await asyncio.wait_for(runner.started.wait(), 5)
    rest = [asyncio.ensure_future(commit.call(n)) for n in (2, 3)]
    runner.release.set()
    assert await first == 2
    for call in rest:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(call, 5)
    assert runner.batches == [[1], [2, 3]]


async def test_several_batches_run_at_once_up_to_the_limit() -> None:
    runner = Runner()
    commit = GroupCommit(runner, max_inflight=2, max_batch=64)
    calls = [asyncio.ensure_future(commit.call(n)) for n in range(5)]
    # the first call takes one slot, the second the other; the rest wait for a free one
    assert [await asyncio.wait_for(runner.arrivals.get(), 5) for _ in range(2)] == [[0], [1]]
    runner.release.set()
    assert await asyncio.wait_for(asyncio.gather(*calls), 5) == [0, 2, 4, 6, 8]
    assert runner.batches == [[0], [1], [2, 3, 4]]


class GatedRunner:
    """Doubles each number; holds each batch until that batch's gate (by start order) opens."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = [asyncio.Event() for _ in range(10)]
        self.arrivals: asyncio.Queue[list[int]] = asyncio.Queue()

    async def __call__(self, batch: Sequence[int]) -> list[int | BaseException]:
        gate = self.gates[len(self.batches)]
        self.batches.append(list(batch))
        self.arrivals.put_nowait(list(batch))
        await gate.wait()
        return [2 * n for n in batch]


async def test_a_keys_calls_never_overtake_a_batch_in_flight() -> None:
    runner = GatedRunner()
    commit = GroupCommit(runner, max_inflight=2, key=lambda n: n // 10)
    first = asyncio.ensure_future(commit.call(10))
    assert await asyncio.wait_for(runner.arrivals.get(), 5) == [10]
    later = [asyncio.ensure_future(commit.call(n)) for n in (11, 20, 12)]
    # 20 (another key) takes the free slot; 11 and 12 wait for the batch holding 10
    assert await asyncio.wait_for(runner.arrivals.get(), 5) == [20]
    runner.gates[1].set()
    assert await asyncio.wait_for(later[1], 5) == 40
    assert runner.batches == [[10], [20]]  # a slot is free, but 10 is still in flight
    runner.gates[0].set()
    runner.gates[2].set()
    assert await asyncio.wait_for(asyncio.gather(first, *later), 5) == [20, 22, 40, 24]
    assert runner.batches == [[10], [20], [11, 12]]  # together, in the order they were made


async def test_queued_calls_of_a_key_wait_once_one_of_them_is_in_flight() -> None:
    runner = GatedRunner()
    commit = GroupCommit(runner, max_inflight=2, max_batch=1, key=lambda n: n // 10)
    busy = [asyncio.ensure_future(commit.call(n)) for n in (0, 30)]  # both slots taken
    assert [await asyncio.wait_for(runner.arrivals.get(), 5) for _ in range(2)] == [[0], [30]]
    queued = [asyncio.ensure_future(commit.call(n)) for n in (10, 11, 20)]
    runner.gates[0].set()
    assert await asyncio.wait_for(runner.arrivals.get(), 5) == [10]
    runner.gates[1].set()
    # without keys the freed slot would take 11 beside 10 in flight: it takes 20
    assert await asyncio.wait_for(runner.arrivals.get(), 5) == [20]
    for gate in runner.gates:
        gate.set()
    assert await asyncio.wait_for(asyncio.gather(*busy, *queued), 5) == [0, 60, 20, 22, 40]
    assert runner.batches == [[0], [30], [10], [20], [11]]


async def test_keys_take_turns_and_a_full_batch_leaves_the_rest_of_a_key_for_its_turn() -> None:
    runner = GatedRunner()
    commit = GroupCommit(runner, max_inflight=1, max_batch=3, key=lambda n: n // 10)
    first = asyncio.ensure_future(commit.call(0))
    assert await asyncio.wait_for(runner.arrivals.get(), 5) == [0]
    calls = (10, 11, 12, 13, 14, 20, 1)
    queued = [asyncio.ensure_future(commit.call(n)) for n in calls]
    for gate in runner.gates:
        gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *queued), 5)
    assert answers == [2 * n for n in (0, *calls)]
    # key 1 came up first and filled a batch; key 2 and key 0 had their turns before the rest
    # of key 1, which kept its order
    assert runner.batches == [[0], [10, 11, 12], [20, 1, 13], [14]]
