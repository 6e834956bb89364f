"""REST calls of the SDK: registration, device login, device management.

Each takes the server's URL in any form `PigeonClient` takes (http, https, ws, wss) and, for a
server whose certificate a private CA signed, that CA's bundle as `ca_file` (endpoint.py).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from pigeon.client.endpoint import CaFile, endpoint, tls_errors
from pigeon.client.errors import ClientError


class Account(msgspec.Struct, frozen=True):
    """A logged-in device: what a client needs to connect."""

    user: str
    device: str
    token: str


async def _call(
    method: str,
    base_url: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    ca_file: CaFile | None = None,
) -> Any:
    server = endpoint(base_url, ca_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with tls_errors():
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method, server.base + path, json=body, headers=headers, ssl=server.ssl
            ) as resp,
        ):
            data = await resp.read()
    if resp.status >= 400:
        err = msgspec.json.decode(data) if data else {}
        raise ClientError(err.get("code", "http_error"), err.get("message", str(resp.status)))
    return msgspec.json.decode(data) if data else None


async def register(
    base_url: str, username: str, password: str, *, ca_file: CaFile | None = None
) -> str:
    """Create a user; returns the user id."""
    body = {"username": username, "password": password}
    doc = await _call("POST", base_url, "/v1/users", body, ca_file=ca_file)
    return str(doc["id"])


async def login(
    base_url: str,
    username: str,
    password: str,
    device_name: str = "sdk",
    *,
    ca_file: CaFile | None = None,
) -> Account:
    """Log a new device in."""
    body = {"username": username, "password": password, "device_name": device_name}
    doc = await _call("POST", base_url, "/v1/devices", body, ca_file=ca_file)
    return Account(user=doc["user"], device=doc["device"], token=doc["token"])


async def list_devices(
    base_url: str, token: str, *, ca_file: CaFile | None = None
) -> list[dict[str, Any]]:
    """The devices of the token's user."""
    doc = await _call("GET", base_url, "/v1/devices", token=token, ca_file=ca_file)
    return list(doc["devices"])


async def revoke_device(
    base_url: str, token: str, device_id: str, *, ca_file: CaFile | None = None
) -> None:
    """Revoke one of the user's devices."""
    await _call("DELETE", base_url, f"/v1/devices/{device_id}", token=token, ca_file=ca_file)


async def find_user(
    base_url: str, token: str, username: str, *, ca_file: CaFile | None = None
) -> str:
    """A user's id by username."""
    doc = await _call("GET", base_url, f"/v1/users/{username}", token=token, ca_file=ca_file)
    return str(doc["id"])
