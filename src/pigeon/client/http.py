"""REST calls of the SDK: registration, device login, device management."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from pigeon.client.client import ClientError


class Account(msgspec.Struct, frozen=True):
    """A logged-in device: what a client needs to connect."""

    user: str
    device: str
    token: str


async def _call(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=headers) as resp,
    ):
        data = await resp.read()
        if resp.status >= 400:
            err = msgspec.json.decode(data) if data else {}
            raise ClientError(err.get("code", "http_error"), err.get("message", str(resp.status)))
        return msgspec.json.decode(data) if data else None


async def register(base_url: str, username: str, password: str) -> str:
    """Create a user; returns the user id."""
    doc = await _call("POST", f"{base_url}/v1/users", {"username": username, "password": password})
    return str(doc["id"])


async def login(base_url: str, username: str, password: str, device_name: str = "sdk") -> Account:
    """Log a new device in."""
    doc = await _call(
        "POST",
        f"{base_url}/v1/devices",
        {"username": username, "password": password, "device_name": device_name},
    )
    return Account(user=doc["user"], device=doc["device"], token=doc["token"])


async def list_devices(base_url: str, token: str) -> list[dict[str, Any]]:
    """The devices of the token's user."""
    doc = await _call("GET", f"{base_url}/v1/devices", token=token)
    return list(doc["devices"])


async def revoke_device(base_url: str, token: str, device_id: str) -> None:
    """Revoke one of the user's devices."""
    await _call("DELETE", f"{base_url}/v1/devices/{device_id}", token=token)


async def find_user(base_url: str, token: str, username: str) -> str:
    """A user's id by username."""
    doc = await _call("GET", f"{base_url}/v1/users/{username}", token=token)
    return str(doc["id"])
