"""A minimal WebSocket client for load generation: an asyncio protocol, no SDK, no JSON parsing
on the hot path.

Why it exists: the SDK client decodes every frame into structs, runs tasks per reply and acks on
timers; one generator process of it saturates its core near 2,000 msgs/s, below the server it
measures. This client costs a few microseconds per frame, so `pigeon bench compare` measures the
server, not itself. It speaks just enough RFC 6455 for loopback benchmarks: the upgrade, text
frames out (masked with a zero key, which leaves the payload as it is), text, ping and close
frames in.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
_ZERO_MASK = b"\0\0\0\0"


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, masked client frame (zero masking key: the payload needs no XOR)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = _LEN2(0x80 | opcode, 0x80 | 126, n)
    else:
        head = _LEN3(0x80 | opcode, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


class WireSocket(asyncio.Protocol):
    """One client WebSocket; `on_frame(payload)` gets every text frame's payload in order."""

    def __init__(self, on_frame: Callable[[bytes], None]) -> None:
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._upgraded: asyncio.Future[None] | None = None
        self._open = False

    @classmethod
    async def connect(
        cls,
        url: str,
        on_frame: Callable[[bytes], None],
        timeout: float = 30.0,
        protocols: Sequence[str] = (),
    ) -> WireSocket:
        """Open `url` (ws://host:port/path?query) and finish the upgrade, asking for the
        subprotocols `protocols` (XMPP over WebSocket needs `xmpp`; the answer is not checked)."""
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        transport, sock = await loop.create_connection(
            lambda: cls(on_frame), parts.hostname or "127.0.0.1", parts.port or 80
        )
        key = base64.b64encode(os.urandom(16)).decode()
        offer = f"Sec-WebSocket-Protocol: {', '.join(protocols)}\r\n" if protocols else ""
        sock._upgraded = loop.create_future()
        sock.transport = transport
        transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
        )
        try:
            async with asyncio.timeout(timeout):
                await sock._upgraded
        except BaseException:
            transport.close()  # refused or timed out: a caller polling readiness leaks nothing
            raise
        return sock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if self._upgraded is not None and not self._upgraded.done():
            self._upgraded.set_exception(ConnectionError("connection lost during the upgrade"))

    def send(self, payload: bytes) -> None:
        """Queue one text frame (never waits: loopback benchmarks keep buffers small)."""
        if self._open and self.transport is not None:
            self.transport.write(client_frame(payload))

    def send_many(self, payloads: list[bytes]) -> None:
        """Queue several text frames with one write."""
        if self._open and self.transport is not None:
            self.transport.write(b"".join(client_frame(p) for p in payloads))

    def close(self) -> None:
        if self.transport is not None:
            if self._open:
                self.transport.write(client_frame(struct.pack("!H", 1000), opcode=0x8))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            assert self._upgraded is not None
            if b" 101 " not in status:
                self._upgraded.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            self._open = True
            self._upgraded.set_result(None)
        self._parse(buf)

    def _parse(self, buf: bytearray) -> None:
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode = buf[pos] & 0x0F
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            if opcode == 0x1:
                self.on_frame(payload)
            elif opcode == 0x9 and self.transport is not None:  # ping: pong with its payload
                self.transport.write(client_frame(payload, opcode=0xA))
            elif opcode == 0x8:
                self.close()
        del buf[:pos]
