"""`pigeon push dlq list|retry|drop`: the operator's side of the push queue's dead letters.

A dead letter is a push that failed `push.max_attempts` times (a gateway down for long, a
rejected credential). The commands open the configured store directly, as `pigeon invite` does:
run them where `pigeon serve` runs, with its settings.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pigeon.config import load_settings
from pigeon.ports import PushQueue

T = TypeVar("T")
push_app = typer.Typer(no_args_is_help=True, help="Push notifications: the dead letters.")
dlq_app = typer.Typer(no_args_is_help=True, help="Pushes that failed every attempt.")
push_app.add_typer(dlq_app, name="dlq")

DataDir = Annotated[Path | None, typer.Option(help="Where the embedded store lives.")]
Config = Annotated[Path | None, typer.Option(help="Optional TOML settings file.")]
Ids = Annotated[list[int] | None, typer.Argument(help="Dead letter ids (see `list`).")]
All = Annotated[bool, typer.Option("--all", help="Every dead letter.")]


def _with_queue(
    data_dir: Path | None, config: Path | None, work: Callable[[PushQueue], Awaitable[T]]
) -> T:
    from pigeon.app import build_push_queue, build_store

    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    settings = load_settings(config, **overrides)

    async def run() -> T:
        store = build_store(settings)
        await store.open()
        try:
            queue = build_push_queue(settings, store)
            if queue is None:
                typer.echo("this store has no push queue (push is off, or not built for it)")
                raise typer.Exit(1)
            return await work(queue)
        finally:
            await store.aclose()

    return asyncio.run(run())


def _chosen(ids: list[int] | None, every: bool) -> list[int] | None:
    if every == bool(ids):
        raise typer.BadParameter("name dead letter ids, or give --all (not both)")
    return None if every else ids


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 100,
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Print the dead letters: id, when, device, chat, attempts, last error."""
    letters = _with_queue(data_dir, config, lambda q: q.dead_letters(limit))
    for d in letters:
        when = datetime.datetime.fromtimestamp(d.failed_at / 1000, datetime.UTC)
        typer.echo(
            f"{d.id}\t{when:%Y-%m-%d %H:%M:%S}Z\t{d.device}\t{d.chat}\t{d.attempts}\t{d.error}"
        )
    if not letters:
        typer.echo("no dead letters")


@dlq_app.command("retry")
def dlq_retry(
    ids: Ids = None, every: All = False, data_dir: DataDir = None, config: Config = None
) -> None:
    """Queue dead letters again, due now (with a fresh count of attempts)."""
    chosen = _chosen(ids, every)
    now = int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)
    n = _with_queue(data_dir, config, lambda q: q.retry_dead(chosen, now))
    typer.echo(f"{n} queued again")


@dlq_app.command("drop")
def dlq_drop(
    ids: Ids = None, every: All = False, data_dir: DataDir = None, config: Config = None
) -> None:
    """Forget dead letters."""
    chosen = _chosen(ids, every)
    n = _with_queue(data_dir, config, lambda q: q.drop_dead(chosen))
    typer.echo(f"{n} dropped")
