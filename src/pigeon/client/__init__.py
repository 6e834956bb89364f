"""Async Python SDK for Pigeon: used by the CLI, the tests, the benchmark and examples/.

Everything an application needs is importable from here: the connection (`PigeonClient`), the
REST calls (accounts and devices), the event types that `PigeonClient.events()` yields, and
the errors (`ClientError` and its kinds), and end-to-end encryption (`E2EConfig`; the crypto
core is `pigeon.client.e2e`).
"""

from pigeon.client.client import PROTOCOL_VERSIONS, ClientEvent, PigeonClient, SendResult
from pigeon.client.e2e import AttachmentKey, IdentityKeyChanged, RotationPolicy
from pigeon.client.encryption import (
    DecryptedMessage,
    DeviceCrypto,
    E2EConfig,
    E2ENotice,
    Unreadable,
    WaitingForKey,
)
from pigeon.client.errors import (
    ClientError,
    ConnectionLost,
    IncompatibleProtocol,
    RateLimited,
    TlsFailed,
)
from pigeon.client.http import (
    Account,
    find_user,
    list_devices,
    login,
    register,
    revoke_device,
)
from pigeon.client.media import Progress, UploadFailed
from pigeon.domain.events import (
    ChatUpdate,
    DeviceList,
    Event,
    KeysExhausted,
    Message,
    ReadState,
    Receipt,
    ToDevice,
)
from pigeon.domain.models import Attachment

__all__ = [
    "PROTOCOL_VERSIONS",
    "Account",
    "Attachment",
    "AttachmentKey",
    "ChatUpdate",
    "ClientError",
    "ClientEvent",
    "ConnectionLost",
    "DecryptedMessage",
    "DeviceCrypto",
    "DeviceList",
    "E2EConfig",
    "E2ENotice",
    "Event",
    "IdentityKeyChanged",
    "IncompatibleProtocol",
    "KeysExhausted",
    "Message",
    "PigeonClient",
    "Progress",
    "RateLimited",
    "ReadState",
    "Receipt",
    "RotationPolicy",
    "SendResult",
    "TlsFailed",
    "ToDevice",
    "Unreadable",
    "UploadFailed",
    "WaitingForKey",
    "find_user",
    "list_devices",
    "login",
    "register",
    "revoke_device",
]
