"""The one place where domain errors become wire errors (frames, close codes, HTTP statuses)."""

from __future__ import annotations

import logging
from enum import IntEnum

from pigeon.domain import errors as e
from pigeon.gateway.protocol import Error, Rid

log = logging.getLogger(__name__)

HTTP_STATUS: dict[type[e.PigeonError], int] = {
    e.BadRequest: 400,
    e.UnknownCommand: 400,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.Conflict: 409,
    e.TooManyDevices: 409,
    e.TooManyChats: 409,
    e.GroupFull: 409,
    e.TooLarge: 413,
    e.RateLimited: 429,
    e.Unavailable: 503,
    e.PushUnsupported: 501,
    e.SignatureInvalid: 403,
    e.UrlExpired: 403,
    e.SizeMismatch: 400,
    e.ChecksumMismatch: 400,
    e.UnsupportedMediaType: 415,
    e.AccountDisabled: 403,
    e.TooManyKeys: 409,
    e.E2ERequired: 403,
}


class Close(IntEnum):
    """WebSocket close codes. 4000-4499: reconnect (with backoff); 4500-4999: do not."""

    GOING_AWAY = 1001
    TRY_AGAIN_LATER = 1013
    SLOW_CONSUMER = 4000
    HEARTBEAT_TIMEOUT = 4001
    SYNC_FAILED = 4002
    RATE_LIMITS_IGNORED = 4003
    UNAUTHORIZED = 4501
    REVOKED = 4502
    REPLACED = 4503
    DISABLED = 4504


def should_reconnect(code: int) -> bool:
    """What a client should do after a close with `code`."""
    return not 4500 <= code <= 4999


def to_error(rid: Rid | None, exc: BaseException) -> Error:
    """Any exception as an error reply; unexpected ones become `internal` (and are logged)."""
    if isinstance(exc, e.RateLimited):
        wait = round(exc.retry_after, 3)
        return Error(rid=rid, code=exc.code, message=exc.message, temporary=True, retry_after=wait)
    if isinstance(exc, e.PigeonError):
        return Error(rid=rid, code=exc.code, message=exc.message, temporary=exc.temporary)
    log.error("unexpected error", exc_info=exc)
    return Error(rid=rid, code="internal", message="internal error", temporary=True)


def http_status(exc: e.PigeonError) -> int:
    """The HTTP status for a domain error."""
    return HTTP_STATUS.get(type(exc), 500)
