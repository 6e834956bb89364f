"""What the SDK raises: one exception type, `ClientError`, with a stable `code`.

Why one base: an application catches `ClientError` and looks at `code` (the server's reply
codes of docs/protocol.md, and the SDK's own below), as it would read a reply frame. The
subclasses exist for the failures an application handles differently from a refused command:
a lost connection (retry), a TLS certificate it does not trust, a server that speaks a
protocol version this SDK does not (update the app), and a rate limit the SDK waited out in
vain (try later). None of them is retried by the SDK.
"""

from __future__ import annotations


class ClientError(Exception):
    """An error reply (or a connection problem) with the server's stable `code`."""

    def __init__(
        self,
        code: str,
        message: str = "",
        temporary: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.temporary = temporary
        #: `rate_limited`: seconds until the same request would be accepted.
        self.retry_after = retry_after


class ConnectionLost(ClientError):
    """The connection dropped before the reply came; the command may or may not have run."""

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__("connection_lost", message, temporary=True)


class RateLimited(ClientError):
    """A command the SDK sends on its own (the key directory's `keys_upload`, `keys_query`,
    `keys_claim`, and `send_to_device` for room keys) was still refused with `rate_limited`
    after the SDK waited as told a few times, or was told to wait longer than it would (code
    `rate_limited`, temporary). `retry_after`: seconds until the server would accept it;
    `command`: which one it was. The operation that needed it (a `send`, connecting) failed
    and may be tried again then."""

    def __init__(self, command: str, message: str, retry_after: float | None) -> None:
        super().__init__("rate_limited", message, temporary=True, retry_after=retry_after)
        #: The command refused (`keys_claim`, say).
        self.command = command


class TlsFailed(ClientError):
    """TLS with the server failed (code `tls_failed`): most often its certificate is not
    trusted (`untrusted`: signed by a private CA whose bundle was not given as `ca_file`, or
    for another host name, or expired), or the server does not speak TLS on that port, or the
    CA bundle given cannot be read. Not temporary: retrying changes nothing."""

    def __init__(self, reason: str, *, untrusted: bool = False) -> None:
        hint = " (a private CA? pass its bundle as ca_file)" if untrusted else ""
        super().__init__("tls_failed", reason + hint)
        #: What failed, without the hint (the CLI gives its own).
        self.reason = reason
        #: The server's certificate did not verify.
        self.untrusted = untrusted


class IncompatibleProtocol(ClientError):
    """The server announced a protocol version this SDK does not speak (code
    `incompatible_protocol`; docs/protocol.md, "Protocol version"). The SDK closed the
    connection and does not reconnect: the application must be updated (or the server)."""

    def __init__(self, server: int, supported: frozenset[int]) -> None:
        newest = max(supported)
        age = "a newer" if server > newest else "an older"
        versions = ", ".join(str(v) for v in sorted(supported))
        super().__init__(
            "incompatible_protocol",
            f"the server speaks {age} protocol version ({server}) than this SDK ({versions}):"
            f" update {'the application' if server > newest else 'the server'}",
        )
        #: The version the server announced in `ready`.
        self.server = server
        #: The versions this SDK speaks.
        self.supported = supported
