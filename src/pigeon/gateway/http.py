"""REST endpoints: accounts and devices, health and readiness, the frames' JSON Schema and the
REST API's OpenAPI description. JSON in, JSON out, errors as {code, message}. `openapi.json`
beside this module (package data; docs/openapi.json is the same file) describes every route."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, TypeVar

import msgspec
from aiohttp import hdrs, web

from pigeon.domain.errors import BadRequest, PigeonError, PushUnsupported, RateLimited
from pigeon.domain.models import Device
from pigeon.domain.push import PushTarget
from pigeon.gateway.errors import http_status
from pigeon.gateway.keys import SERVICES, SETTINGS
from pigeon.gateway.protocol import PROTOCOL_VERSION, frame_schema
from pigeon.gateway.websocket import bearer_token

T = TypeVar("T")
log = logging.getLogger(__name__)
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
        resp = _json({"code": code, "message": exc.reason}, exc.status)
        if hdrs.ALLOW in exc.headers:  # a 405 says which methods the path has (RFC 9110)
            resp.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        return resp
    except Exception:  # a bug: logged, and answered in the API's shape
        log.exception("%s %s failed", request.method, request.path)
        return _json({"code": "internal", "message": "internal error"}, 500)


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


#: A readiness probe: returns if its backend answered, raises if not.
Probe = Callable[[], Awaitable[None]]


class Readiness:
    """Whether this node can do its work now, for `/readyz`: each backend it cannot work
    without (the store, the bus, the presence registry) must answer a cheap probe (`ping`)
    within `timeout`. The probes run concurrently. One round answers every request that comes
    while it runs and for `ttl` seconds after, so a flood of `/readyz` costs one round of
    probes per `ttl`. A probe that starts or stops failing is logged once."""

    def __init__(self, probes: Mapping[str, Probe], timeout: float, ttl: float = 0.25) -> None:
        self._probes = dict(probes)
        self._timeout = timeout
        self._ttl = ttl
        self._round: asyncio.Task[list[str]] | None = None
        self._failed: list[str] = []
        self._checked_at = -math.inf
        self._down: set[str] = set()

    async def failed(self) -> list[str]:
        """The names of the probes that failed (in the order given); [] when all answered."""
        loop = asyncio.get_running_loop()
        if self._round is None:
            if loop.time() - self._checked_at < self._ttl:
                return list(self._failed)
            self._round = loop.create_task(self._check())
        # shielded: a caller that goes away does not cancel the round the others wait for
        return list(await asyncio.shield(self._round))

    async def aclose(self) -> None:
        """Cancel a round still running (the server is stopping)."""
        if self._round is not None:
            self._round.cancel()
            await asyncio.gather(self._round, return_exceptions=True)

    async def _check(self) -> list[str]:
        try:
            names = list(self._probes)
            answered = await asyncio.gather(*(self._probe(name) for name in names))
            self._failed = [name for name, ok in zip(names, answered, strict=True) if not ok]
            self._checked_at = asyncio.get_running_loop().time()
            return self._failed
        finally:
            self._round = None

    async def _probe(self, name: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._probes[name]()
        except Exception as exc:
            if name not in self._down:
                self._down.add(name)
                why = str(exc) or f"no answer within {self._timeout:g} s"
                log.warning("not ready: the %s failed its probe: %s", name, why)
            return False
        if name in self._down:
            self._down.discard(name)
            log.info("the %s answers its probe again", name)
        return True


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves (503 while starting or shutting down). Probes nothing."""
    if not request.app[READY].get("ready"):
        return _json({"status": "starting", "protocol": PROTOCOL_VERSION}, 503)
    hub = request.app[SERVICES].hub
    return _json(
        {"status": "ok", "connections": len(hub), "pid": os.getpid(), "protocol": PROTOCOL_VERSION}
    )


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only while the store, the bus and the presence registry answer (see
    `Readiness`); 503 naming those that did not, and while starting or shutting down."""
    if not request.app[READY].get("ready"):
        return _json({"status": "starting", "protocol": PROTOCOL_VERSION}, 503)
    failed = await request.app[READINESS].failed()
    if failed:
        body = {"status": "unready", "failed": failed, "protocol": PROTOCOL_VERSION}
        return _json({**body, "pid": os.getpid()}, 503)
    return _json({"status": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid()})


def openapi_document() -> bytes:
    """The OpenAPI 3.1 description of the REST API, as packaged with pigeon (package data, so
    it is in every wheel; docs/openapi.json is a copy the tests keep identical)."""
    return resources.files("pigeon.gateway").joinpath("openapi.json").read_bytes()


def _openapi_handler() -> Handler:
    """`GET /v1/openapi.json`: the description, read once."""
    body = openapi_document()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi


def _schema_handler() -> Handler:
    """`GET /v1/schema`: the JSON Schema of every WebSocket frame, made once."""
    body = msgspec.json.encode(frame_schema())

    async def schema(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return schema


async def _close_readiness(app: web.Application) -> None:
    readiness = app.get(READINESS)
    if readiness is not None:
        await readiness.aclose()


def add_routes(app: web.Application) -> None:
    """Mount the REST API under /v1, the frames' schema and the API's description, and the
    health and readiness checks (`app[READINESS]` holds the probes)."""
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
    app.router.add_get("/v1/schema", _schema_handler())
    app.router.add_get("/v1/openapi.json", _openapi_handler())
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_cleanup.append(_close_readiness)
