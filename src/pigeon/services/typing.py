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
        #: Per device, per chat: what it is typing (per device, so that a disconnect finds
        #: its own at once: a scan of every typist per disconnect was quadratic in a mass
        #: reconnect).
        self._active: dict[str, dict[str, _Typing]] = {}

    async def typing(self, device: Device, chat_id: str, typing: bool) -> bool:
        """Set the device's typing state in the chat; True if it was forwarded."""
        if not is_id(chat_id):
            raise NotFound("no such chat")
        if self._throttle is not None:
            await self._throttle.typing(device.id)
        loop = asyncio.get_running_loop()
        chats = self._active.get(device.id)
        current = None if chats is None else chats.get(chat_id)
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
            self._forget(device.id, chat_id)
        if typing:
            timer = loop.call_later(self._ttl, self._expire, device, chat_id)
            self._active.setdefault(device.id, {})[chat_id] = _Typing(loop.time(), timer)
        await self._publish(device, chat_id, typing, targets)
        return True

    async def device_gone(self, device: Device) -> None:
        """The device disconnected: whatever it was typing stops now. Never raises (it runs
        in connection cleanup): the stop goes to the chat's current members, if any."""
        for chat_id, state in self._active.pop(device.id, {}).items():
            state.timer.cancel()
            try:
                members = await self._chats.member_devices(chat_id)
                targets = [d for user, d in members if user != device.user_id]
                await self._publish(device, chat_id, False, targets)
            except PigeonError as exc:
                log.warning("typing stop for %s not sent: %s", device.id, exc)

    def _forget(self, device_id: str, chat_id: str) -> _Typing | None:
        chats = self._active.get(device_id)
        if chats is None:
            return None
        state = chats.pop(chat_id, None)
        if not chats:
            del self._active[device_id]
        return state

    def _expire(self, device: Device, chat_id: str) -> None:
        if self._forget(device.id, chat_id) is None:
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
