"""SQLite implementation of `AccountStore`."""

from __future__ import annotations

import sqlite3

from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.adapters.store.sqlite.inbox import release_messages
from pigeon.domain.errors import Conflict, Forbidden, TooManyDevices
from pigeon.domain.models import Credentials, Device, User, Visibility
from pigeon.ports import AccountStore


class SqliteAccounts:
    """Users and devices in SQLite."""

    def __init__(self, db: SqliteDb) -> None:
        self._db = db

    async def create_user(
        self, user: User, password_hash: str, invite: bytes | None = None, at: int = 0
    ) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            key = user.username.casefold()
            if conn.execute("SELECT 1 FROM users WHERE username_key = ?", (key,)).fetchone():
                raise Conflict(f"username {user.username!r} is taken")
            if (
                invite is not None
                and not conn.execute(
                    "DELETE FROM invites WHERE code_hash = ? AND expires_at > ? RETURNING 1",
                    (invite, at),
                ).fetchone()
            ):
                raise Forbidden("unknown, used or expired invite code")
            conn.execute(
                "INSERT INTO users (id, username, username_key, password_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (user.id, user.username, key, password_hash, user.created_at),
            )

        await self._db.write(tx)

    async def add_invites(self, code_hashes: list[bytes], created_at: int, expires_at: int) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO invites (code_hash, created_at, expires_at) VALUES (?, ?, ?)",
                [(h, created_at, expires_at) for h in code_hashes],
            )

        await self._db.write(tx)

    async def credentials(self, username: str) -> Credentials | None:
        def q(conn: sqlite3.Connection) -> Credentials | None:
            row = conn.execute(
                "SELECT id, username, password_hash FROM users WHERE username_key = ?",
                (username.casefold(),),
            ).fetchone()
            return (
                None
                if row is None
                else Credentials(user_id=row[0], username=row[1], password_hash=row[2])
            )

        return await self._db.read(q)

    async def get_users(self, user_ids: list[str]) -> list[User]:
        def q(conn: sqlite3.Connection) -> list[User]:
            if not user_ids:
                return []
            marks = ",".join("?" * len(user_ids))
            rows = conn.execute(
                f"SELECT id, username, created_at FROM users WHERE id IN ({marks})", user_ids
            ).fetchall()
            return [User(id=r[0], username=r[1], created_at=r[2]) for r in rows]

        return await self._db.read(q)

    async def user_by_name(self, username: str) -> User | None:
        def q(conn: sqlite3.Connection) -> User | None:
            r = conn.execute(
                "SELECT id, username, created_at FROM users WHERE username_key = ?",
                (username.casefold(),),
            ).fetchone()
            return None if r is None else User(id=r[0], username=r[1], created_at=r[2])

        return await self._db.read(q)

    async def add_device(self, device: Device, token_hash: bytes, max_devices: int) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            (count,) = conn.execute(
                "SELECT count(*) FROM devices WHERE user_id = ?", (device.user_id,)
            ).fetchone()
            if count >= max_devices:
                raise TooManyDevices(f"at most {max_devices} devices per user; revoke one first")
            conn.execute(
                "INSERT INTO devices (id, user_id, name, token_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (device.id, device.user_id, device.name, token_hash, device.created_at),
            )

        await self._db.write(tx)

    async def list_devices(self, user_id: str) -> list[Device]:
        def q(conn: sqlite3.Connection) -> list[Device]:
            rows = conn.execute(
                "SELECT id, user_id, name, created_at FROM devices WHERE user_id = ?"
                " ORDER BY created_at, id",
                (user_id,),
            ).fetchall()
            return [Device(id=r[0], user_id=r[1], name=r[2], created_at=r[3]) for r in rows]

        return await self._db.read(q)

    async def revoke_device(self, user_id: str, device_id: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM devices WHERE id = ? AND user_id = ?", (device_id, user_id)
            ).fetchone()
            if row is None:
                return False
            counts: dict[str, int] = {}
            for (message_id,) in conn.execute(
                "SELECT message_id FROM inbox WHERE device_id = ? AND message_id IS NOT NULL",
                (device_id,),
            ):
                counts[message_id] = counts.get(message_id, 0) + 1
            conn.execute("DELETE FROM inbox WHERE device_id = ?", (device_id,))
            release_messages(conn, counts)
            conn.execute("DELETE FROM devices WHERE id = ?", (device_id,))
            return True

        return await self._db.write(tx)

    async def device_by_token(self, token_hash: bytes) -> Device | None:
        def q(conn: sqlite3.Connection) -> Device | None:
            r = conn.execute(
                "SELECT id, user_id, name, created_at FROM devices WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return None if r is None else Device(id=r[0], user_id=r[1], name=r[2], created_at=r[3])

        return await self._db.read(q)

    async def set_visibility(self, user_id: str, visibility: Visibility) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE users SET visibility = ? WHERE id = ?", (visibility, user_id)
            )
        )

    async def presence_settings(
        self, user_ids: list[str]
    ) -> dict[str, tuple[Visibility, int | None]]:
        def q(conn: sqlite3.Connection) -> dict[str, tuple[Visibility, int | None]]:
            if not user_ids:
                return {}
            marks = ",".join("?" * len(user_ids))
            rows = conn.execute(
                f"SELECT id, visibility, last_seen_at FROM users WHERE id IN ({marks})", user_ids
            )
            return {r[0]: (r[1], r[2]) for r in rows}

        return await self._db.read(q)

    async def set_last_seen(self, user_id: str, at: int) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE users SET last_seen_at = max(coalesce(last_seen_at, 0), ?) WHERE id = ?",
                (at, user_id),
            )
        )


_check: type[AccountStore] = SqliteAccounts
