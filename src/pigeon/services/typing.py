"""Typing indicators: ephemeral, online devices only, self-expiring, throttled.

Never stored or queued: a `typing` frame is published on the device channels of the chat's other
participants, so only devices connected somewhere receive it. A `typing: true` expires after
`ttl` unless renewed (the server then publishes `typing: false`); renewals closer than
`min_interval` to the last forwarded one only extend the expiry and are not forwarded.
"""

from __future__ import annotations

import asyncio
import logging

from pigeon.domain.errors import Forbidden, NotFound, PigeonError
from pigeon.domain.events import TypingFrame, encode_frame
from pigeon.domain.ids import is_id
from pigeon.domain.models import Device
from pigeon.ports import Bus, ChatStore
from pigeon.services import channels
from pigeon.services.throttle import Throttle

log = logging.getLogger(__name__)


class _Typing:
    __slots__ = ("forwarded_at", "timer")

    def __init__(self, forwarded_at: float, timer: asyncio.TimerHandle) -> None:
        self.forwarded_at = forwarded_at
        self.timer = timer


class TypingService:
    """Forwards typing state per (device, chat); one per node (state lives with the device)."""

    def __init__(
        self,
        chats: ChatStore,
        bus: Bus,
        *,
        ttl: float,
        min_interval: float,
        throttle: Throttle | None = None,
    ) -> None:
        self._throttle = throttle
        self._chats = chats
        self._bus = bus
        self._ttl = ttl
        self._min_interval = min_interval
        self._active: dict[tuple[str, str], _Typing] = {}

    async def typing(self, device: Device, chat_id: str, typing: bool) -> bool:
        """Set the device's typing state in the chat; True if it was forwarded."""
        if not is_id(chat_id):
            raise NotFound("no such chat")
        if self._throttle is not None:
            await self._throttle.typing(device.id)
        loop = asyncio.get_running_loop()
        key = (device.id, chat_id)
        current = self._active.get(key)
        if (
            typing
            and current is not None
            and loop.time() - current.forwarded_at < self._min_interval
        ):
            current.timer.cancel()
            current.timer = loop.call_later(self._ttl, self._expire, device, chat_id)
            return False
        if not typing and current is None:
            return False  # nothing to stop
        targets = await self._targets(device, chat_id)
        if current is not None:
            current.timer.cancel()
            del self._active[key]
        if typing:
            timer = loop.call_later(self._ttl, self._expire, device, chat_id)
            self._active[key] = _Typing(loop.time(), timer)
        await self._publish(device, chat_id, typing, targets)
        return True

    async def device_gone(self, device: Device) -> None:
        """The device disconnected: whatever it was typing stops now. Never raises (it runs
        in connection cleanup): the stop goes to the chat's current members, if any."""
        for key in [k for k in self._active if k[0] == device.id]:
            state = self._active.pop(key)
            state.timer.cancel()
            try:
                members = await self._chats.member_devices(key[1])
                targets = [d for user, d in members if user != device.user_id]
                await self._publish(device, key[1], False, targets)
            except PigeonError as exc:
                log.warning("typing stop for %s not sent: %s", device.id, exc)

    def _expire(self, device: Device, chat_id: str) -> None:
        if self._active.pop((device.id, chat_id), None) is None:
            return
        task = asyncio.get_running_loop().create_task(self._expire_now(device, chat_id))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _expire_now(self, device: Device, chat_id: str) -> None:
        try:
            await self._publish(device, chat_id, False, await self._targets(device, chat_id))
        except PigeonError as exc:  # e.g. the typist left the chat meanwhile
            log.debug("typing expiry for %s not sent: %s", device.id, exc)

    async def _targets(self, device: Device, chat_id: str) -> list[str]:
        members = await self._chats.member_devices(chat_id)
        if not any(user == device.user_id for user, _ in members):
            raise Forbidden("not a participant of this chat")
        return [d for user, d in members if user != device.user_id]

    async def _publish(
        self, device: Device, chat_id: str, typing: bool, targets: list[str]
    ) -> None:
        frame = encode_frame(
            TypingFrame(
                chat=chat_id,
                user=device.user_id,
                device=device.id,
                typing=typing,
                ttl_ms=int(self._ttl * 1000) if typing else 0,
            )
        )
        await self._bus.publish_many([(channels.device(t), frame) for t in targets])
