"""The small interface a connection needs from its WebSocket library, so the library can be
swapped (e.g. for picows) without touching sessions, the hub or the message path."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import WSMsgType, web

_TEXT_FIN = 0x81
#: RFC 6455: a final ping control frame, no payload, unmasked (server to client).
_PING_FRAME = b"\x89\x00"
_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack


def text_frame_header(length: int) -> bytes:
    """RFC 6455 header of an unmasked, final text frame (server to client)."""
    if length < 126:
        return _LEN1(_TEXT_FIN, length)
    if length < 65536:
        return _LEN2(_TEXT_FIN, 126, length)
    return _LEN3(_TEXT_FIN, 127, length)


class Transport(Protocol):
    """The writing half of one server-side WebSocket."""

    async def send_texts(self, frames: list[bytes]) -> None:
        """Send text frames (UTF-8 JSON) in order; may wait while the peer's buffer is full."""

    def write_now(self, frames: list[bytes]) -> bool:
        """Write text frames at once if that needs no waiting: True when written; False when
        nothing was written (the peer's buffer is full, or this transport cannot write
        without awaiting), and `send_texts` must do it."""

    def ping_now(self) -> bool:
        """Write a ping control frame at once if that needs no waiting: True when written;
        False when `ping` must do it."""

    async def ping(self) -> None:
        """Send a ping control frame."""

    async def close(self, code: int, reason: str) -> None:
        """Run the closing handshake with `code`."""


class AiohttpTransport:
    """`Transport` over an aiohttp `WebSocketResponse`.

    Queued frames are written with one `transport.write` per batch instead of one per frame
    (aiohttp's `send_frame` writes, i.e. makes a syscall, per frame: ~15% of the server's CPU in
    the 1:1 benchmark). Server frames are unmasked and we never compress, so the header is all
    there is to build. Flow control uses the protocol's drain helper, as aiohttp's writer does;
    if that is not available, frames go through `send_frame` one by one.
    """

    __slots__ = ("_drain", "_protocol", "_raw", "_ws")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self._raw = request.transport
        self._protocol = request.protocol
        drain: Callable[[], Awaitable[None]] | None = getattr(self._protocol, "_drain_helper", None)
        self._drain = drain

    async def send_texts(self, frames: list[bytes]) -> None:
        raw, drain = self._raw, self._drain
        if raw is None or drain is None:
            for frame in frames:
                await self._ws.send_frame(frame, WSMsgType.TEXT)
            return
        self._write(raw, frames)
        if self._protocol.writing_paused:
            await drain()

    def write_now(self, frames: list[bytes]) -> bool:
        raw = self._raw
        if raw is None or self._drain is None or self._protocol.writing_paused:
            return False
        self._write(raw, frames)
        return True

    def ping_now(self) -> bool:
        raw = self._raw
        if raw is None or self._drain is None or self._protocol.writing_paused:
            return False
        self._check_open(raw)
        raw.write(_PING_FRAME)
        return True

    def _check_open(self, raw: asyncio.Transport) -> None:
        if raw.is_closing() or self._ws.closed:
            raise ConnectionResetError("connection is closing")

    def _write(self, raw: asyncio.Transport, frames: list[bytes]) -> None:
        self._check_open(raw)
        parts: list[bytes] = []
        for frame in frames:
            parts.append(text_frame_header(len(frame)))
            parts.append(frame)
        raw.write(b"".join(parts))

    async def ping(self) -> None:
        await self._ws.ping()

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code=code, message=reason.encode())


_check: type[Transport] = AiohttpTransport
