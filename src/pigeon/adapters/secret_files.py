"""Secrets kept in files of the data directory (the blob URL key, the webhook key, the VAPID key).

Every process of a node, and every restart, must use the same secret, so it is made once: written
aside in full (mode 0600, fsynced), then linked into place. Linking fails if another process got
there first, and every process then reads the first one's file; none ever sees a partial one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def create_exclusively(path: Path, content: bytes) -> None:
    """Write `path` with `content` (mode 0600) unless it exists, never leaving it partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        _sync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def load_or_create_secret(path: Path) -> bytes:
    """The random key kept in `path` (hex), created (32 bytes) if missing."""
    if not path.exists():
        create_exclusively(path, secrets.token_bytes(32).hex().encode())
    secret = bytes.fromhex(path.read_text().strip())
    if len(secret) < 32:
        raise ValueError(f"{path}: the secret must be at least 32 bytes (64 hex digits)")
    return secret


def _sync_directory(directory: Path) -> None:
    """Make a new name in `directory` durable (POSIX; Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
