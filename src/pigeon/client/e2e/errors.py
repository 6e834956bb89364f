"""What the E2E core raises: `E2EError` and its kinds, each with a stable `code`.

Why they are `ClientError`s: an application already catches `ClientError` and reads `code`;
a crypto failure is one more kind of it. Each subclass is a failure the application handles
differently: a wrong pickle key (ask the user again), a damaged store (restore or start a new
device), a forged or mismatched key (warn, never encrypt to it), a file whose hash does not
match (discard the download). Decrypting a chat message never raises: see `megolm.py`.
"""

from __future__ import annotations

from pigeon.client.errors import ClientError


class E2EError(ClientError):
    """Base of every error of the end-to-end encryption core."""


class WrongPickleKey(E2EError):
    """The key store could not be opened with this pickle key (or it is not 32 bytes)."""

    def __init__(self, message: str = "the pickle key does not open this key store") -> None:
        super().__init__("e2e_wrong_pickle_key", message)


class StoreCorrupt(E2EError):
    """The key store opened but its content is not what this SDK wrote (or is from a newer
    version of it): nothing was loaded."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_store_corrupt", message)


class StoreExists(E2EError):
    """`CryptoStore.create` was asked to create a key store where one already is: creating it
    again would throw away the device's identity keys."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_store_exists", message)


class InvalidSignature(E2EError):
    """A signed key bundle or key does not verify, or does not say what it is given as (another
    user, device or key). Never encrypt to such a device."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_invalid_signature", message)


class SenderMismatch(E2EError):
    """An encrypted payload came from keys other than those of the device it claims to be from,
    or was meant for another device."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_sender_mismatch", message)


class OlmDecryptionFailed(E2EError):
    """A to-device payload could not be decrypted: malformed, tampered with, replayed, or from
    a session this device does not have (e.g. its store was restored from an old backup)."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_olm_decryption_failed", message)


class SessionFailed(E2EError):
    """An Olm session could not be created from a claimed key (malformed key)."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_session_failed", message)


class AttachmentCorrupt(E2EError):
    """An encrypted file's SHA-256 is not the one its message gave (or its key material is
    malformed): it was tampered with or truncated. Nothing decrypted may be shown."""

    def __init__(self, message: str = "the file's hash does not match its message") -> None:
        super().__init__("e2e_attachment_corrupt", message)


class NoSession(E2EError):
    """There is no Olm session with that device yet: claim one of its keys (`keys_claim`) and
    start one (`OlmSessions.start`) first."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_no_session", message)


class DeviceRevoked(E2EError):
    """The device was revoked: its id and keys are never trusted again, even if the server
    announces it anew (a revoked device's id is never reused)."""

    def __init__(self, message: str) -> None:
        super().__init__("e2e_device_revoked", message)
