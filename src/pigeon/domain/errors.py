"""Typed domain errors, each with a stable wire code.

Services raise these; only the gateway turns them into frames or HTTP statuses (see
`pigeon.gateway.errors`). Adapters translate driver exceptions into `Unavailable` or `Conflict`
at their boundary so services never see a sqlite3 or asyncpg exception.
"""

from __future__ import annotations


class PigeonError(Exception):
    """Base of every error a client may see. `code` is stable; `message` is for humans."""

    code = "internal"
    #: A temporary error may succeed when retried unchanged (the SDK retries those).
    temporary = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")


class BadRequest(PigeonError):
    """The frame or request body is malformed or fails validation."""

    code = "bad_request"


class UnknownCommand(PigeonError):
    """The frame names a command the server does not know."""

    code = "unknown_command"


class Unauthorized(PigeonError):
    """Missing, invalid, expired or revoked credentials."""

    code = "unauthorized"


class Forbidden(PigeonError):
    """Authenticated, but not allowed to act on this resource (e.g. not a chat participant)."""

    code = "forbidden"


class NotFound(PigeonError):
    """The named user, chat, device or message does not exist (or is no longer kept)."""

    code = "not_found"


class Conflict(PigeonError):
    """The request clashes with existing state (e.g. the username is taken)."""

    code = "conflict"


class GroupFull(PigeonError):
    """Adding these participants would exceed the group cap."""

    code = "group_full"


class TooManyDevices(PigeonError):
    """The user already has the maximum number of logged-in devices."""

    code = "too_many_devices"


class TooManyChats(PigeonError):
    """The user is already in the maximum number of chats."""

    code = "too_many_chats"


class TooLarge(PigeonError):
    """A frame or message body exceeds its configured limit."""

    code = "too_large"


class RateLimited(PigeonError):
    """Too many requests; retry after `retry_after` seconds."""

    code = "rate_limited"
    temporary = True

    def __init__(self, message: str = "", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(PigeonError):
    """A backing service (store, bus) failed; nothing was committed, retrying is safe."""

    code = "unavailable"
    temporary = True


class PushUnsupported(PigeonError):
    """This server cannot push to that kind of target: the platform's credentials are not
    configured, or the store has no push queue yet."""

    code = "push_unsupported"


ALL_ERRORS: tuple[type[PigeonError], ...] = (
    BadRequest,
    UnknownCommand,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    GroupFull,
    TooManyDevices,
    TooManyChats,
    TooLarge,
    RateLimited,
    Unavailable,
    PushUnsupported,
)


# --- Blob storage (media messages) -----------------------------------------------------------
# Subclasses of BadRequest / Forbidden so that generic handlers still classify them, each with
# its own stable code so that a client can tell what to fix.


class SignatureInvalid(Forbidden):
    """A signed blob URL was altered, or used for another method, key or set of headers than
    the one it was signed for."""

    code = "signature_invalid"


class UrlExpired(Forbidden):
    """A correctly signed blob URL was used after its expiry; ask for a new one."""

    code = "url_expired"


class SizeMismatch(BadRequest):
    """The uploaded bytes are not the declared size; nothing was kept."""

    code = "size_mismatch"


class ChecksumMismatch(BadRequest):
    """The uploaded bytes do not have the declared SHA-256; nothing was kept."""

    code = "checksum_mismatch"


class UnsupportedMediaType(BadRequest):
    """The attachment's content type is not among the accepted ones (`media.allowed_types`)."""

    code = "unsupported_media_type"


# --- Accounts an operator disabled (`pigeon admin users disable`) ----------------------------


class AccountDisabled(Forbidden):
    """The user's account was disabled by an operator: no login, no token works, until it is
    enabled again. A subclass of `Forbidden` (the credentials are right, the account may not
    act), with its own code so that a client can tell the person why."""

    code = "account_disabled"


# --- End-to-end encryption ------------------------------------------------------------------


class TooManyKeys(PigeonError):
    """A device would hold more one-time keys than `e2e.max_one_time_keys`."""

    code = "too_many_keys"


class E2ERequired(Forbidden):
    """The chat was created encrypted: a plaintext body (or an attachment not declared
    encrypted) is refused; send an `e2e` envelope instead."""

    code = "e2e_required"


ALL_ERRORS += (
    TooManyKeys,
    E2ERequired,
    AccountDisabled,
    SignatureInvalid,
    UrlExpired,
    SizeMismatch,
    ChecksumMismatch,
    UnsupportedMediaType,
)
