"""Async Python SDK for Pigeon: used by the CLI, the tests, the benchmark and examples/.

Everything an application needs is importable from here: the connection (`PigeonClient`), the
REST calls (accounts and devices), the event types that `PigeonClient.events()` yields, and
the errors (`ClientError` and its kinds).
"""

from pigeon.client.client import PROTOCOL_VERSIONS, PigeonClient, SendResult
from pigeon.client.errors import ClientError, ConnectionLost, IncompatibleProtocol, TlsFailed
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
    "ChatUpdate",
    "ClientError",
    "ConnectionLost",
    "DeviceList",
    "Event",
    "IncompatibleProtocol",
    "KeysExhausted",
    "Message",
    "PigeonClient",
    "Progress",
    "ReadState",
    "Receipt",
    "SendResult",
    "TlsFailed",
    "ToDevice",
    "UploadFailed",
    "find_user",
    "list_devices",
    "login",
    "register",
    "revoke_device",
]
