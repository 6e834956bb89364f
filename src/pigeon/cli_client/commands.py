"""The client commands: `pigeon login | logout | send | listen | chats | download | devices`.

They talk to a running server through the SDK (`pigeon.client`), as any application would. Who
they act as: `--token`, else the saved login of `--username`, else `PIGEON_TOKEN`, else the one
saved login for `--server` (see `tokens.py`). `--server` takes http(s):// or ws(s):// URLs;
`--ca-file` (or `PIGEON_CA_FILE`) names the CA bundle of a server whose certificate a private CA
signed. Every failure is one line on stderr, `pigeon: error: ...`, and exit status 1: never a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import msgspec
import typer

from pigeon.cli import fail
from pigeon.cli_client import render
from pigeon.cli_client.tokens import SavedLogin, TokenStore, normalize_server
from pigeon.client import (
    ClientError,
    ConnectionLost,
    Event,
    Message,
    PigeonClient,
    TlsFailed,
    UploadFailed,
    find_user,
    list_devices,
    login,
    revoke_device,
)

T = TypeVar("T")
DEFAULT_SERVER = "http://127.0.0.1:8080"

Server = Annotated[
    str,
    typer.Option(envvar="PIGEON_SERVER", help="Base URL of the server (http, https, ws or wss)."),
]
CaFile = Annotated[
    Path | None,
    typer.Option(
        envvar="PIGEON_CA_FILE",
        help="PEM bundle of the CA that signed the server's certificate, when it is a private "
        "CA (trusted besides the system's).",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        help="A device token. Without it: the saved login of --username, else PIGEON_TOKEN, "
        "else the only saved login for --server.",
        show_default=False,
    ),
]
Username = Annotated[
    str | None,
    typer.Option(
        "--username", "-u", help="Act as this user (their saved login on --server).", metavar="NAME"
    ),
]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


@dataclass(frozen=True)
class Session:
    """Who a command acts as: a server, a token and, when the token was saved by `pigeon
    login`, that login (username, user and device ids)."""

    server: str
    token: str
    saved: SavedLogin | None
    ca_file: Path | None = None


def resolve(
    server: str, token: str | None, username: str | None, ca_file: Path | None = None
) -> Session:
    """Pick the token a command uses (order in the module docstring); exit with one error
    line if there is none."""
    store, server = TokenStore(), normalize_server(server)
    if token is None and username is not None:
        saved = store.load(server, username)
        if saved is None:
            raise fail(
                f"{username} is not logged in to {server}: "
                f"run `pigeon login --server {server} --username {username}`"
            )
        return Session(server, saved.token, saved, ca_file)
    token = token or os.environ.get("PIGEON_TOKEN") or None
    if token is not None:
        return Session(server, token, store.with_token(server, token), ca_file)
    saved_logins = store.for_server(server)
    if len(saved_logins) == 1:
        return Session(server, saved_logins[0].token, saved_logins[0], ca_file)
    if not saved_logins:
        raise fail(
            f"not logged in to {server}: run `pigeon login --server {server} --username NAME`"
            " (or pass --token or PIGEON_TOKEN)"
        )
    users = ", ".join(s.username for s in saved_logins)
    raise fail(f"several users are logged in to {server} ({users}): pass --username")


def run(coro: Coroutine[Any, Any, T], server: str) -> T:
    """Run a command's coroutine; any failure becomes one `pigeon: error:` line and exit 1."""
    try:
        return asyncio.run(coro)
    except TlsFailed as exc:
        hint = "; a private CA? give its bundle with --ca-file or PIGEON_CA_FILE"
        why = exc.reason + (hint if exc.untrusted else "")
        raise fail(f"cannot reach {server} over TLS: {why}") from None
    except ConnectionLost as exc:
        raise fail(f"cannot reach {server}: {_reason(exc.message)}") from None
    except ClientError as exc:
        raise fail(str(exc)) from None
    except UploadFailed as exc:  # blob storage's refusal, or a checksum mismatch (status 200)
        raise fail(f"transfer failed: {exc.body[:300] if exc.status == 200 else exc}") from None
    except TimeoutError:
        raise fail(f"{server} did not answer in time (is it a Pigeon server?)") from None
    except aiohttp.ClientConnectionError as exc:
        raise fail(f"cannot reach {server}: {_reason(str(exc))}") from None
    except (aiohttp.ClientError, msgspec.DecodeError) as exc:
        raise fail(f"unexpected answer from {server} (is it a Pigeon server?): {exc}") from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise fail(f"{exc.strerror or exc}{where}") from None


def _reason(message: str) -> str:
    """aiohttp's "Cannot connect to host h:p ssl:default [Connection refused]" without the
    repetition: the part in brackets, when there is one."""
    found = re.search(r"\[(.+)\]$", message)
    return found.group(1) if found else message


def note(message: str) -> None:
    """A line for the person at the terminal (stderr: stdout is for results)."""
    typer.echo(message, err=True)


async def connect(session: Session, *, auto_ack: bool = False) -> PigeonClient:
    """A connected client that fails at once (rather than retrying) if the server is down."""
    client = PigeonClient(
        session.server,
        session.token,
        ca_file=session.ca_file,
        reconnect=False,
        auto_ack=auto_ack,
    )
    await client.connect()
    return client


def names_for(server: str, me: str | None = None) -> render.Names:
    """Usernames of the users logged in on this machine (the only ones known without asking)."""

    def known() -> dict[str, str]:
        return {s.user: s.username for s in TokenStore().for_server(server)}

    return render.Names(known(), me, known)


# -- login, logout ---------------------------------------------------------------------------


def login_cmd(
    username: Annotated[str, typer.Option("--username", "-u", help="Account to log in.")],
    password: Annotated[
        str | None, typer.Option(help="Asked on the terminal when needed and not given.")
    ] = None,
    server: Server = DEFAULT_SERVER,
    device_name: Annotated[str, typer.Option(help="Name of the new device.")] = "cli",
    ca_file: CaFile = None,
) -> None:
    """Log in (once per machine) and print the device token.

    The token is saved in your config dir and reused while the server accepts it (no password
    needed then), so logging in again creates no new device."""
    store, server = TokenStore(), normalize_server(server)
    saved = store.load(server, username)
    if saved is not None and run(_accepted(server, saved.token, ca_file), server):
        note(f"logged in as {saved.username} (device {saved.device}, saved token reused)")
        typer.echo(saved.token)
        return
    if password is None:  # prompt on the terminal, so that $(pigeon login ...) is the token
        password = getpass.getpass("Password: ")
    account = run(login(server, username, password, device_name, ca_file=ca_file), server)
    try:
        path = store.save(
            SavedLogin(
                server=server,
                username=username,
                user=account.user,
                device=account.device,
                token=account.token,
                device_name=device_name,
            )
        )
        note(f"logged in as {username} (new device {account.device}, token saved in {path})")
    except OSError as exc:  # the login worked: still give the token, say why it is not kept
        note(f"pigeon: warning: token not saved: {exc.strerror or exc}: {exc.filename}")
    typer.echo(account.token)


async def _accepted(server: str, token: str, ca_file: Path | None) -> bool:
    """Whether the server still accepts a token (one cheap authenticated request)."""
    try:
        await list_devices(server, token, ca_file=ca_file)
    except ClientError as exc:
        if exc.code == "unauthorized":
            return False
        raise
    return True


def logout_cmd(
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    username: Username = None,
    ca_file: CaFile = None,
) -> None:
    """Revoke this device on the server and forget its saved token."""
    session = resolve(server, token, username, ca_file)
    revoked = run(_logout(session), session.server)
    if session.saved is not None:
        TokenStore().delete(session.server, session.saved.username)
    who = session.saved.username if session.saved is not None else "token"
    if revoked is None:
        note(f"{who}: the server had revoked this device already; saved token forgotten")
    else:
        note(f"logged out {who} (device {revoked} revoked)")


async def _logout(session: Session) -> str | None:
    """Revoke the session's device and return its id; None if the server had revoked it."""
    try:
        device = session.saved.device if session.saved is not None else None
        if device is None:
            device = await _identify(session)
        await revoke_device(session.server, session.token, device, ca_file=session.ca_file)
    except ClientError as exc:
        if session.saved is not None and exc.code in ("unauthorized", "not_found"):
            return None
        raise
    return device


async def _identify(session: Session) -> str:
    """The device id of a token no saved login knows (the server says it in `ready`)."""
    client = await connect(session)
    try:
        assert client.device is not None
        return client.device
    finally:
        await client.close()


# -- devices ---------------------------------------------------------------------------------


def devices_list_cmd(
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    username: Username = None,
    as_json: Json = False,
    ca_file: CaFile = None,
) -> None:
    """Your devices: id, name, when it was logged in; the one in use is marked."""
    session = resolve(server, token, username, ca_file)

    async def fetch() -> tuple[list[dict[str, Any]], str]:
        mine = session.saved.device if session.saved else await _identify(session)
        devices = await list_devices(session.server, session.token, ca_file=session.ca_file)
        return devices, mine

    devices, mine = run(fetch(), session.server)
    if as_json:
        for device in devices:
            typer.echo(json.dumps({**device, "this_device": device["id"] == mine}))
        return
    for line in render.device_rows(devices, mine):
        typer.echo(line)


def devices_revoke_cmd(
    device: Annotated[str, typer.Argument(help="Device id (see `pigeon devices list`).")],
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    username: Username = None,
    ca_file: CaFile = None,
) -> None:
    """Revoke one of your devices: its token stops working, its connection closes."""
    session = resolve(server, token, username, ca_file)
    revoked = revoke_device(session.server, session.token, device, ca_file=session.ca_file)
    run(revoked, session.server)
    if session.saved is not None and session.saved.device == device:
        TokenStore().delete(session.server, session.saved.username)
        note("that was this device: its saved token is forgotten")
    typer.echo(f"revoked {device}")


# -- chats, send, download -------------------------------------------------------------------


def chats_cmd(
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    username: Username = None,
    as_json: Json = False,
    ca_file: CaFile = None,
) -> None:
    """Your conversations, newest activity first.

    Columns: id, kind, with whom (or the group's name), unread count, last message."""
    session = resolve(server, token, username, ca_file)

    async def fetch() -> tuple[list[dict[str, Any]], str | None]:
        client = await connect(session)
        try:
            return await client.list_chats(), client.user
        finally:
            await client.close()

    chats, me = run(fetch(), session.server)
    if as_json:
        for chat in chats:
            typer.echo(json.dumps(chat))
        return
    if not chats:
        note("no chats yet")
        return
    for line in render.chat_rows(chats, names_for(session.server, me)):
        typer.echo(line)


def send_cmd(
    to: Annotated[str | None, typer.Option(help="Username: send in the direct chat.")] = None,
    chat: Annotated[str | None, typer.Option(help="Chat id (e.g. a group).")] = None,
    text: Annotated[str | None, typer.Option(help="Message text (a caption with --file).")] = None,
    file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Send this file.")
    ] = None,
    content_type: Annotated[str | None, typer.Option(help="Override the guessed type.")] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    username: Username = None,
    ca_file: CaFile = None,
) -> None:
    """Send a text or a file to a user or a chat; prints the message id and seq."""
    if (to is None) == (chat is None):
        raise fail("give exactly one of --to and --chat", 2)
    if text is None and file is None:
        raise fail("give --text, --file or both", 2)
    session = resolve(server, token, username, ca_file)
    run(_send(session, to, chat, text, file, content_type), session.server)


async def _send(
    session: Session,
    to: str | None,
    chat: str | None,
    text: str | None,
    file: Path | None,
    content_type: str | None,
) -> None:
    async with PigeonClient(
        session.server, session.token, ca_file=session.ca_file, reconnect=False
    ) as client:
        if chat is None:
            assert to is not None
            peer = await find_user(session.server, session.token, to, ca_file=session.ca_file)
            chat = (await client.create_chat([peer]))["id"]
        if file is None:
            sent = await client.send(chat, text)
        else:
            started = time.perf_counter()
            size = (await asyncio.to_thread(file.stat)).st_size
            with render.progress_bar(f"uploading {file.name}", size) as progress:
                sent = await client.send_file(
                    chat, file, text, content_type=content_type, progress=progress
                )
            seconds = max(time.perf_counter() - started, 1e-6)
            rate = size / 2**20 / seconds
            typer.echo(f"uploaded {render.size(size)} in {seconds:.2f} s ({rate:.1f} MiB/s)")
        typer.echo(f"sent {sent.id} seq {sent.seq} in chat {chat}")


def download_cmd(
    attachment: Annotated[str, typer.Argument(help="Attachment id (`pigeon listen` shows it).")],
    path: Annotated[Path, typer.Argument(help="Where to write the file.", dir_okay=False)],
    sha256: Annotated[
        str | None, typer.Option(help="Check the bytes against this SHA-256 (hex).")
    ] = None,
    thumbnail: Annotated[bool, typer.Option(help="The thumbnail instead of the file.")] = False,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    username: Username = None,
    ca_file: CaFile = None,
) -> None:
    """Download an attachment of a message you received (or sent) into a file."""
    session = resolve(server, token, username, ca_file)

    async def fetch() -> int:
        client = await connect(session)
        try:
            with render.progress_bar(f"downloading {path.name}") as progress:
                return await client.download(
                    attachment, path, thumbnail=thumbnail, sha256=sha256, progress=progress
                )
        finally:
            await client.close()

    written = run(fetch(), session.server)
    checked = ", sha256 checked" if sha256 else ""
    typer.echo(f"saved {written} bytes to {path}{checked}")


# -- listen ----------------------------------------------------------------------------------


def listen_cmd(
    count: Annotated[
        int | None, typer.Option(min=1, help="Exit after this many messages.", show_default=False)
    ] = None,
    as_json: Json = False,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    username: Username = None,
    ca_file: CaFile = None,
) -> None:
    """Print incoming messages, receipts and chat changes, one per line, and ack them.

    Runs until Ctrl-C or SIGTERM (or --count messages). What arrived while this device was
    offline comes first."""
    session = resolve(server, token, username, ca_file)
    run(_listen(session, count, as_json), session.server)


async def _listen(session: Session, count: int | None, as_json: bool) -> None:
    """Print events until stopped; a signal is a normal end (acks are flushed on the way)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    printer = asyncio.ensure_future(_print_events(session, count, as_json))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([printer, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        stopped.cancel()
        if not printer.done():
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printer
    if not printer.cancelled():
        printer.result()  # its error, if it failed


async def _print_events(session: Session, count: int | None, as_json: bool) -> None:
    client = await connect(session, auto_ack=True)  # acks what events() yields
    try:
        client.reconnect = True  # connected once: ride out restarts of the server from now on
        names = names_for(session.server, client.user)
        who = session.saved.username if session.saved else client.user
        note(f"listening as {who} on {session.server} (device {client.device}); Ctrl-C to stop")
        messages = 0
        async for event in client.events():
            if not isinstance(event, Event):  # an E2E notice: this CLI does not turn E2E on
                continue
            typer.echo(render.event_json(event) if as_json else render.event_line(event, names))
            if isinstance(event, Message):
                messages += 1
                if count is not None and messages >= count:
                    return
    finally:
        await client.close()  # flushes the acks of what was printed
