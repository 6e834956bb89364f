"""The bare relay: the least an aiohttp WebSocket server can do for a chat message, as the
baseline of `pigeon bench compare`.

A receiver connects with `?chat=<id>`; a sender's text frame (a Pigeon `send` command) is
decoded just enough to find its `chat` and `rid`, forwarded as it is to that chat's receiver,
and answered `{"t":"ok","rid":N}`. Nothing is stored, authenticated or ordered beyond TCP: the
ceiling of a Python WebSocket relay on this machine, against which Pigeon's cost is a ratio.

Run: `python -m pigeon.bench.relay --port 9000`.
"""

from __future__ import annotations

import argparse

import msgspec
from aiohttp import WSMsgType, web


class _Route(msgspec.Struct):
    rid: int | str
    chat: str = ""


_decode = msgspec.json.Decoder(_Route).decode
PEERS = web.AppKey("peers", dict[str, web.WebSocketResponse])


async def _handler(request: web.Request) -> web.WebSocketResponse:
    peers = request.app[PEERS]
    ws = web.WebSocketResponse(autoping=True, compress=False, decode_text=False)
    await ws.prepare(request)
    chat = request.query.get("chat")
    if chat:
        peers[chat] = ws
    try:
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            route = _decode(msg.data)
            peer = peers.get(route.chat)
            if peer is not None and not peer.closed:
                await peer.send_frame(msg.data, WSMsgType.TEXT)
            await ws.send_frame(
                b'{"t":"ok","rid":%s}' % msgspec.json.encode(route.rid), WSMsgType.TEXT
            )
    finally:
        if chat and peers.get(chat) is ws:
            del peers[chat]
    return ws


async def _healthz(request: web.Request) -> web.Response:
    """Up (as Pigeon's `/healthz`, so the benchmark waits for both the same way)."""
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    app = web.Application()
    app[PEERS] = {}
    app.router.add_get("/ws", _handler)
    app.router.add_get("/healthz", _healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    web.run_app(make_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
