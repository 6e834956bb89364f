"""The key directory's abuse limits (`Throttle.key_uploads`, `key_queries`, `key_claims`) on the
in-process counters and a hand-moved clock: what each rule counts, that the defaults let a
normal client through (a full group's claims, from every device of a user), and that claims
over a target's limit leave that target out instead of failing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pigeon.adapters.ratelimit.local import SlidingWindows
from pigeon.domain.errors import RateLimited
from pigeon.domain.limits import Rate, RateRules, Spend
from pigeon.domain.models import Device
from pigeon.ports import RateLimiter
from pigeon.services.throttle import Throttle


class ManualLimiter:
    """The `RateLimiter` port over the in-process counters, on a clock the test moves."""

    def __init__(self) -> None:
        self.t = 1_000_000.0  # the start of a minute and of an hour
        self._windows = SlidingWindows(lambda: self.t)

    async def hit(
        self, rate: Rate, key: str, cost: int = 1, *, deferred: bool = False
    ) -> float | None:
        return self._windows.hit(rate, key, cost)

    async def hit_all(self, spends: Sequence[Spend], *, deferred: bool = False) -> float | None:
        return self._windows.hit_all(spends)

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


_check: type[RateLimiter] = ManualLimiter


def device(user: str, name: str) -> Device:
    return Device(id=f"{user}-{name}", user_id=user, name=name, created_at=0)


def targets(n: int, owner: str = "peer") -> list[str]:
    return [f"{owner}-{i}" for i in range(n)]


async def test_uploads_and_queries_count_calls_per_device() -> None:
    limiter = ManualLimiter()
    rules = RateRules(key_uploads_per_device=Rate(2, 60), key_queries_per_device=Rate(3, 60))
    throttle = Throttle(limiter, rules)
    phone = device("alice", "phone")
    for _ in range(2):
        await throttle.key_uploads(phone.id)
    with pytest.raises(RateLimited) as err:
        await throttle.key_uploads(phone.id)
    assert "key uploads" in str(err.value) and 0 < err.value.retry_after <= 120
    for _ in range(3):  # a rule of its own: uploads spent none of it
        await throttle.key_queries(phone.id)
    with pytest.raises(RateLimited):
        await throttle.key_queries(phone.id)
    await throttle.key_uploads(device("alice", "laptop").id)  # per device
    limiter.t += err.value.retry_after + 0.001
    await throttle.key_uploads(phone.id)  # the wait it said was enough


async def test_the_defaults_let_a_normal_client_through() -> None:
    """A new device uploads its keys, then each of a user's three devices claims a key of
    every other device of a full group (100 members, 3 devices each) in the same minute, and
    queries every member once."""
    throttle = Throttle(ManualLimiter(), RateRules())
    group = targets(99 * 3)
    for name in ("phone", "laptop", "tablet"):
        mine = device("alice", name)
        for _ in range(2):  # the counts, then the upload, as the SDK does when it connects
            await throttle.key_uploads(mine.id)
        others = [f"alice-{n}" for n in ("phone", "laptop", "tablet") if n != name]
        for _ in range(99):
            await throttle.key_queries(mine.id)  # a sender it does not know yet
        claim = group + others
        assert await throttle.key_claims(mine, claim) == claim


async def test_claims_count_keys_per_device_and_per_user() -> None:
    rules = RateRules(key_claims_per_device=Rate(10, 60), key_claims_per_user=Rate(15, 60))
    throttle = Throttle(ManualLimiter(), rules)
    phone, laptop = device("alice", "phone"), device("alice", "laptop")
    assert await throttle.key_claims(phone, targets(8)) == targets(8)
    with pytest.raises(RateLimited) as err:  # 8 + 3 keys > 10 for this device
        await throttle.key_claims(phone, targets(3, "carol"))
    assert "per device" in str(err.value) and "per user" in str(err.value)
    # the refused claim spent nothing of the user's budget: 7 more fit (15 - 8), not 4
    assert await throttle.key_claims(laptop, targets(7, "dave")) == targets(7, "dave")
    with pytest.raises(RateLimited):  # a fresh device (another login) is the same user
        await throttle.key_claims(device("alice", "new"), targets(1, "erin"))
    bob = device("bob", "phone")  # someone else is not slowed
    assert await throttle.key_claims(bob, targets(10)) == targets(10)


async def test_a_claim_bigger_than_a_whole_window_passes_once_it_is_empty() -> None:
    limiter = ManualLimiter()
    rules = RateRules(key_claims_per_device=Rate(10, 60), key_claims_per_user=Rate(10, 60))
    throttle = Throttle(limiter, rules)
    phone = device("alice", "phone")
    assert await throttle.key_claims(phone, targets(25)) == targets(25)  # not "never"
    with pytest.raises(RateLimited) as err:  # ... but it spent the whole window
        await throttle.key_claims(phone, targets(1, "carol"))
    limiter.t += err.value.retry_after + 0.001
    assert await throttle.key_claims(phone, targets(1, "carol")) == targets(1, "carol")


async def test_a_target_claimed_too_often_by_one_user_is_left_out() -> None:
    limiter = ManualLimiter()
    throttle = Throttle(limiter, RateRules(key_claims_per_target=Rate(3, 3600)))
    phone, laptop = device("eve", "phone"), device("eve", "laptop")
    for _ in range(2):
        assert await throttle.key_claims(phone, ["bob-phone"]) == ["bob-phone"]
    assert await throttle.key_claims(laptop, ["bob-phone"]) == ["bob-phone"]  # one user: 3
    # over it, bob's phone is left out; the rest of the claim goes through, in order
    claim = ["carol-phone", "bob-phone", "bob-laptop"]
    assert await throttle.key_claims(phone, claim) == ["carol-phone", "bob-laptop"]
    assert await throttle.key_claims(laptop, ["bob-phone"]) == []
    # other users still reach bob's phone: the limit is eve's, not a lock on bob
    assert await throttle.key_claims(device("alice", "phone"), ["bob-phone"]) == ["bob-phone"]
    limiter.t += 2 * 3600  # two windows later, eve may again
    assert await throttle.key_claims(phone, ["bob-phone"]) == ["bob-phone"]


async def test_a_refused_claim_spends_no_target_budget() -> None:
    """A claim refused per device or user is retried by an honest client: its retries must
    not use up what it may take of each target."""
    limiter = ManualLimiter()
    rules = RateRules(
        key_claims_per_device=Rate(1, 60),
        key_claims_per_user=Rate(100, 60),
        key_claims_per_target=Rate(3, 3600),
    )
    throttle = Throttle(limiter, rules)
    phone = device("alice", "phone")
    assert await throttle.key_claims(phone, ["bob-phone"]) == ["bob-phone"]
    for _ in range(5):
        with pytest.raises(RateLimited):
            await throttle.key_claims(phone, ["bob-phone"])
    limiter.t += 120
    assert await throttle.key_claims(phone, ["bob-phone"]) == ["bob-phone"]  # 2 of 3 spent
