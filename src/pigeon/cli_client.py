"""`pigeon login` and `pigeon send`: talk to a running server from the shell (via the SDK)."""

from __future__ import annotations

import asyncio
import getpass
import time
from pathlib import Path
from typing import Annotated

import aiohttp
import typer

from pigeon.client import ClientError, PigeonClient, login
from pigeon.client.http import find_user
from pigeon.client.media import UploadFailed

Server = Annotated[str, typer.Option(envvar="PIGEON_SERVER", help="Base URL of the server.")]


def login_cmd(
    username: Annotated[str, typer.Option(help="Account to log in.")],
    password: Annotated[
        str | None, typer.Option(help="Asked on the terminal when not given.")
    ] = None,
    server: Server = "http://127.0.0.1:8080",
    device_name: Annotated[str, typer.Option(help="Name of the new device.")] = "cli",
) -> None:
    """Log a new device in and print its token (use it as PIGEON_TOKEN for `pigeon send`)."""
    if password is None:  # prompt on the terminal, so that $(pigeon login ...) is the token
        password = getpass.getpass("Password: ")
    try:
        account = asyncio.run(login(server, username, password, device_name))
    except (ClientError, aiohttp.ClientError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(account.token)


def send_cmd(
    token: Annotated[str, typer.Option(envvar="PIGEON_TOKEN", help="A device token.")],
    to: Annotated[str | None, typer.Option(help="Username: send in the direct chat.")] = None,
    chat: Annotated[str | None, typer.Option(help="Chat id (e.g. a group).")] = None,
    text: Annotated[str | None, typer.Option(help="Message text (a caption with --file).")] = None,
    file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Send this file.")
    ] = None,
    content_type: Annotated[str | None, typer.Option(help="Override the guessed type.")] = None,
    server: Server = "http://127.0.0.1:8080",
) -> None:
    """Send a text or a file to a user or a chat; prints the message id and seq."""
    if (to is None) == (chat is None):
        raise typer.BadParameter("give exactly one of --to and --chat")
    if text is None and file is None:
        raise typer.BadParameter("give --text, --file or both")
    try:
        asyncio.run(_send(server, token, to, chat, text, file, content_type))
    except (ClientError, UploadFailed, aiohttp.ClientError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


async def _send(
    server: str,
    token: str,
    to: str | None,
    chat: str | None,
    text: str | None,
    file: Path | None,
    content_type: str | None,
) -> None:
    async with PigeonClient(server, token, reconnect=False) as client:
        if chat is None:
            assert to is not None
            chat = (await client.create_chat([await find_user(server, token, to)]))["id"]
        if file is None:
            sent = await client.send(chat, text)
        else:
            started = time.perf_counter()
            sent = await client.send_file(chat, file, text, content_type=content_type)
            mib = (await asyncio.to_thread(file.stat)).st_size / 2**20
            seconds = time.perf_counter() - started
            typer.echo(f"uploaded {mib:.1f} MiB in {seconds:.2f} s ({mib / seconds:.1f} MiB/s)")
        typer.echo(f"sent {sent.id} seq {sent.seq} in chat {chat}")
