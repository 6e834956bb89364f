"""Async Python SDK for Pigeon: used by the CLI, the tests and the benchmark."""

from pigeon.client.client import ClientError, ConnectionLost, PigeonClient, SendResult
from pigeon.client.http import Account, login, register

__all__ = [
    "Account",
    "ClientError",
    "ConnectionLost",
    "PigeonClient",
    "SendResult",
    "login",
    "register",
]
