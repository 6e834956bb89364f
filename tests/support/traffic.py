"""Steady chat traffic for fault tests, and the checks every fault test makes afterwards.

Each pair is a sender and a receiver device with a direct chat. Senders send numbered messages
one after another through the SDK (which retries temporary failures under the same client id);
receivers collect every message the SDK surfaces. `verify` then asserts the three promises:
no acked message lost, no order violation in any chat, no duplicate surfaced by the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

from pigeon.client import ClientError, PigeonClient
from pigeon.client.client import SendResult
from pigeon.domain.events import Message


@dataclass
class Pair:
    sender: PigeonClient
    receiver: PigeonClient
    chat: str


@dataclass
class Traffic:
    """Runs senders and receivers until stopped; records what was acked and what arrived."""

    pairs: list[Pair]
    acked: dict[str, list[SendResult]] = field(default_factory=lambda: defaultdict(list))
    received: dict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))
    failed_sends: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _senders: list[asyncio.Task[None]] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def start(self) -> None:
        for pair in self.pairs:
            self._senders.append(asyncio.create_task(self._send_forever(pair)))
            self._tasks.append(asyncio.create_task(self._receive_forever(pair)))

    @property
    def total_acked(self) -> int:
        return sum(len(v) for v in self.acked.values())

    async def _send_forever(self, pair: Pair) -> None:
        for i in range(1_000_000):
            try:
                result = await pair.sender.send(pair.chat, f"m{i}")
            except ClientError:
                self.failed_sends += 1  # not acked: may or may not exist, never counted lost
                continue
            async with self._changed:
                self.acked[pair.chat].append(result)
                self._changed.notify_all()

    async def _receive_forever(self, pair: Pair) -> None:
        async for event in pair.receiver.events():
            if isinstance(event, Message):
                async with self._changed:
                    self.received[event.chat].append(event)
                    self._changed.notify_all()

    async def wait_acked(self, count: int, timeout: float = 60.0) -> None:
        """Until at least `count` more messages than now are acked in total."""
        target = self.total_acked + count
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.total_acked >= target)

    async def stop_sending(self) -> None:
        for task in self._senders:
            task.cancel()
        for task in self._senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def drain(self, timeout: float = 60.0) -> None:
        """Until every acked message has been received (fails the test after `timeout`)."""

        def complete() -> bool:
            return all(
                {r.id for r in results} <= {m.id for m in self.received[chat]}
                for chat, results in self.acked.items()
            )

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(complete)

    async def close(self) -> None:
        await self.stop_sending()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await task

    async def finish(self) -> None:
        """Stop sending, wait until every acked message arrived, check the three promises,
        stop receiving."""
        await self.stop_sending()
        await self.drain()
        self.verify()
        await self.close()

    def verify(self) -> None:
        """Zero acked-message loss, zero order violations, zero surfaced duplicates."""
        for chat, messages in self.received.items():
            ids = [m.id for m in messages]
            assert len(ids) == len(set(ids)), f"duplicate surfaced in chat {chat}"
            seqs = [m.seq for m in messages]
            assert seqs == sorted(seqs), f"order violated in chat {chat}: {seqs}"
        for chat, results in self.acked.items():
            missing = {r.id for r in results} - {m.id for m in self.received[chat]}
            assert not missing, f"{len(missing)} acked messages lost in chat {chat}"
