"""SQLite implementation of `AccountStore`."""

from __future__ import annotations

import sqlite3

from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.adapters.store.sqlite.inbox import take
from pigeon.domain.errors import Conflict, Forbidden, TooManyDevices
from pigeon.domain.models import Credentials, Device, User, Visibility
from pigeon.ports import AccountCounts, AccountRecord, AccountStore, DeviceStatus, InviteBatch

#: A user's record: the row and its device count (`AccountRecord`).
_RECORD = (
    "SELECT u.id, u.username, u.created_at,"
    " (SELECT count(*) FROM devices d WHERE d.user_id = u.id), u.disabled_at FROM users u"
)
#: Disable (keeping the first time) or, with NULL, enable.
_SET_DISABLED = (
    "UPDATE users SET disabled_at = CASE WHEN ?2 IS NULL THEN NULL"
    " ELSE coalesce(disabled_at, ?2) END WHERE id = ?1 RETURNING 1"
)
_STATUS = (
    "SELECT d.id, d.user_id, d.name, d.created_at, u.disabled_at"
    " FROM devices d JOIN users u ON u.id = d.user_id"
)


def _record(r: tuple[str, str, int, int, int | None]) -> AccountRecord:
    return AccountRecord(id=r[0], username=r[1], created_at=r[2], devices=r[3], disabled_at=r[4])


def _status(r: tuple[str, str, str, int, int | None] | None) -> DeviceStatus | None:
    if r is None:
        return None
    device = Device(id=r[0], user_id=r[1], name=r[2], created_at=r[3])
    return DeviceStatus(device=device, disabled_at=r[4])


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
            take(conn, device_id)  # its entries go, their messages are released
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

    async def set_disabled(self, user_id: str, at: int | None) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            return conn.execute(_SET_DISABLED, (user_id, at)).fetchone() is not None

        return await self._db.write(tx)

    async def device_status(self, device_id: str) -> DeviceStatus | None:
        return await self._db.read(
            lambda conn: _status(conn.execute(f"{_STATUS} WHERE d.id = ?", (device_id,)).fetchone())
        )

    async def device_status_by_token(self, token_hash: bytes) -> DeviceStatus | None:
        return await self._db.read(
            lambda conn: _status(
                conn.execute(f"{_STATUS} WHERE d.token_hash = ?", (token_hash,)).fetchone()
            )
        )

    async def account(self, username: str) -> AccountRecord | None:
        def q(conn: sqlite3.Connection) -> AccountRecord | None:
            sql = f"{_RECORD} WHERE u.username_key = ?"
            row = conn.execute(sql, (username.casefold(),)).fetchone()
            return None if row is None else _record(row)

        return await self._db.read(q)

    async def list_accounts(self, limit: int, after: str | None = None) -> list[AccountRecord]:
        def q(conn: sqlite3.Connection) -> list[AccountRecord]:
            sql = f"{_RECORD} WHERE u.username_key > ? ORDER BY u.username_key LIMIT ?"
            rows = conn.execute(sql, ((after or "").casefold(), limit)).fetchall()
            return [_record(r) for r in rows]

        return await self._db.read(q)

    async def list_invites(self, now: int) -> list[InviteBatch]:
        def q(conn: sqlite3.Connection) -> list[InviteBatch]:
            rows = conn.execute(
                "SELECT created_at, expires_at, count(*) FROM invites WHERE expires_at > ?"
                " GROUP BY created_at, expires_at ORDER BY expires_at, created_at",
                (now,),
            ).fetchall()
            return [InviteBatch(created_at=r[0], expires_at=r[1], count=r[2]) for r in rows]

        return await self._db.read(q)

    async def account_counts(self) -> AccountCounts:
        def q(conn: sqlite3.Connection) -> AccountCounts:
            users, disabled = conn.execute(
                "SELECT count(*), count(disabled_at) FROM users"
            ).fetchone()
            (devices,) = conn.execute("SELECT count(*) FROM devices").fetchone()
            return AccountCounts(users=users, disabled=disabled, devices=devices)

        return await self._db.read(q)


_check: type[AccountStore] = SqliteAccounts
