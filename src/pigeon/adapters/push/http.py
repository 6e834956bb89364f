"""The HTTP half of the push senders: one aiohttp session per sender, and gateways' answers as
`PushOutcome`s. Webhook and Web Push post through `GatewayClient`; FCM, which reads its own
error bodies and fetches tokens, uses its session and `describe_error`."""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from collections.abc import Mapping

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from pigeon.domain.push import PushOutcome, is_public_address, retry_after_seconds

#: Statuses that mean the target will never work again (an unsubscribed endpoint, a removed hook).
GONE_STATUSES = frozenset({404, 410})
#: How much of an error answer's body goes into `PushOutcome.detail`, for the logs.
_DETAIL_BYTES = 200


def outcome_of(status: int, retry_after: str | None, now: float) -> PushOutcome:
    """What a gateway's HTTP status means for the push worker (see `PushSender`)."""
    if 200 <= status < 300:
        return PushOutcome("sent")
    if status in GONE_STATUSES:
        return PushOutcome("gone", f"HTTP {status}")
    if status == 429 or status >= 500:
        return PushOutcome("retry", f"HTTP {status}", retry_after_seconds(retry_after, now))
    # Other answers (400, 401, 403, 413, a redirect...) may be a passing misconfiguration:
    # retried, and dead-lettered by the worker after its last attempt.
    return PushOutcome("retry", f"HTTP {status}")


class PublicResolver(AbstractResolver):
    """Resolves names as aiohttp does, then keeps only public addresses.

    A device names its Web Push endpoint or webhook URL, so the server must not be made to POST
    to its own network: a name that resolves to a loopback, private or link-local address is
    refused here, when the connection is made (checking at registration alone would let DNS
    change its answer afterwards). IP literals never reach a resolver; `TargetRules` refuses
    the private ones when the target is registered.
    """

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if is_public_address(ipaddress.ip_address(r["host"]))]
        if not public:
            raise OSError(errno.EHOSTUNREACH, f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


class GatewayClient:
    """One connection pool to push gateways that answers every POST with a `PushOutcome`.

    It never raises for what the network or the gateway does: refused connections, timeouts,
    resets and malformed answers all become `retry`. Redirects are not followed (a gateway that
    moved is a configuration error, and following one would let a target point pushes anywhere).
    With `public_only`, names are resolved by `PublicResolver` (URLs that devices chose).
    """

    def __init__(self, timeout: float, *, public_only: bool = False) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._public_only = public_only
        self._resolver: PublicResolver | None = None
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._resolver = PublicResolver() if self._public_only else None
            connector = aiohttp.TCPConnector(resolver=self._resolver)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:  # a resolver given to a connector is not closed by it
            await self._resolver.close()
            self._resolver = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open session (for a sender that reads answers its own way)."""
        if self._session is None:
            raise RuntimeError("a push sender was used before open()")
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PushOutcome:
        """POST `body` to `url` and classify the answer."""
        if self._session is None:
            raise RuntimeError("GatewayClient.post before open()")
        try:
            async with self._session.post(
                url, data=body, headers=dict(headers), allow_redirects=False
            ) as resp:
                outcome = outcome_of(resp.status, resp.headers.get("Retry-After"), time.time())
                if outcome.result != "sent":
                    outcome = await _with_body_excerpt(outcome, resp)
                return outcome
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return PushOutcome("retry", describe_error(exc))


def describe_error(exc: BaseException) -> str:
    """An exception as `Name: message` (`Name` alone when it has no message, as timeouts)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _with_body_excerpt(outcome: PushOutcome, resp: aiohttp.ClientResponse) -> PushOutcome:
    """`outcome` with the start of the gateway's error text appended to its detail."""
    excerpt = (await resp.content.read(_DETAIL_BYTES)).decode("utf-8", "replace").strip()
    if not excerpt:
        return outcome
    return msgspec.structs.replace(outcome, detail=f"{outcome.detail}: {excerpt}")
