"""Abuse limits: what each device, user, chat and client address may spend, per sliding window.

Why a service of its own: the rules (which counter a command spends, and how much) live here
once, whatever keeps the counters (`RateLimiter`: in-process on one node, Redis in a cluster).
An over-limit request is refused before it costs anything (`RateLimited`, with the seconds
after which it would pass); the wire turns that into `rate_limited` + `retry_after`, or HTTP
429 + Retry-After. Counters are keyed by rule, so one rule's traffic never spends another's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pigeon.domain.errors import RateLimited
from pigeon.domain.limits import Rate, RateRules, Spend
from pigeon.domain.models import Device
from pigeon.ports import RateLimiter

#: Chats whose fan-out estimate is kept (the busiest are relearned after a reset).
_MAX_REMEMBERED = 100_000
#: Seconds a send waits for the first send to a chat to tell the chat's fan-out, at most.
_LEARN_WAIT = 2.0


class Throttle:
    """Checks the rate rules for each command that spends server resources."""

    def __init__(self, limiter: RateLimiter, rules: RateRules) -> None:
        self._limiter = limiter
        self._rules = rules
        #: Per chat, the deliveries its last message made: what the next send reserves from the
        #: chat's fan-out budget before it runs, so concurrent sends cannot all slip through.
        self._fanout: dict[str, int] = {}
        #: Chats whose fan-out is not known yet, with the send that will tell: concurrent sends
        #: to such a chat wait for it (else a burst to a big group passes reserving 1 each).
        self._learning: dict[str, asyncio.Future[None]] = {}

    async def send(self, device: Device, body_bytes: int) -> None:
        """A message: per device and per user, and its bytes per device (`fanout` follows)."""
        r = self._rules
        spends: list[Spend] = [
            (r.send_per_device, "sd:" + device.id, 1),
            (r.send_per_user, "su:" + device.user_id, 1),
        ]
        if body_bytes:
            spends.append((r.send_bytes_per_device, "sb:" + device.id, body_bytes))
        # all or nothing, in one call: a refused message costs none of its counters. Deferred
        # on a cluster (the message path waits for no round trip; other nodes' spends of the
        # user's counter are seen up to a sync interval late)
        wait = await self._limiter.hit_all(spends, deferred=True)
        if wait is not None:
            limits = (
                f"{r.send_per_device} per device, {r.send_per_user} per user, "
                f"{r.send_bytes_per_device} bytes per device"
            )
            raise RateLimited(f"too many messages (limits {limits}); retry in {wait:.1f} s", wait)

    async def fanout(self, chat_id: str) -> None:
        """A message's reservation from its chat's fan-out budget. Callers reserve in the order
        their sends reach the store, after the sender's earlier sends did: a send that waits
        here for another to tell the chat's fan-out never waits for one that waits for it."""
        r = self._rules
        known = self._fanout.get(chat_id)
        learner: asyncio.Future[None] | None = None
        if known is None:
            waiting = self._learning.get(chat_id)
            if waiting is None:  # this send learns the chat's fan-out; the next ones wait
                learner = asyncio.get_running_loop().create_future()
                self._learning[chat_id] = learner
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(waiting), _LEARN_WAIT)
                except TimeoutError:  # its outcome was never awaited: stop waiting for it
                    if self._learning.get(chat_id) is waiting:
                        self._learned(chat_id)
                known = self._fanout.get(chat_id)
        # at most a whole window: a chat larger than the budget still gets one message per window
        estimate = min(known or 1, r.fanout_per_chat.amount)
        try:
            wait = await self._limiter.hit(
                r.fanout_per_chat, "fc:" + chat_id, estimate, deferred=True
            )
            if wait is not None:
                raise RateLimited(f"this chat is too busy; retry in {wait:.1f} s", wait)
        except BaseException:  # refused or cancelled: this send will tell nothing
            if learner is not None:
                self._learned(chat_id)
            raise

    async def delivered(self, chat_id: str, deliveries: int | None) -> None:
        """A send that passed `send` has ended. Committed, it fanned out to `deliveries`
        devices: charge what its reservation missed, and reserve that much for the chat's next
        send. None: it did not commit (or was a duplicate), so nothing was learned."""
        if deliveries is None:
            self._learned(chat_id)
            return
        rule = self._rules.fanout_per_chat
        estimate = min(self._fanout.get(chat_id, 1), rule.amount)
        if len(self._fanout) >= _MAX_REMEMBERED and chat_id not in self._fanout:
            self._fanout.clear()  # estimates only: they are learned again at once
        self._fanout[chat_id] = deliveries
        self._learned(chat_id)
        extra = min(deliveries, rule.amount) - estimate
        if extra > 0:
            await self._limiter.hit(rule, "fc:" + chat_id, extra, deferred=True)

    def _learned(self, chat_id: str) -> None:
        learner = self._learning.pop(chat_id, None)
        if learner is not None and not learner.done():
            learner.set_result(None)

    async def create_chat(self, user_id: str, group: bool) -> None:
        await self._spend(self._rules.create_chat_per_user, "cc:" + user_id, 1, "new chats")
        if group:
            await self._spend(self._rules.groups_per_user, "cg:" + user_id, 1, "new groups")

    async def modify_members(self, user_id: str) -> None:
        await self._spend(self._rules.modify_members_per_user, "mm:" + user_id, 1, "changes")

    async def typing(self, device_id: str) -> None:
        rule = self._rules.typing_per_device
        await self._spend(rule, "ty:" + device_id, 1, "typing", deferred=True)

    async def presence_subscribe(self, device_id: str) -> None:
        rule = self._rules.presence_subscribe_per_device
        await self._spend(rule, "ps:" + device_id, 1, "subscriptions")

    async def key_uploads(self, device_id: str) -> None:
        """`keys_upload`: one unit per call (with keys, or asking for the counts)."""
        rule = self._rules.key_uploads_per_device
        await self._spend(rule, "kp:" + device_id, 1, "key uploads")

    async def key_queries(self, device_id: str) -> None:
        """`keys_query`: one unit per call, however many users it names."""
        rule = self._rules.key_queries_per_device
        await self._spend(rule, "kq:" + device_id, 1, "key queries")

    async def key_claims(self, device: Device, targets: Sequence[str]) -> list[str]:
        """`keys_claim` of one key for each of `targets` (existing devices; one-time keys are
        their owners' scarce resource). Each key is one unit for the claiming device and for
        its user, all or nothing (`RateLimited`); a claim asking for more than a whole window
        spends all of it. Then, per target device, what this user took of it lately: returns
        the targets still within `key_claims_per_target`, in order (the others get their
        fallback key instead of a one-time key, not a refusal: one account cannot drain a
        device's one-time keys, and a claimer that keeps failing to use one device's keys
        still reaches it and every other)."""
        r = self._rules
        device_rule, user_rule = r.key_claims_per_device, r.key_claims_per_user
        wait = await self._limiter.hit_all(
            [
                (device_rule, "kc:" + device.id, min(len(targets), device_rule.amount)),
                (user_rule, "kcu:" + device.user_id, min(len(targets), user_rule.amount)),
            ]
        )
        if wait is not None:
            limits = f"{device_rule} per device, {user_rule} per user"
            raise RateLimited(f"too many key claims (limits {limits}); retry in {wait:.1f} s", wait)
        # one counter each, independent of the others: concurrent hits leave together (one
        # round trip to Redis)
        prefix = f"kct:{device.user_id}:"
        target_rule = r.key_claims_per_target
        waits = await asyncio.gather(*(self._limiter.hit(target_rule, prefix + t) for t in targets))
        return [t for t, w in zip(targets, waits, strict=True) if w is None]

    async def sync(self, device_id: str) -> None:
        await self._spend(self._rules.sync_per_device, "sy:" + device_id, 1, "syncs")

    async def register(self, address: str | None) -> None:
        if address is not None:
            rule = self._rules.register_per_address
            await self._spend(rule, "ra:" + address, 1, "registrations")

    async def login(self, address: str | None, username: str) -> None:
        """Before checking a password: attempts per address, and per username in three tiers
        (a minute, an hour, a day), so the wait grows with a guesser's persistence."""
        if address is not None:
            await self._spend(self._rules.login_per_address, "la:" + address, 1, "logins")
        key = username.casefold()
        r = self._rules
        tiers = (r.login_per_username, r.login_per_username_hourly, r.login_per_username_daily)
        for tier, rule in enumerate(tiers):
            await self._spend(rule, f"lu{tier}:{key}", 1, "logins for this username")

    async def _spend(
        self, rate: Rate, key: str, cost: int, what: str, *, deferred: bool = False
    ) -> None:
        wait = await self._limiter.hit(rate, key, cost, deferred=deferred)
        if wait is not None:
            raise RateLimited(f"too many {what} (limit {rate}); retry in {wait:.1f} s", wait)
