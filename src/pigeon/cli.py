"""`pigeon serve | bench | ...`: the command line."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pigeon import __version__
from pigeon.config import ConfigError, Settings, load_settings
from pigeon.domain.errors import PigeonError
from pigeon.logs import setup_logging

if TYPE_CHECKING:
    from aiohttp import web

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Pigeon messaging server.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
log = logging.getLogger("pigeon")
_DEFAULTS = Settings.model_construct()


def _about(name: str) -> str:
    """Where a `serve` option's value comes from when it is not given: env var and default."""
    return f"(env PIGEON_{name.upper()}, default {getattr(_DEFAULTS, name)})"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pigeon {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Pigeon messaging server."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """One line on stderr and a non-zero exit: how every command reports a start-up failure."""
    typer.echo(f"pigeon: error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help=f"Interface to bind {_about('host')}.")] = None,
    port: Annotated[int | None, typer.Option(help=f"TCP port {_about('port')}.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help=f"Where the embedded store lives {_about('data_dir')}.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML settings file (env vars override it).")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Processes sharing the port (needs PostgreSQL + Redis).")
    ] = 1,
) -> None:
    """Run the server until SIGTERM/SIGINT (then close connections with 1001 and drain).
    Every setting has an env var (PIGEON_<NAME>, sections PIGEON_<SECTION>__<NAME>): see
    `pigeon check-config` and docs/operations.md."""
    from pigeon.app import create_app
    from pigeon.supervisor import Supervisor, WorkersNeedSharedState, check_workers

    overrides: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v is not None
    }
    settings = load_settings(config, **overrides)
    setup_logging(settings.log_level, settings.log_json)
    if workers > 1:
        try:
            check_workers(settings, workers)
        except WorkersNeedSharedState as exc:
            raise typer.BadParameter(str(exc), param_hint="--workers") from exc
        args = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
        args += [f"--config={config}"] if config is not None else []
        raise typer.Exit(Supervisor(args, workers).run())
    _install_uvloop()
    app_ = create_app(settings)
    tune_gc(settings.gc_threshold, settings.gc_threshold_gen1)
    try:
        asyncio.run(_serve(app_, settings))
    except CannotListen as exc:  # the port is taken, or the address is not this machine's
        raise fail(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
    except (PigeonError, OSError) as exc:  # the store, bus, presence or data dir failed to open
        raise fail(f"cannot start: {exc}") from None


class CannotListen(Exception):
    """Binding the server's address failed (only that: other start-up failures differ)."""


async def _serve(app_: web.Application, settings: Settings) -> None:
    """Start the app, serve until SIGTERM or SIGINT, then shut down gracefully.

    Why not `web.run_app`: it turns each signal into an exception raised in the loop, so a second
    signal during the graceful shutdown (GNU `timeout` signals the process and its group: two
    SIGTERMs; an impatient operator) broke the shutdown with a traceback. Here a signal only
    sets an event, and the shutdown runs to its end once."""
    from aiohttp import web

    from pigeon.app import runner_options
    from pigeon.gateway.access_log import AccessLog

    runner = web.AppRunner(
        app_,
        handle_signals=False,
        access_log_class=AccessLog,
        access_log=logging.getLogger("pigeon.access") if settings.log_access else None,
        shutdown_timeout=10.0,
        **runner_options(settings),
    )
    stop = asyncio.Event()  # set by a signal from now on, even one during start-up
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()  # opens the store, blobs, bus and presence (on_startup)
        site = web.TCPSite(
            runner,
            settings.host,
            settings.port,
            backlog=settings.gateway.backlog,
            reuse_port=settings.gateway.reuse_port or None,
        )
        try:
            await site.start()
        except OSError as exc:
            raise CannotListen(exc.strerror or str(exc)) from None
        host, port = runner.addresses[0][:2]  # the port bound, if settings said 0
        log.info("pigeon listening on %s:%d (data in %s)", host, port, settings.data_dir)
        await stop.wait()
        log.info("pigeon stopping (signal)")
    finally:
        await runner.cleanup()


@app.command("check-config")
def check_config(
    config: Annotated[
        Path | None, typer.Option(help="TOML settings file (env vars override it).")
    ] = None,
) -> None:
    """Print the effective settings (defaults, then the file, then env vars) as JSON, secrets
    masked; a bad setting is one error line and exit status 2."""
    import json

    from pigeon.config import effective

    typer.echo(json.dumps(effective(load_settings(config)), indent=2, sort_keys=True))


def tune_gc(threshold: int, threshold_gen1: int) -> None:
    """Collect garbage less often, and never rescan what exists at start-up (modules, app)."""
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold or gen0, threshold_gen1 or gen1, gen2)
    gc.freeze()


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@app.command()
def invite(
    count: Annotated[int, typer.Option(min=1, max=10_000, help="How many codes.")] = 1,
    valid_days: Annotated[float, typer.Option(min=0.001, help="Days each code stays valid.")] = 7.0,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded store lives.")] = None,
    config: Annotated[Path | None, typer.Option(help="Optional TOML settings file.")] = None,
) -> None:
    """Print new single-use invite codes (for `registration = "invite"`), one per line. Opens
    the configured store directly: run it where `pigeon serve` runs, with its settings."""
    import asyncio

    from pigeon.adapters.bus.local import LocalBus
    from pigeon.app import build_store
    from pigeon.services.accounts import AccountService
    from pigeon.services.clock import SystemClock

    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    settings = load_settings(config, **overrides)

    async def make() -> list[str]:
        store = build_store(settings)
        await store.open()
        try:
            limits = settings.limits.to_limits()  # the bus is unused: no device changes
            accounts = AccountService(store.accounts, LocalBus(), SystemClock(), limits)
            try:
                return await accounts.create_invites(count, valid_days)
            finally:
                accounts.close()
        finally:
            await store.aclose()

    for code in asyncio.run(make()):
        typer.echo(code)


def main() -> None:
    """Entry point of the `pigeon` script."""
    from pigeon.bench.cli import bench_app
    from pigeon.cli_admin import admin_app
    from pigeon.cli_backup import backup, restore
    from pigeon.cli_client import add_commands
    from pigeon.cli_migrate import migrate_store
    from pigeon.cli_push import push_app, push_worker

    app.add_typer(bench_app, name="bench")
    app.add_typer(push_app, name="push")
    app.add_typer(admin_app, name="admin")
    app.command("push-worker")(push_worker)
    app.command("backup")(backup)
    app.command("restore")(restore)
    app.command("migrate-store")(migrate_store)
    add_commands(app)  # login, logout, send, listen, chats, download, devices
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"pigeon: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
