"""`pigeon push-worker`, and `pigeon push dlq list|retry|drop`: running pushes apart from the
servers, and the operator's side of the push queue's dead letters.

`pigeon push-worker` is a push worker without an API (and, with `push.queue = "rabbitmq"`, a
relay from the outbox to RabbitMQ): a cluster pushes faster by adding such processes, on any
machine that reaches the store (and RabbitMQ), while `pigeon serve` processes serve clients. Its
one optional port serves its Prometheus metrics (`--metrics-address`).

A dead letter is a push that failed `push.max_attempts` times (a gateway down for long, a
rejected credential). The commands open the configured store directly, as `pigeon invite` does:
run them where `pigeon serve` runs, with its settings.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from pigeon.config import Settings, load_settings
from pigeon.domain.errors import PigeonError
from pigeon.ports import Clock, PushQueue, Store

if TYPE_CHECKING:
    from aiohttp import web

    from pigeon.app import PushParts
    from pigeon.metrics import ProcessMetrics

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


class _StartFailed(Exception):
    """A push worker could not start: said in one line."""


MetricsAddress = Annotated[
    str | None,
    typer.Option(
        help="Serve GET /metrics (Prometheus) on this host:port, e.g. 127.0.0.1:9464 "
        "(env PIGEON_METRICS__PUSH_WORKER_ADDRESS; default: no port at all).",
        metavar="HOST:PORT",
        show_default=False,
    ),
]


def push_worker(
    data_dir: DataDir = None, config: Config = None, metrics_address: MetricsAddress = None
) -> None:
    """Run a push worker (with `push.queue = "rabbitmq"`: the relay from the outbox and a
    consumer of RabbitMQ) until SIGTERM/SIGINT, without an API (only its metrics, if asked).
    More processes push faster; set `push.serve_runs_worker = false` on the servers to leave
    pushing to these. Needs the servers' settings and their push keys (`vapid.pem`,
    `push-webhook-secret`)."""
    from pigeon.cli import fail
    from pigeon.logs import setup_logging

    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    if metrics_address is not None:
        overrides["metrics"] = {"push_worker_address": metrics_address}
    settings = load_settings(config, **overrides)
    setup_logging(settings.log_level, settings.log_json)
    if not settings.push.enabled:
        raise fail("push is off (push.enabled = false): nothing to do")
    for key in (settings.vapid_key_file(), settings.webhook_secret_file()):
        if not key.exists():  # a key of its own would make every push fail to verify
            raise fail(f"{key} is missing: copy it from a node that ran `pigeon serve`")
    try:
        asyncio.run(_push_worker(settings))
    except _StartFailed as exc:
        raise fail(str(exc)) from None
    except PigeonError as exc:  # the store could not be opened
        raise fail(f"cannot start: {exc}") from None


async def _push_worker(settings: Settings) -> None:
    from pigeon.app import build_push, build_store
    from pigeon.metrics import ProcessMetrics
    from pigeon.services.clock import SystemClock

    stop = asyncio.Event()  # set by a signal from now on, even one during start-up
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = build_store(settings)
    await store.open()
    try:
        push = build_push(settings, store)
        if push.queue is None:
            raise _StartFailed("this store has no push queue")
        clock, metrics = SystemClock(), ProcessMetrics()
        metrics.watch_push_queue(push.queue, clock)  # its depth and lag, at each scrape
        exposition = await _serve_metrics(metrics, settings.metrics.push_worker_address)
        try:
            await _push_until(stop, settings, push, store, clock, metrics)
        finally:
            if exposition is not None:
                await exposition.cleanup()
            await metrics.aclose()
    finally:
        await store.aclose()


async def _push_until(
    stop: asyncio.Event,
    settings: Settings,
    push: PushParts,
    store: Store,
    clock: Clock,
    metrics: ProcessMetrics,
) -> None:
    """Open the senders, run the worker until `stop` is set, then stop it gracefully."""
    from pigeon.adapters.push.rabbitmq import masked
    from pigeon.app import start_push_worker, stop_push_worker

    log = logging.getLogger("pigeon")
    for sender in push.senders.values():
        await sender.open()
    try:
        p = settings.push
        try:
            worker = await start_push_worker(
                settings, push, store.push, clock, metrics=metrics, connect=True
            )
        except PigeonError:
            raise
        except Exception as exc:
            where = f" RabbitMQ at {masked(p.rabbitmq_url)}:" if p.queue == "rabbitmq" else ""
            raise _StartFailed(f"cannot start:{where} {exc or type(exc).__name__}") from exc
        log.info("pigeon push-worker running (queue: %s)", p.queue)
        await stop.wait()
        log.info("pigeon push-worker stopping (signal)")
        await stop_push_worker(settings, push, worker)
        log.info("pigeon push-worker stopped: %s", worker.counts)
    finally:
        for sender in push.senders.values():
            await sender.aclose()


async def _serve_metrics(metrics: ProcessMetrics, address: str | None) -> web.AppRunner | None:
    """Serve `GET /metrics` on `address` (host:port), or nothing when it is None."""
    from aiohttp import web

    from pigeon.config import split_address
    from pigeon.metrics import metrics_app

    if address is None:
        return None
    host, port = split_address(address)
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        why = os.strerror(exc.errno) if exc.errno else str(exc)  # not asyncio's long wording
        raise _StartFailed(f"cannot listen on {address} for metrics: {why}") from None
    bound_host, bound_port = runner.addresses[0][:2]
    logging.getLogger("pigeon").info(
        "pigeon push-worker metrics on http://%s:%d/metrics", bound_host, bound_port
    )
    return runner
