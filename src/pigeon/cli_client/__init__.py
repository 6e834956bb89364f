"""The client side of the `pigeon` command: a person's way to use a server from the shell.

`login`/`logout` (the token is saved per user and server, see `tokens.py`), `send`, `listen`,
`chats`, `download` and `devices list|revoke`, all through the SDK. `add_commands` mounts them on
the main CLI (`pigeon.cli.main`).
"""

from __future__ import annotations

import typer


def add_commands(app: typer.Typer) -> None:
    """Register the client commands on the `pigeon` app."""
    from pigeon.cli_client import commands as c

    app.command("login")(c.login_cmd)
    app.command("logout")(c.logout_cmd)
    app.command("send")(c.send_cmd)
    app.command("listen")(c.listen_cmd)
    app.command("chats")(c.chats_cmd)
    app.command("download")(c.download_cmd)
    devices = typer.Typer(no_args_is_help=True, help="List or revoke your devices.")
    devices.command("list")(c.devices_list_cmd)
    devices.command("revoke")(c.devices_revoke_cmd)
    app.add_typer(devices, name="devices")
