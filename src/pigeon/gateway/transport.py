"""The small interface a connection needs from its WebSocket library, so the library can be
swapped (e.g. for picows) without touching sessions, the hub or the message path."""

from __future__ import annotations

from typing import Protocol

from aiohttp import WSMsgType, web


class Transport(Protocol):
    """The writing half of one server-side WebSocket."""

    async def send_text(self, frame: bytes) -> None:
        """Send one text frame (UTF-8 JSON); may wait while the peer's buffer is full."""

    async def ping(self) -> None:
        """Send a ping control frame."""

    async def close(self, code: int, reason: str) -> None:
        """Run the closing handshake with `code`."""


class AiohttpTransport:
    """`Transport` over an aiohttp `WebSocketResponse`."""

    __slots__ = ("_ws",)

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def send_text(self, frame: bytes) -> None:
        await self._ws.send_frame(frame, WSMsgType.TEXT)

    async def ping(self) -> None:
        await self._ws.ping()

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code=code, message=reason.encode())


_check: type[Transport] = AiohttpTransport
