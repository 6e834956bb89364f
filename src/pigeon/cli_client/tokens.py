"""Device tokens saved by `pigeon login`, so that a person logs a machine in once.

Every `POST /v1/devices` creates a device, and a user may have only a few: a CLI that logged in
anew on every call would run out of slots by the fourth login. So `pigeon login` keeps the token
in the user's config dir (`$XDG_CONFIG_HOME/pigeon/tokens/`, else `~/.config/pigeon/tokens/`),
one file per server URL and username, readable by the user only (0600, in a 0700 directory),
replaced atomically (a crash never leaves half a file), and reuses it while the server accepts
it. The other client commands find their token here when none is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import msgspec


class SavedLogin(msgspec.Struct, frozen=True, kw_only=True):
    """One logged-in device of one user on one server, as saved on disk."""

    server: str
    username: str
    user: str
    device: str
    token: str
    device_name: str = ""
    saved_at: int = 0


def normalize_server(url: str) -> str:
    """The canonical spelling of a server's base URL (the key saved logins are filed under):
    `http://` when no scheme is given, scheme and host lowercased, no trailing slash, and a
    WebSocket URL as its HTTP base (`wss://h/v1/ws` is `https://h`: the same server)."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    scheme = _HTTP_SCHEME.get(parts.scheme.lower(), parts.scheme.lower())
    path = parts.path.rstrip("/").removesuffix("/v1/ws").rstrip("/")
    return f"{scheme}://{parts.netloc.lower()}{path}"


_HTTP_SCHEME = {"ws": "http", "wss": "https"}


def config_dir() -> Path:
    """Pigeon's directory in the user's config dir (XDG base directory spec)."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "pigeon"


_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")
_decode = msgspec.json.Decoder(SavedLogin).decode


class TokenStore:
    """The saved logins of this machine's user: load, list per server, save, delete."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or config_dir()) / "tokens"

    def path_for(self, server: str, username: str) -> Path:
        """The file of one user on one server (usernames are case-insensitive)."""
        server, name = normalize_server(server), username.lower()
        digest = hashlib.sha256(f"{server}\n{name}".encode()).hexdigest()[:10]
        host = _UNSAFE.sub("_", urlsplit(server).netloc) or "server"
        return self.root / f"{host}-{_UNSAFE.sub('_', name)}-{digest}.json"

    def load(self, server: str, username: str) -> SavedLogin | None:
        """The saved login of `username` on `server`, if any (an unreadable file counts as
        none: the next login replaces it)."""
        return self._read(self.path_for(server, username))

    def for_server(self, server: str) -> list[SavedLogin]:
        """Every saved login on `server`, by username."""
        server = normalize_server(server)
        found = [s for s in self.all() if s.server == server]
        return sorted(found, key=lambda s: s.username.lower())

    def all(self) -> list[SavedLogin]:
        """Every saved login, on any server."""
        if not self.root.is_dir():
            return []
        saved = (self._read(p) for p in self.root.glob("*.json"))
        return [s for s in saved if s is not None]

    def save(self, login: SavedLogin) -> Path:
        """Write (or replace) a login's file atomically, readable by the user only."""
        login = msgspec.structs.replace(
            login,
            server=normalize_server(login.server),
            saved_at=login.saved_at or int(time.time() * 1000),
        )
        target = self.path_for(login.server, login.username)
        for directory in (self.root.parent, self.root):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.format(msgspec.json.encode(login)) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._sync_dir()
        return target

    def delete(self, server: str, username: str) -> bool:
        """Forget a saved login; False if there was none."""
        try:
            self.path_for(server, username).unlink()
        except FileNotFoundError:
            return False
        self._sync_dir()
        return True

    def with_token(self, server: str, token: str) -> SavedLogin | None:
        """The saved login holding `token` on `server` (who a bare token belongs to)."""
        return next((s for s in self.for_server(server) if s.token == token), None)

    @staticmethod
    def _read(path: Path) -> SavedLogin | None:
        try:
            return _decode(path.read_bytes())
        except (OSError, msgspec.DecodeError):
            return None

    def _sync_dir(self) -> None:
        """Make the rename or unlink durable (best effort: not every filesystem allows it)."""
        with contextlib.suppress(OSError):
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
