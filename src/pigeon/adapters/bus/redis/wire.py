"""Low-level connection helpers shared by the Redis bus's listeners, publishers and slot reads.

Why it exists: the bus talks to Redis through redis-py's low-level asyncio `Connection` (RESP2
parsing, AUTH, TLS) rather than its pub/sub client, so it needs its own small toolkit: a typed
view of that connection (`Wire`), the command names of classic vs sharded pub/sub (`Verbs`), a
factory that dials any node with the configured URL's options (`Dialer`), and the few helpers
for hanging up and for waiting on barriers with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, cast

from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

#: One logger for the whole package, named as the module was before it became a package.
log = logging.getLogger("pigeon.adapters.bus.redis")


class Wire(Protocol):
    """The part of redis-py's asyncio `Connection` used here (typed for mypy --strict)."""

    @property
    def is_connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def disconnect(self, nowait: bool = False) -> None: ...

    async def can_read(self) -> bool: ...

    def pack_commands(self, commands: Iterable[Sequence[bytes | str | int]]) -> list[bytes]: ...

    async def send_packed_command(
        self, command: list[bytes], check_health: bool = True
    ) -> None: ...

    async def read_response(
        self, disable_decoding: bool = False, timeout: float | None = None
    ) -> Any: ...


class Verbs:
    """Command and message names: classic pub/sub, or sharded pub/sub on a cluster."""

    def __init__(self, sharded: bool) -> None:
        prefix = b"S" if sharded else b""
        self.publish = prefix + b"PUBLISH"
        self.subscribe = prefix + b"SUBSCRIBE"
        self.unsubscribe = prefix + b"UNSUBSCRIBE"
        self.message = prefix.lower() + b"message"
        self.unsubscribed = prefix.lower() + b"unsubscribe"


class Dialer:
    """Makes connections from the configured URL (credentials, TLS, db), to any node."""

    def __init__(self, url: str, timeout: float, client_name: str) -> None:
        kwargs: dict[str, Any] = dict(parse_url(url))
        self._cls: Callable[..., Any] = kwargs.pop("connection_class", Connection)
        kwargs.update(
            protocol=2,  # pub/sub messages as plain arrays, no RESP3 push handling
            decode_responses=False,
            # No socket_timeout: redis-py would then write through asyncio.wait_for, which on
            # Python 3.11 can swallow a cancellation. Every wait here is bounded by the caller
            # (asyncio.timeout) or by the listener's PING heartbeat instead.
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # we retry (with backoff) ourselves
            client_name=client_name,
        )
        self._kwargs = kwargs
        self.host: str = kwargs.get("host", "localhost")
        self.port: int = kwargs.get("port", 6379)

    def dial(self, host: str | None = None, port: int | None = None) -> Wire:
        kwargs = dict(self._kwargs)
        if host is not None:
            kwargs.update(host=host, port=port)
        return cast(Wire, self._cls(**kwargs))


async def hang_up(conn: Wire | None) -> None:
    if conn is not None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await conn.disconnect(nowait=True)


async def settle(fut: asyncio.Future[bool], timeout: float) -> bool:
    """Wait for a barrier without cancelling it; False if it failed or timed out."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)
    except TimeoutError:
        return False


def resolve(fut: asyncio.Future[bool] | None, ok: bool) -> None:
    if fut is not None and not fut.done():
        fut.set_result(ok)
