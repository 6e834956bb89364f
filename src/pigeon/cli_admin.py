"""`pigeon admin`: the operator's commands, acting on the configured store directly.

users (list, create, disable, enable), devices (list, revoke), chats (list, show), stats,
invites (create, list), and the push dead letters (`push-dlq`, the same as `pigeon push dlq`).
Run them where `pigeon serve` runs, with its settings (`--config`, `--data-dir`, `PIGEON_*`),
as `pigeon invite` and `pigeon push dlq`: they open the store themselves, so they work whether
the server runs or not.

Disabling a user and revoking a device must also close live connections, which live in the
server's processes. The services publish their close frames on a bus; here that bus records
them, and once the store change is committed they are handed to the nodes: on the shared Redis
bus of a cluster (every node subscribed to the device's channel gets them), or, on one node
with the in-process bus, through that node's admin socket in the data dir (`gateway/hub.py`,
docs/architecture.md "Admin"). No server running: nothing is connected, nothing to close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import typer

from pigeon.cli import fail
from pigeon.cli_push import dlq_app
from pigeon.config import Settings, load_settings
from pigeon.domain.errors import PigeonError
from pigeon.ports import BusHandler, Subscription

if TYPE_CHECKING:
    from pigeon.services.admin import AdminService

T = TypeVar("T")

admin_app = typer.Typer(
    no_args_is_help=True,
    help="Operate the configured store: users, devices, chats, stats, invites, dead letters."
    " Run where `pigeon serve` runs, with its settings.",
)
users_app = typer.Typer(no_args_is_help=True, help="Accounts: list, create, disable, enable.")
devices_app = typer.Typer(no_args_is_help=True, help="A user's devices: list, revoke.")
chats_app = typer.Typer(no_args_is_help=True, help="Chats: list, show members.")
invites_app = typer.Typer(no_args_is_help=True, help="Invite codes (registration = invite).")
admin_app.add_typer(users_app, name="users")
admin_app.add_typer(devices_app, name="devices")
admin_app.add_typer(chats_app, name="chats")
admin_app.add_typer(invites_app, name="invites")
admin_app.add_typer(dlq_app, name="push-dlq")  # the same commands as `pigeon push dlq`

DataDir = Annotated[Path | None, typer.Option(help="Where the embedded store lives.")]
Config = Annotated[Path | None, typer.Option(help="Optional TOML settings file.")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
Name = Annotated[str, typer.Argument(help="A username (case-insensitive).")]
Limit = Annotated[int, typer.Option(min=1, max=100_000, help="At most this many.")]

_encode = msgspec.json.Encoder().encode


# -- reaching the running nodes ----------------------------------------------------------------


@dataclass
class _Outbox:
    """The `Bus` the commands' services publish on: it keeps the frames, which `_reach_nodes`
    hands to the running nodes once the store change is committed."""

    frames: list[tuple[str, bytes]] = field(default_factory=list)

    async def publish(self, channel: str, frame: bytes) -> None:
        self.frames.append((channel, frame))

    async def publish_many(
        self, items: list[tuple[str, bytes]], *, local_first: bool = False
    ) -> None:
        self.frames.extend(items)

    async def subscribe(self, channel: str, handler: BusHandler) -> Subscription:
        raise NotImplementedError("the admin commands only publish")

    def on_recovered(self, callback: Callable[[Collection[str]], None]) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def _reach_nodes(settings: Settings, frames: list[tuple[str, bytes]]) -> str:
    """Hand the close frames to the running nodes; says how (for the operator)."""
    from pigeon.gateway.hub import control_line, control_socket

    if settings.bus.type == "redis":
        from pigeon.app import build_bus

        bus = build_bus(settings)
        try:
            await bus.open()
            await bus.publish_many(frames)
        except PigeonError as exc:
            raise fail(
                f"done in the store, but the nodes could not be told through Redis ({exc}):"
                " live connections stay open until they reconnect"
            ) from None
        finally:
            await bus.aclose()
        return "connections closed on every node (through Redis)"
    path = control_socket(settings)
    assert path is not None
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.writelines(control_line(c, f) for c, f in frames)
                await writer.drain()
                replies = [await reader.readline() for _ in frames]
            finally:
                writer.close()
    except (FileNotFoundError, ConnectionRefusedError):
        return f"no server is running on {settings.data_dir} (no {path.name}): nothing to close"
    except (OSError, TimeoutError) as exc:
        raise fail(
            f"done in the store, but the server's admin socket {path} did not answer"
            f" ({exc or 'timed out'}): live connections stay open until they reconnect"
        ) from None
    if any(r != b"ok\n" for r in replies):
        raise fail(f"done in the store, but the server refused the close frames: {replies}")
    return "connections closed on the running server"


# -- running a command -------------------------------------------------------------------------


def _run(
    data_dir: Path | None, config: Path | None, work: Callable[[AdminService], Awaitable[T]]
) -> tuple[T, str | None]:
    """Open the configured store, run `work` with an `AdminService` on it, close the store,
    then hand the close frames the work published to the running nodes. Returns the work's
    result and, if it closed connections, how the nodes were told. A domain error (no such
    user, a name taken) is one line on stderr and exit status 1."""
    from argon2 import PasswordHasher

    from pigeon.app import build_push_queue, build_store
    from pigeon.services.accounts import AccountService
    from pigeon.services.admin import AdminService
    from pigeon.services.clock import SystemClock

    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    settings = load_settings(config, **overrides)
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib, parallelism=1
    )

    async def run() -> tuple[T, str | None]:
        store = build_store(settings)
        await store.open()
        outbox = _Outbox()
        clock = SystemClock()
        accounts = AccountService(
            store.accounts, outbox, clock, settings.limits.to_limits(), hasher
        )
        try:
            admin = AdminService(store, accounts, clock, build_push_queue(settings, store))
            value = await work(admin)
        finally:
            accounts.close()
            await store.aclose()
            # committed: the services publish only after their commit
            reached = await _reach_nodes(settings, outbox.frames) if outbox.frames else None
        return value, reached

    try:
        return asyncio.run(run())
    except PigeonError as exc:
        raise fail(exc.message) from None


def _when(ms: int | None) -> str:
    from pigeon.cli_client.render import when

    return "" if ms is None else when(ms)


def _table(header: list[str], rows: Iterable[list[str]]) -> None:
    from pigeon.cli_client.render import table

    rows = list(rows)
    if not rows:
        typer.echo("(none)")
        return
    for line in table(header, rows):
        typer.echo(line)


def _json_lines(items: Iterable[Any]) -> None:
    for item in items:
        typer.echo(_encode(item).decode())


# -- users -------------------------------------------------------------------------------------


@users_app.command("list")
def users_list(
    limit: Limit = 100,
    after: Annotated[
        str | None, typer.Option(help="Start after this username (the next page).")
    ] = None,
    as_json: Json = False,
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Users in name order: username, id, created, devices, disabled since."""
    users = _run(data_dir, config, lambda a: a.users(limit, after))[0]
    if as_json:
        _json_lines(users)
        return
    _table(
        ["USERNAME", "ID", "CREATED", "DEVICES", "DISABLED"],
        (
            [u.username, u.id, _when(u.created_at), str(u.devices), _when(u.disabled_at)]
            for u in users
        ),
    )


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="3-32 letters, digits, '_', '.' or '-'.")],
    password: Annotated[
        str | None, typer.Option(help="Asked on the terminal (twice) when not given.")
    ] = None,
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Create an account (whatever the registration mode: no invite needed)."""
    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    user = _run(data_dir, config, lambda a: a.create_user(username, password))[0]
    typer.echo(f"created {user.username} ({user.id})")


@users_app.command("disable")
def users_disable(username: Name, data_dir: DataDir = None, config: Config = None) -> None:
    """Disable an account: no login, no token, live connections closed (4504).

    Their devices, messages and chats are kept: `enable` gives everything back. Others may
    still write to them (messages wait, as for an offline user)."""
    (record, devices), reached = _run(data_dir, config, lambda a: a.disable(username))
    typer.echo(f"disabled {record.username} ({record.id}), {len(devices)} devices")
    if reached is not None:
        typer.echo(reached)


@users_app.command("enable")
def users_enable(username: Name, data_dir: DataDir = None, config: Config = None) -> None:
    """Enable a disabled account again: its password and its devices' tokens work again."""
    record = _run(data_dir, config, lambda a: a.enable(username))[0]
    typer.echo(f"enabled {record.username} ({record.id})")


# -- devices -----------------------------------------------------------------------------------


@devices_app.command("list")
def devices_list(
    username: Name, as_json: Json = False, data_dir: DataDir = None, config: Config = None
) -> None:
    """A user's devices, oldest first: id, name, logged in at."""
    devices = _run(data_dir, config, lambda a: a.devices(username))[0]
    if as_json:
        _json_lines(devices)
        return
    _table(["ID", "NAME", "CREATED"], ([d.id, d.name, _when(d.created_at)] for d in devices))


@devices_app.command("revoke")
def devices_revoke(
    username: Name,
    device: Annotated[str, typer.Argument(help="Device id (see `devices list`).")],
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Revoke a device: its token stops working, its connection is closed (4502).

    Its inbox is deleted, which frees a device slot."""
    _, reached = _run(data_dir, config, lambda a: a.revoke(username, device))
    typer.echo(f"revoked {device}")
    if reached is not None:
        typer.echo(reached)


# -- chats -------------------------------------------------------------------------------------


@chats_app.command("list")
def chats_list(
    user: Annotated[str | None, typer.Option(help="Only this user's chats.")] = None,
    limit: Limit = 100,
    as_json: Json = False,
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Chats, newest activity first: id, kind, name, members, messages sent, last activity."""
    chats = _run(data_dir, config, lambda a: a.chats(limit, user))[0]
    if as_json:
        _json_lines(chats)
        return
    _table(
        ["ID", "KIND", "NAME", "MEMBERS", "MESSAGES", "LAST ACTIVITY"],
        (
            [c.id, c.kind, c.name or "", str(c.members), str(c.last_seq), _when(c.last_activity_at)]
            for c in chats
        ),
    )


@chats_app.command("show")
def chats_show(
    chat_id: Annotated[str, typer.Argument(help="Chat id (see `chats list`).")],
    as_json: Json = False,
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """One chat and its members in join order: role, delivered and read marks (seq)."""
    (chat, members), _ = _run(data_dir, config, lambda a: a.chat(chat_id))
    if as_json:
        typer.echo(_encode({"chat": chat, "members": members}).decode())
        return
    name = f" {chat.name!r}" if chat.name else ""
    typer.echo(
        f"{chat.kind} chat{name} {chat.id}: created {_when(chat.created_at)},"
        f" {chat.last_seq} messages, last activity {_when(chat.last_activity_at)}"
    )
    _table(
        ["USERNAME", "USER ID", "ROLE", "DELIVERED", "READ"],
        ([m.username, m.user, m.role, str(m.delivered_seq), str(m.read_seq)] for m in members),
    )


# -- stats, invites ----------------------------------------------------------------------------


@admin_app.command("stats")
def stats(as_json: Json = False, data_dir: DataDir = None, config: Config = None) -> None:
    """What the store holds: users, devices, chats, messages, inboxes, push.

    Waiting inbox entries and the oldest one's age, push jobs pending and dead letters (where
    the store has a push queue). Counts every row: seconds on a large PostgreSQL database."""
    s = _run(data_dir, config, lambda a: a.stats())[0]
    if as_json:
        typer.echo(_encode(s).decode())
        return
    age = "-" if s.oldest_inbox_age is None else f"{s.oldest_inbox_age:.0f} s"
    rows = [
        ("users", f"{s.users} ({s.disabled_users} disabled)"),
        ("devices", str(s.devices)),
        ("chats", str(s.chats)),
        ("messages stored", f"{s.messages} ({s.bodies} with their body)"),
        ("inbox entries waiting", str(s.inbox_entries)),
        ("oldest unacked entry", age),
        ("push jobs pending", "-" if s.push_pending is None else str(s.push_pending)),
        ("dead letters", "-" if s.dead_letters is None else str(s.dead_letters)),
    ]
    for label, value in rows:
        typer.echo(f"{label + ':':<24}{value}")


@invites_app.command("create")
def invites_create(
    count: Annotated[int, typer.Option(min=1, max=10_000, help="How many codes.")] = 1,
    valid_days: Annotated[float, typer.Option(min=0.001, help="Days each code stays valid.")] = 7.0,
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Print new single-use invite codes, one per line (as `pigeon invite`).

    Only their hashes are stored: this is the one time they are shown."""
    for code in _run(data_dir, config, lambda a: a.create_invites(count, valid_days))[0]:
        typer.echo(code)


@invites_app.command("list")
def invites_list(as_json: Json = False, data_dir: DataDir = None, config: Config = None) -> None:
    """Invite codes neither used nor expired, by batch: made, valid until, how many.

    Codes are stored hashed, so the codes themselves cannot be listed."""
    batches = _run(data_dir, config, lambda a: a.invites())[0]
    if as_json:
        _json_lines(batches)
        return
    _table(
        ["CREATED", "EXPIRES", "UNUSED"],
        ([_when(b.created_at), _when(b.expires_at), str(b.count)] for b in batches),
    )
