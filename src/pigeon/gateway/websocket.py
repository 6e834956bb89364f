"""The WebSocket endpoint `/v1/ws`: authenticate, attach to the hub, sync the inbox, read commands.

Authentication: `Authorization: Bearer <token>` or `?token=` on the upgrade request (refused with
HTTP 401 before upgrading), or else an `auth` command as the first frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from pigeon.domain.errors import AccountDisabled, PigeonError, RateLimited, Unauthorized
from pigeon.domain.ids import new_id
from pigeon.domain.models import Device
from pigeon.gateway import protocol as p
from pigeon.gateway.connection import Connection
from pigeon.gateway.errors import Close, to_error
from pigeon.gateway.keys import SERVICES, SETTINGS, Services
from pigeon.gateway.session import Session
from pigeon.gateway.transport import AiohttpTransport
from pigeon.logs import bind_log_context
from pigeon.services.accounts import AccountService

log = logging.getLogger(__name__)


def bearer_token(request: web.Request) -> str | None:
    """The token of an upgrade or REST request, from the header or the `token` query param."""
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():  # RFC 9110: case-insensitive scheme
        return credentials.strip()
    return request.query.get("token")


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """Serve one device's WebSocket for as long as it lives (refused with 429 while its client
    address holds `gateway.max_connections_per_address` of them)."""
    hub = request.app[SERVICES].hub
    address = request.remote or ""
    if not hub.admit(address):  # 429 + Retry-After through the error middleware
        raise RateLimited("too many connections from this address", retry_after=10)
    try:
        return await _serve(request)
    finally:
        hub.release(address)


async def _serve(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    gw = request.app[SETTINGS].gateway
    device: Device | None = None
    token = bearer_token(request)
    if token is not None:
        try:
            device = await services.accounts.authenticate(token)
        except PigeonError as exc:  # 503 while the store is down (retry); else 401, also for
            # `account_disabled` (403 on REST): a client stops reconnecting on a 401, and its
            # body's code says why
            body = {"code": exc.code, "message": exc.message}
            return web.json_response(body, status=503 if exc.temporary else 401)
    ws = web.WebSocketResponse(
        timeout=gw.close_timeout,
        autoping=False,
        max_msg_size=gw.hard_frame_limit,
        compress=False,
        decode_text=False,
    )
    await ws.prepare(request)
    metrics = services.sessions.metrics
    with metrics.connections.track_inprogress() if metrics else contextlib.nullcontext():
        return await _upgraded(request, ws, device)


async def _upgraded(
    request: web.Request, ws: web.WebSocketResponse, device: Device | None
) -> web.StreamResponse:
    """The life of one WebSocket once upgraded: authenticate (if the upgrade did not), attach,
    sync, read commands, clean up."""
    services = request.app[SERVICES]
    gw = request.app[SETTINGS].gateway
    if device is None:
        device = await _auth_frame(ws, services.accounts, gw.auth_timeout)
        if device is None:
            return ws
    bind_log_context(user=device.user_id, device=device.id)  # this connection's tasks' lines
    conn = Connection(
        AiohttpTransport(ws, request), device, gw.outbound_queue_frames, gw.outbound_queue_bytes
    )
    conn.hold()  # live events wait for `ready` and the inbox sync, which releases them in order
    session = Session(conn, services.sessions)
    hub = services.hub
    session_key = new_id()
    sync: asyncio.Task[int] | None = None
    try:
        acked = await _attach(services, conn, session)
        if acked is None:
            return ws
        ready = p.Ready(
            user=device.user_id, device=device.id, acked=acked, server_time=services.clock.now_ms()
        )
        conn.send(p.encode(ready))
        sync = asyncio.create_task(session.sync(acked))
        try:  # after `ready`: watchers never learn of a device before it does itself
            await services.presence.connected(device, session_key)
        except PigeonError as exc:  # registry down: messaging goes on; the next presence
            log.warning("presence of device %s not registered: %s", device.id, exc)  # tick retries
        await _read_loop(ws, conn, session)
    finally:
        # Each step runs whatever the one before did: a user must never stay "online" because
        # a cleanup step failed.
        hub.detach(conn)
        loop = asyncio.get_running_loop()
        last_seen = services.clock.now_ms() - int((loop.time() - conn.last_recv) * 1000)
        if sync is not None:
            sync.cancel()
            with contextlib.suppress(BaseException):
                await sync
        try:
            await session.aclose()
        except Exception:
            log.exception("session cleanup of device %s failed", device.id)
        try:
            await services.presence.disconnected(device, session_key, last_seen)
        except Exception:
            log.exception("presence cleanup of device %s failed", device.id)
        await conn.wait_closed()
    return ws


async def _attach(services: Services, conn: Connection, session: Session) -> int | None:
    """Route the device's frames to this connection and read what it acked; None if the
    connection must end instead (replaced meanwhile, revoked, or the store is down)."""
    device = conn.device
    try:
        await services.hub.attach(conn, lambda: session.sync(0))  # 0: from what it acked
        if conn.closing:  # replaced by a newer connection meanwhile
            return None
        # A revocation (or a disable) committed between authentication and attach published
        # its close frame to nobody: check again now that the hub routes this device's frames.
        standing = await services.accounts.standing(device)
        if standing == "revoked":
            conn.close(Close.REVOKED, "device revoked")
            return None
        if standing == "disabled":
            conn.close(Close.DISABLED, "account disabled")
            return None
        return await services.messaging.acked(device)
    except PigeonError as exc:
        if not exc.temporary:
            raise
        log.warning("device %s could not be set up: %s", device.id, exc)
        conn.close(Close.TRY_AGAIN_LATER, "try again later")
        return None


async def _read_loop(ws: web.WebSocketResponse, conn: Connection, session: Session) -> None:
    loop = asyncio.get_running_loop()
    while not conn.closing:
        msg = await ws.receive()
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            conn.last_recv = loop.time()
            await session.handle(msg.data)
        elif msg.type == WSMsgType.PING:
            conn.last_recv = loop.time()
            await ws.pong(msg.data)
        elif msg.type == WSMsgType.PONG:
            conn.last_recv = loop.time()
        else:  # CLOSE, CLOSING, CLOSED, ERROR (e.g. a frame over the hard limit)
            break


async def _auth_frame(
    ws: web.WebSocketResponse, accounts: AccountService, timeout: float
) -> Device | None:
    """Authenticate with a first `auth` frame; on failure close with UNAUTHORIZED."""
    rid: p.Rid | None = None
    try:
        msg = await ws.receive(timeout=timeout)
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            raise Unauthorized("expected an auth frame")
        try:
            cmd = p.command_decoder.decode(msg.data)
        except Exception as exc:  # any decoder failure, RecursionError included
            raise Unauthorized("the first frame must be an auth command") from exc
        if not isinstance(cmd, p.Auth):
            raise Unauthorized("the first frame must be an auth command")
        rid = cmd.rid
        device = await accounts.authenticate(cmd.token)
    except (PigeonError, TimeoutError) as exc:
        err = exc if isinstance(exc, PigeonError) else Unauthorized("no auth frame in time")
        with contextlib.suppress(Exception):
            await ws.send_frame(p.encode(to_error(rid, err)), WSMsgType.TEXT)
        if err.temporary:  # the store is down: come back later, this is not a bad token
            await ws.close(code=Close.TRY_AGAIN_LATER, message=b"try again later")
        elif isinstance(err, AccountDisabled):
            await ws.close(code=Close.DISABLED, message=b"account disabled")
        else:
            await ws.close(code=Close.UNAUTHORIZED, message=b"unauthorized")
        return None
    await ws.send_frame(p.encode(p.Ok(rid=cmd.rid, result={"device": device.id})), WSMsgType.TEXT)
    return device
