"""Registration modes: open, invite (single-use codes from `pigeon invite`), closed."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import pytest

from pigeon.client import ClientError
from pigeon.client.http import register
from pigeon.gateway.keys import SERVICES, SETTINGS
from tests.conftest import PASSWORD, Server, ServerFactory, store_env


async def _register(server: Server, username: str, invite: str | None) -> int:
    body = {"username": username, "password": PASSWORD, "invite": invite}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/v1/users", json=body) as resp,
    ):
        return resp.status


async def test_closed_registration_refuses_everyone(make_server: ServerFactory) -> None:
    server = await make_server(registration="closed")
    with pytest.raises(ClientError) as err:
        await register(server.url, "hopeful", PASSWORD)
    assert err.value.code == "forbidden"


async def test_invite_codes_are_single_use(make_server: ServerFactory) -> None:
    server = await make_server(registration="invite")
    assert await _register(server, "no_code", None) == 403
    (code,) = await server.app[SERVICES].accounts.create_invites(1, 1.0)
    assert await _register(server, "first_in", code) == 201
    assert await _register(server, "second_in", code) == 403


async def test_the_invite_command_prints_codes_the_server_accepts(
    make_server: ServerFactory,
) -> None:
    server = await make_server(registration="invite")
    settings = server.app[SETTINGS]
    env = {**os.environ, "PIGEON_DATA_DIR": str(settings.data_dir)}
    env |= store_env(settings)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from pigeon.cli import main; main()",
        "invite",
        "--count",
        "2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    codes = out.decode().split()
    assert len(codes) == 2
    assert await _register(server, "by_cli", codes[0]) == 201
