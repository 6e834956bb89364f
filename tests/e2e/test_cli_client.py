"""The client commands as a person uses them: `pigeon` run as a process against a real server,
with its own config dir. Logging in twice makes one device, logout revokes it, `listen` prints
and acks what `send` sent, and every failure is one line on stderr."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pigeon.bench.server import free_port
from pigeon.client import ClientError, list_devices, login
from tests.conftest import PASSWORD, STACK, Server

# The command line is a client of the protocol: the store behind the server does not matter.
pytestmark = pytest.mark.skipif(STACK != "embedded", reason="the same on every stack")

PIGEON = [sys.executable, "-c", "from pigeon.cli import main; main()"]


@dataclass
class Result:
    """What one `pigeon` process did."""

    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The one `pigeon: error:` line of a failed command (and nothing else on stderr)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 1, self
        assert len(lines) == 1 and lines[0].startswith("pigeon: error: "), self
        return lines[0]


class Cli:
    """`pigeon` as a subprocess, with its own home and config dir (where tokens are saved)."""

    def __init__(self, server: Server, home: Path, *, xdg: bool = True) -> None:
        self.home = home
        self.config = home / "config" if xdg else home / ".config"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PIGEON_", "XDG_"))}
        self.env |= {"HOME": str(home), "PIGEON_SERVER": server.url, "PIGEON_LOG_JSON": "false"}
        if xdg:
            self.env["XDG_CONFIG_HOME"] = str(self.config)

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *PIGEON,
            *args,
            env=self.env,
            cwd=self.home,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def run(self, *args: str, ok: bool = True) -> Result:
        return await finish(await self.start(*args), ok=ok)

    def saved(self) -> list[Path]:
        return sorted((self.config / "pigeon" / "tokens").glob("*.json"))


async def finish(proc: asyncio.subprocess.Process, *, ok: bool = True) -> Result:
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    except TimeoutError:  # e.g. a listen --count that never hears enough: do not leave it
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(), err.decode())
    if ok:
        assert result.code == 0, result
        assert "Traceback" not in result.err, result
    return result


async def line_of(stream: asyncio.StreamReader | None, timeout: float = 20.0) -> str:
    assert stream is not None
    async with asyncio.timeout(timeout):
        return (await stream.readline()).decode()


async def test_login_reuses_its_token_and_logout_revokes_it(server: Server, tmp_path: Path) -> None:
    name, _ = await server.user("alice")
    cli = Cli(server, tmp_path / "laptop")
    first = (await cli.run("login", "-u", name, "--password", PASSWORD)).out.strip()
    again = await cli.run("login", "-u", name, "--password", "not asked: the token still works")
    assert again.out.strip() == first and "reused" in again.err
    assert len(await list_devices(server.url, first)) == 1  # one device, not two
    [saved] = cli.saved()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and first in saved.read_text()

    # A second machine (config in ~/.config: no XDG_CONFIG_HOME there) logs in a second device.
    phone = Cli(server, tmp_path / "phone", xdg=False)
    phone_token = (await phone.run("login", "-u", name, "--password", PASSWORD)).out.strip()
    assert len(phone.saved()) == 1 and phone_token != first
    rows = (await cli.run("devices", "list")).out.splitlines()
    assert len(rows) == 3 and rows[0].split() == ["ID", "NAME", "CREATED"]
    [mine] = [row for row in rows if row.endswith("this device")]
    [phone_device] = [row.split()[0] for row in rows[1:] if row != mine]

    revoked = await cli.run("devices", "revoke", phone_device)
    assert revoked.out.strip() == f"revoked {phone_device}"
    assert len(await list_devices(server.url, first)) == 1
    refused = await phone.run("chats", ok=False)  # its saved token is dead now
    assert refused.error_line == "pigeon: error: unauthorized: token refused"
    relogged = await phone.run("login", "-u", name, "--password", PASSWORD)  # so: a new device
    assert relogged.out.strip() not in (phone_token, first)

    assert "logged out" in (await cli.run("logout")).err
    assert cli.saved() == []
    with pytest.raises(ClientError) as err:
        await list_devices(server.url, first)
    assert err.value.code == "unauthorized"
    gone = await cli.run("chats", ok=False)
    assert gone.error_line.startswith(f"pigeon: error: not logged in to {server.url}")


async def test_listen_prints_and_acks_what_send_sent(server: Server, tmp_path: Path) -> None:
    alice, _ = await server.user("alice")
    bob, _ = await server.user("bob")
    cli = Cli(server, tmp_path / "home")  # one machine, both users logged in: -u says who
    await asyncio.gather(
        cli.run("login", "-u", bob, "--password", PASSWORD),
        cli.run("login", "-u", alice, "--password", PASSWORD),
    )
    listener = await cli.start("listen", "-u", bob, "--count", "2")
    note = tmp_path / "home" / "note.txt"
    note.write_bytes(b"meet at 8\n")
    await cli.run("send", "-u", alice, "--to", bob, "--text", "hello bob")
    sent = await cli.run("send", "-u", alice, "--to", bob, "--file", str(note), "--text", "a note")
    chat = sent.out.split()[-1]

    heard = await finish(listener)
    assert f"listening as {bob}" in heard.err
    lines = heard.out.splitlines()
    assert lines[0].startswith(f"chat    {chat} created by {alice}: direct")
    assert lines[1] == f"message {chat} #1 {alice}: hello bob"
    assert lines[2].startswith(f"message {chat} #2 {alice}: a note [attachment ")
    assert "note.txt, text/plain, 10 B]" in lines[2] and len(lines) == 3
    attachment = lines[2].split("[attachment ")[1].split(":")[0]

    copy = tmp_path / "copy.txt"
    sha256 = hashlib.sha256(note.read_bytes()).hexdigest()
    got = await cli.run("download", "-u", bob, attachment, str(copy), "--sha256", sha256)
    assert got.out.strip() == f"saved 10 bytes to {copy}, sha256 checked"
    assert copy.read_bytes() == note.read_bytes()

    # All of it was acked: a new listener of the same device hears only what comes next.
    listener = await cli.start("listen", "-u", bob, "--json")
    assert "listening as" in await line_of(listener.stderr)
    sender = await server.client(await login(server.url, alice, PASSWORD))
    await sender.send(chat, "third")
    event = json.loads(await line_of(listener.stdout))
    if event["type"] == "device_list":  # alice's new login, announced to her chat partners
        assert (event["user"], event["change"]) == (sender.user, "added")
        event = json.loads(await line_of(listener.stdout))
    assert (event["type"], event["seq"], event["body"]) == ("message", 3, "third")
    listener.send_signal(signal.SIGTERM)
    assert (await finish(listener)).out == ""

    rows = (await cli.run("chats", "-u", bob)).out.splitlines()
    assert rows[0].split() == ["ID", "KIND", "WITH", "/", "NAME", "UNREAD", "LAST", "MESSAGE"]
    assert rows[1].split() == [chat, "direct", alice, "3", f"{alice}:", "third"]


async def test_failures_are_one_line(server: Server, tmp_path: Path) -> None:
    name, _ = await server.user("alice")
    token = (await login(server.url, name, PASSWORD)).token
    # the cases run at once: the two that connect a WebSocket use devices of their own (a
    # device's newer connection replaces its older one, 4503)
    other = (await login(server.url, name, PASSWORD)).token
    cli = Cli(server, tmp_path)
    down = f"http://127.0.0.1:{free_port()}"
    cases = {
        ("chats", "--token", "nope"): "unauthorized: token refused",
        ("send", "--token", token, "--to", "nobody", "--text", "hi"): "not_found: no such user",
        ("login", "-u", name, "--password", "wrong horse"): "unauthorized: wrong username",
        ("download", "--token", other, "01M8CJRSE7AC9NVSRRJ1T94KD3", "x"): "not_found",
        ("listen", "--server", down, "--token", token): f"cannot reach {down}",
        ("devices", "list", "--server", down, "--token", token): f"cannot reach {down}",
    }
    results = await asyncio.gather(*(cli.run(*args, ok=False) for args in cases))
    for expected, result in zip(cases.values(), results, strict=True):
        assert result.error_line.startswith(f"pigeon: error: {expected}")
