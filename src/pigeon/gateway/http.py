"""REST endpoints: accounts and devices, health. JSON in, JSON out, errors as {code, message}."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from pigeon.domain.errors import BadRequest, PigeonError, PushUnsupported, RateLimited
from pigeon.domain.models import Device
from pigeon.domain.push import PushTarget
from pigeon.gateway.errors import http_status
from pigeon.gateway.keys import SERVICES, SETTINGS
from pigeon.gateway.websocket import bearer_token

T = TypeVar("T")
READY = web.AppKey("ready", dict[str, bool])
_HTTP_CODES = {404: "not_found", 405: "bad_request", 413: "too_large"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Register(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str
    invite: str | None = None


class Login(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str
    device_name: str = "device"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors become `{code, message}` with their HTTP status; nothing leaks a traceback."""
    try:
        return await handler(request)
    except PigeonError as exc:
        resp = _json({"code": exc.code, "message": exc.message}, http_status(exc))
        if isinstance(exc, RateLimited):
            resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            # The refused client waits anyway; holding its answer (a keep-alive connection
            # carries one request at a time) keeps a hammering one from taking the loop.
            delay = min(exc.retry_after, request.app[SETTINGS].gateway.refusal_delay)
            # not a refused WebSocket upgrade (connections per address): held, it would be one
            # more open socket than the cap allows
            if delay > 0 and request.headers.get("Upgrade", "").lower() != "websocket":
                await asyncio.sleep(delay)
        return resp
    except web.HTTPException as exc:  # routing and body-size errors from aiohttp itself
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal")
        return _json({"code": code, "message": exc.reason}, exc.status)


async def _body(request: web.Request, kind: type[T]) -> T:
    try:
        async with asyncio.timeout(request.app[SETTINGS].gateway.request_timeout):
            raw = await request.read()
    except TimeoutError as exc:  # a body sent a byte at a time
        raise BadRequest("request body not received in time") from exc
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid body: {exc}") from exc


async def _device(request: web.Request) -> Device:
    return await request.app[SERVICES].accounts.authenticate(bearer_token(request))


async def register(request: web.Request) -> web.Response:
    body = await _body(request, Register)
    user = await request.app[SERVICES].accounts.register(
        body.username, body.password, request.remote, body.invite
    )
    return _json({"id": user.id, "username": user.username}, 201)


async def login(request: web.Request) -> web.Response:
    body = await _body(request, Login)
    device, token = await request.app[SERVICES].accounts.login(
        body.username, body.password, body.device_name, request.remote
    )
    return _json({"user": device.user_id, "device": device.id, "token": token}, 201)


async def list_devices(request: web.Request) -> web.Response:
    me = await _device(request)
    return _json({"devices": await request.app[SERVICES].accounts.devices(me.user_id)})


async def revoke_device(request: web.Request) -> web.Response:
    me = await _device(request)
    await request.app[SERVICES].accounts.revoke(me.user_id, request.match_info["device_id"])
    return web.Response(status=204)


async def find_user(request: web.Request) -> web.Response:
    await _device(request)
    user = await request.app[SERVICES].accounts.find_user(request.match_info["username"])
    return _json({"id": user.id, "username": user.username})


class PushShowNamesBody(msgspec.Struct, forbid_unknown_fields=True):
    show: bool


async def put_push_target(request: web.Request) -> web.Response:
    me = await _device(request)
    await request.app[SERVICES].push.register(me, await _body(request, PushTarget))
    return web.Response(status=204)


async def delete_push_target(request: web.Request) -> web.Response:
    me = await _device(request)
    await request.app[SERVICES].push.unregister(me)
    return web.Response(status=204)


async def get_push_target(request: web.Request) -> web.Response:
    me = await _device(request)
    return _json(await request.app[SERVICES].push.status(me))


async def put_push_show_names(request: web.Request) -> web.Response:
    me = await _device(request)
    body = await _body(request, PushShowNamesBody)
    await request.app[SERVICES].push.show_names(me, body.show)
    return web.Response(status=204)


async def vapid_key(request: web.Request) -> web.Response:
    """The server's VAPID public key: a browser subscribes with it (`applicationServerKey`)."""
    key = request.app[SERVICES].vapid_public_key
    if key is None:
        raise PushUnsupported("Web Push is not configured on this server")
    return _json({"key": key})


async def healthz(request: web.Request) -> web.Response:
    if not request.app[READY].get("ready"):
        return _json({"status": "starting"}, 503)
    hub = request.app[SERVICES].hub
    return _json({"status": "ok", "connections": len(hub), "pid": os.getpid()})


def add_routes(app: web.Application) -> None:
    """Mount the REST API under /v1 and the health check."""
    app.router.add_post("/v1/users", register)
    app.router.add_post("/v1/devices", login)
    app.router.add_get("/v1/devices", list_devices)
    app.router.add_delete("/v1/devices/{device_id}", revoke_device)
    app.router.add_get("/v1/users/{username}", find_user)
    app.router.add_put("/v1/devices/me/push", put_push_target)
    app.router.add_delete("/v1/devices/me/push", delete_push_target)
    app.router.add_get("/v1/devices/me/push", get_push_target)
    app.router.add_put("/v1/me/push-show-names", put_push_show_names)
    app.router.add_get("/v1/push/vapid-key", vapid_key)
    app.router.add_get("/healthz", healthz)
