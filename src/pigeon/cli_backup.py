"""`pigeon backup DIR` and `pigeon restore DIR`: a one-node deployment's data, copied safely.

Why a command and not `cp`: the SQLite file cannot be copied while the server writes it (the
copy would mix pages of different transactions, and miss what still sits in the WAL). SQLite's
online backup API reads one consistent snapshot inside one read transaction, which in WAL mode
never blocks the server's writer. The snapshot is taken first, then the blobs are copied: every
attachment the snapshot knows was uploaded before it, so its file is there to be copied (blobs
are immutable). The secrets (blob URL key, webhook key, VAPID key) go along: without them old
signed URLs and push subscriptions would stop working after a restore.

PostgreSQL deployments back up with PostgreSQL's own tools (pg_dump, or base backups with WAL
archiving); docs/operations.md says how.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pigeon.config import LocalBlobSettings, Settings, SqliteSettings, load_settings

DataDir = Annotated[Path | None, typer.Option(help="The server's data directory.")]
Config = Annotated[
    Path | None, typer.Option(help="TOML settings file (the server's, so paths agree).")
]
#: The database file's name inside a backup.
DB_NAME = "pigeon.db"
BLOBS = "blobs"


def _settings(data_dir: Path | None, config: Path | None) -> Settings:
    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    settings = load_settings(config, **overrides)
    if not isinstance(settings.store, SqliteSettings):
        raise _fail(
            "the store is PostgreSQL: back it up with pg_dump or base backups "
            "(docs/operations.md, Backup and restore)"
        )
    return settings


def _secrets(settings: Settings) -> list[Path]:
    return [settings.blob_secret_file(), settings.webhook_secret_file(), settings.vapid_key_file()]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"pigeon: error: {message}", err=True)
    return typer.Exit(1)


def _copy(source: str, target: str) -> None:
    """Copy one media file; one the retention sweep deleted meanwhile is skipped (its row went
    before it, so the snapshot may still name it: such an attachment answers 404 either way)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.copy2(source, target)


def snapshot(source: Path, target: Path) -> None:
    """Copy the database at `source` to a new file `target`, consistent as of one moment, while
    a server may be writing it."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # every page in one step: one read transaction, one snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
        finally:
            dst.close()
    finally:
        src.close()


def backup(
    target: Annotated[Path, typer.Argument(help="A new (or empty) directory for the backup.")],
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Copy the embedded deployment (database, media, keys) to TARGET, while it runs."""
    settings = _settings(data_dir, config)
    db = settings.sqlite_path()
    if not db.exists():
        raise _fail(f"no database at {db}")
    if target.exists() and any(target.iterdir()):
        raise _fail(f"{target} is not empty")
    target.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    snapshot(db, target / DB_NAME)
    blobs = settings.blob_dir()
    files = 0
    if isinstance(settings.blobs, LocalBlobSettings) and blobs.exists():
        # after the snapshot: every blob it refers to is already complete on disk
        shutil.copytree(
            blobs, target / BLOBS, ignore=shutil.ignore_patterns("partial"), copy_function=_copy
        )
        files = sum(1 for p in (target / BLOBS).rglob("*") if p.is_file())
    for secret in _secrets(settings):
        if secret.exists():
            shutil.copy2(secret, target / secret.name)
    size = (target / DB_NAME).stat().st_size
    typer.echo(
        f"backed up {db} ({size / 2**20:.1f} MiB) and {files} media files to {target} "
        f"in {time.monotonic() - started:.1f} s"
    )


def restore(
    source: Annotated[Path, typer.Argument(help="A directory made by `pigeon backup`.")],
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Put a backup in place of the (stopped) server's data. Refuses to overwrite a database."""
    settings = _settings(data_dir, config)
    if not (source / DB_NAME).is_file():
        raise _fail(f"{source} holds no {DB_NAME}: not a backup")
    db = settings.sqlite_path()
    # a WAL left by the old database would be replayed onto the restored one
    leftovers = [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]
    if leftovers:
        raise _fail(f"{leftovers[0]} exists: stop the server and move its database files away")
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / DB_NAME, db)
    if (source / BLOBS).is_dir() and isinstance(settings.blobs, LocalBlobSettings):
        shutil.copytree(source / BLOBS, settings.blob_dir(), dirs_exist_ok=True)
    for secret in _secrets(settings):
        if (source / secret.name).exists() and not secret.exists():
            secret.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / secret.name, secret)
    typer.echo(f"restored {source} into {db.parent}; start the server")
