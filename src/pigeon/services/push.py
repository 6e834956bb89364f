"""Push notifications: registration (the gateway's side) and the worker that drains the queue.

A device's message entries add to its push job of that chat in the transaction that commits
them (the store's outbox), so the message path never waits for a push gateway and a gateway
outage only delays pushes. The worker leases due jobs, checks that the device still needs the
push (it may have acked in the meantime: a connected device acks within `grace`), renders a
notification without any message body, and hands it to the sender of the target's platform.
Failures are retried with exponential backoff and jitter, honouring the gateway's
`Retry-After`, and end in the dead letters after `max_attempts`; a gateway that calls the target
permanently invalid gets it removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import msgspec

from pigeon.domain.errors import Forbidden, PushUnsupported
from pigeon.domain.models import Device
from pigeon.domain.push import (
    PushKind,
    PushNotification,
    PushOutcome,
    PushTarget,
    check_target,
    is_public_address,
)
from pigeon.ports import Clock, PushJob, PushQueue, PushQueueFeed, PushSender, PushStore

log = logging.getLogger(__name__)
#: Seconds `PushWorker.aclose` lets pushes in flight finish.
_CLOSE_WAIT = 5.0


class PushRegistration(msgspec.Struct, frozen=True, omit_defaults=True):
    """A device's registration as it sees it: its target, or why a gateway removed it."""

    target: PushTarget | None = None
    removed: str | None = None


@dataclass(frozen=True, slots=True)
class TargetRules:
    """Which targets this server accepts: a device names the URL the server will POST to."""

    #: Platforms with a configured sender (and a queue to feed it).
    kinds: frozenset[PushKind] = frozenset()
    #: Hosts webhook URLs may name; none: webhooks are refused.
    webhook_hosts: frozenset[str] = frozenset()
    #: Loopback and private addresses as URL hosts (tests, a LAN deployment).
    allow_private: bool = False

    def check(self, target: PushTarget) -> PushTarget:
        """The target if this server accepts it; else the error to answer with."""
        check_target(target)
        if target.kind not in self.kinds:
            raise PushUnsupported(f"{target.kind} push is not configured on this server")
        url = target.url if target.kind == "webhook" else target.endpoint
        host = (urlsplit(url).hostname or "").lower() if url else ""
        if target.kind == "webhook" and host not in self.webhook_hosts:
            raise Forbidden(f"webhook host {host!r} is not among this server's push.webhook_hosts")
        if url and not self.allow_private and _private(host):
            raise Forbidden(f"push URLs may not name a private address ({host})")
        return target


def _private(host: str) -> bool:
    host = host.rstrip(".")  # "127.0.0.1." and "localhost." resolve as without the dot
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:  # the resolver also takes IPv4's old forms: 127.1, 0x7f000001, 2130706433, 0
            address = ipaddress.ip_address(socket.inet_ntoa(socket.inet_aton(host)))
        except OSError:
            return False  # a name: checked when a push connects (http.PublicResolver)
    return not is_public_address(address)


class PushService:
    """Registering, replacing and removing a device's push target; the privacy setting."""

    def __init__(self, store: PushStore, clock: Clock, rules: TargetRules) -> None:
        self._store = store
        self._clock = clock
        self._rules = rules

    async def register(self, device: Device, target: PushTarget) -> None:
        """Set the device's one target (replacing any earlier one)."""
        self._rules.check(target)
        await self._store.set_target(device.id, target, self._clock.now_ms())

    async def unregister(self, device: Device) -> None:
        """Remove the device's target (and its queued pushes)."""
        await self._store.set_target(device.id, None, self._clock.now_ms())

    async def status(self, device: Device) -> PushRegistration:
        """The device's target, or why a gateway removed it."""
        target, removed = await self._store.target_status(device.id)
        return PushRegistration(target=target, removed=removed)

    async def show_names(self, device: Device, show: bool) -> None:
        """The user's setting (all their devices): may pushes name the sender?"""
        await self._store.set_show_names(device.user_id, show)


@dataclass(frozen=True, slots=True)
class PushPolicy:
    """When and how often the worker pushes (from `PushSettings`)."""

    grace: float = 0.5
    window: float = 30.0
    visibility_timeout: float = 60.0
    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 3600.0
    concurrency: int = 32
    poll_interval: float = 0.25

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 1`: a random point in the upper half of an exponential
        ceiling (jitter spreads retries of a recovering gateway)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)


class PushWorker:
    """Drains the push queue: at most `concurrency` pushes in flight, one task per job."""

    def __init__(
        self,
        queue: PushQueue,
        store: PushStore,
        senders: Mapping[PushKind, PushSender],
        clock: Clock,
        policy: PushPolicy,
    ) -> None:
        self._queue = queue
        self._store = store
        self._senders = senders
        self._clock = clock
        self._policy = policy
        #: A queue a broker feeds is waited on when idle; a table is polled.
        self._feed = cast(PushQueueFeed, queue) if hasattr(queue, "wait_due") else None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        #: What happened to claimed jobs, by outcome (for metrics, the bench and tests).
        self.counts: dict[str, int] = dict.fromkeys(
            ("sent", "skipped", "retried", "dead", "gone"), 0
        )
        self._observers: list[Callable[[str, PushJob], None]] = []

    def observe(self, callback: Callable[[str, PushJob], None]) -> None:
        """Call `callback(outcome, job)` once each claimed job is answered (tests, the bench)."""
        self._observers.append(callback)

    def _count(self, outcome: str, job: PushJob) -> None:
        self.counts[outcome] += 1
        for callback in self._observers:
            callback(outcome, job)

    async def start(self) -> None:
        """Tell the queue the coalescing rules, then drain it in a task of its own."""
        await self._queue.configure(self._policy.grace, self._policy.window)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="push-worker")

    async def aclose(self) -> None:
        """Stop claiming, give pushes in flight a moment, then cancel them: their jobs stay
        leased and come back after the visibility timeout (a push may then go twice)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            _, late = await asyncio.wait(self._inflight, timeout=_CLOSE_WAIT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._round()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be down for a while: back off
                failures += 1
                log.warning("push worker round failed (%d in a row): %s", failures, exc)
                await self._pause(self._policy.backoff(failures))

    async def _round(self) -> None:
        p = self._policy
        free = p.concurrency - len(self._inflight)
        if free <= 0:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            return
        due = await self._queue.next_due()  # a read: an idle worker writes nothing
        now = self._clock.now_ms()
        if due is None or due > now:
            wait = p.poll_interval if due is None else (due - now) / 1000
            await self._idle(min(wait, p.poll_interval))
            return
        jobs = await self._queue.claim(now, free, p.visibility_timeout)
        for job in jobs:
            task = asyncio.get_running_loop().create_task(self._handle(job))
            self._inflight.add(task)
            task.add_done_callback(self._finished)
        if not jobs:
            await self._idle(p.poll_interval)

    async def _idle(self, seconds: float) -> None:
        """Nothing to claim: poll the queue's table again later, or, if the queue is fed
        (`PushQueueFeed`: a broker delivers to it), wake up as soon as a job arrives."""
        if self._feed is None:
            await self._pause(seconds)
        else:
            await self._feed.wait_due(max(0.0, seconds))

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("push job failed", exc_info=task.exception())

    async def _handle(self, job: PushJob) -> None:
        try:
            await self._push(job)
        except Exception as exc:  # the store failed mid-job: the job comes back, counted
            log.warning("push job of %s failed: %s", job.device, exc)
            with contextlib.suppress(Exception):  # else its lease runs out: the same, later
                await self._failed(job, f"store error: {exc}")

    async def _push(self, job: PushJob) -> None:
        ctx = await self._store.context(job.device, job.chat, job.last_iseq)
        now = self._clock.now_ms()
        invited = ctx is not None and job.invite_iseq > ctx.acked_iseq
        news = ctx is not None and ctx.waiting and ctx.count > 0
        if ctx is None or ctx.target is None or ctx.disabled or not (news or invited):
            # gone, unregistered, caught up (or read elsewhere) meanwhile, its own user wrote,
            # or its user is disabled (an operator's decision: nothing reaches them, not even
            # a wake-up; what waits in the inbox is synced once they are enabled again)
            await self._queue.done(job, now, pushed=False)
            self._count("skipped", job)
            return
        note = PushNotification(
            device=job.device,
            chat=job.chat,
            count=(ctx.count if news else 0) + invited,
            badge=ctx.unread,
            collapse_key=job.chat,
            title="New message" if news else "New chat",
            sender_name=ctx.sender_name,
            preview=ctx.preview,
        )
        outcome = await self._send(ctx.target, note)
        now = self._clock.now_ms()
        if outcome.result == "sent":
            await self._queue.done(job, now, pushed=True)
            self._count("sent", job)
        elif outcome.result == "gone":
            log.info("push target of %s removed: %s", job.device, outcome.detail)
            # the device sees the reason: the status only, never what the gateway answered
            reason = outcome.detail.split(":", 1)[0][:64]
            if await self._store.remove_gone(job.device, ctx.target, reason, now):
                await self._queue.done(job, now, pushed=False)
            else:  # it registered another target meanwhile: push there instead
                await self._queue.retry(job, now, outcome.detail)
            self._count("gone", job)
        else:
            await self._failed(job, outcome.detail, outcome.retry_after)

    async def _failed(self, job: PushJob, detail: str, retry_after: float | None = None) -> None:
        """An attempt failed: retry after a backoff (or the gateway's `Retry-After`, if longer),
        or, after the last attempt, a dead letter."""
        now = self._clock.now_ms()
        if job.attempts >= self._policy.max_attempts:
            log.warning("push to %s dead after %d attempts", job.device, job.attempts)
            await self._queue.dead(job, detail, now)
            self._count("dead", job)
        else:
            delay = max(retry_after or 0.0, self._policy.backoff(job.attempts))
            await self._queue.retry(job, now + int(delay * 1000), detail)
            self._count("retried", job)

    async def _send(self, target: PushTarget, note: PushNotification) -> PushOutcome:
        sender = self._senders.get(target.kind)
        if sender is None:
            return PushOutcome("retry", f"{target.kind} push is not configured")
        try:
            return await sender.send(target, note)
        except Exception as exc:  # a sender's bug must not lose the job: it is retried
            log.exception("push sender %s failed", target.kind)
            return PushOutcome("retry", f"sender error: {exc!r}")
