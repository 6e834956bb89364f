"""Async Python SDK for Pigeon: used by the CLI, the tests, the benchmark and examples/.

Everything an application needs is importable from here: the connection (`PigeonClient`), the
REST calls (accounts and devices) and the event types that `PigeonClient.events()` yields.
"""

from pigeon.client.client import ClientError, ConnectionLost, PigeonClient, SendResult
from pigeon.client.http import (
    Account,
    find_user,
    list_devices,
    login,
    register,
    revoke_device,
)
from pigeon.client.media import Progress, UploadFailed
from pigeon.domain.events import ChatUpdate, Event, Message, ReadState, Receipt
from pigeon.domain.models import Attachment

__all__ = [
    "Account",
    "Attachment",
    "ChatUpdate",
    "ClientError",
    "ConnectionLost",
    "Event",
    "Message",
    "PigeonClient",
    "Progress",
    "ReadState",
    "Receipt",
    "SendResult",
    "UploadFailed",
    "find_user",
    "list_devices",
    "login",
    "register",
    "revoke_device",
]
