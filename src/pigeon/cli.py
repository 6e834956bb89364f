"""`pigeon serve | bench | ...`: the command line."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from pigeon.config import load_settings
from pigeon.logs import setup_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Pigeon messaging server.")
log = logging.getLogger("pigeon")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded store lives.")] = None,
    config: Annotated[Path | None, typer.Option(help="Optional TOML settings file.")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Processes sharing the port (needs PostgreSQL + Redis).")
    ] = 1,
) -> None:
    """Run the server until SIGTERM/SIGINT (then close connections with 1001 and drain)."""
    from aiohttp import web

    from pigeon.app import create_app, runner_options
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
    _tune_gc(settings.gc_threshold)
    log.info(
        "pigeon listening on %s:%d (data in %s)", settings.host, settings.port, settings.data_dir
    )
    web.run_app(
        app_,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=10.0,
        **runner_options(settings),
        backlog=settings.gateway.backlog,
        reuse_port=settings.gateway.reuse_port or None,
    )


def _tune_gc(threshold: int) -> None:
    """Collect garbage less often, and never rescan what exists at start-up (modules, app)."""
    if threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(threshold, gen1, gen2)
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
    from pigeon.cli_client import login_cmd, send_cmd
    from pigeon.cli_push import push_app

    app.add_typer(bench_app, name="bench")
    app.add_typer(push_app, name="push")
    app.command("login")(login_cmd)
    app.command("send")(send_cmd)
    app()


if __name__ == "__main__":
    main()
