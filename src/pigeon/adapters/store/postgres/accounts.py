"""PostgreSQL implementation of `AccountStore`."""

from __future__ import annotations

import asyncpg

from pigeon.adapters.store.postgres.db import PgDb
from pigeon.domain.errors import Conflict, Forbidden, TooManyDevices
from pigeon.domain.models import Credentials, Device, User, Visibility
from pigeon.ports import AccountCounts, AccountRecord, AccountStore, DeviceStatus, InviteBatch

_DEVICE_COLS = "id, user_id, name, created_at"
#: A user's record: the row and its device count (`AccountRecord`).
_RECORD = (
    "SELECT u.id, u.username, u.created_at,"
    " (SELECT count(*) FROM devices d WHERE d.user_id = u.id), u.disabled_at FROM users u"
)
#: Disable (keeping the first time) or, with NULL, enable.
_SET_DISABLED = (
    "UPDATE users SET disabled_at = CASE WHEN $2::bigint IS NULL THEN NULL"
    " ELSE coalesce(disabled_at, $2) END WHERE id = $1 RETURNING true"
)
_STATUS = (
    "SELECT d.id, d.user_id, d.name, d.created_at, u.disabled_at"
    " FROM devices d JOIN users u ON u.id = d.user_id"
)


def _device(row: asyncpg.Record) -> Device:
    return Device(id=row[0], user_id=row[1], name=row[2], created_at=row[3])


def _record(r: asyncpg.Record) -> AccountRecord:
    return AccountRecord(id=r[0], username=r[1], created_at=r[2], devices=r[3], disabled_at=r[4])


def _status(r: asyncpg.Record | None) -> DeviceStatus | None:
    return None if r is None else DeviceStatus(device=_device(r), disabled_at=r[4])


class PgAccounts:
    """Users and devices in PostgreSQL."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    async def create_user(
        self, user: User, password_hash: str, invite: bytes | None = None, at: int = 0
    ) -> None:
        async def tx(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                created = await conn.fetchval(
                    "INSERT INTO users (id, username, username_key, password_hash, created_at)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (username_key) DO NOTHING"
                    " RETURNING true",
                    user.id,
                    user.username,
                    user.username.casefold(),
                    password_hash,
                    user.created_at,
                )
                if not created:
                    raise Conflict(f"username {user.username!r} is taken")
                if invite is not None and not await conn.fetchval(
                    "DELETE FROM invites WHERE code_hash = $1 AND expires_at > $2 RETURNING true",
                    invite,
                    at,
                ):
                    raise Forbidden("unknown, used or expired invite code")

        await self._db.run(tx)

    async def add_invites(self, code_hashes: list[bytes], created_at: int, expires_at: int) -> None:
        await self._db.execute(
            "INSERT INTO invites (code_hash, created_at, expires_at)"
            " SELECT h, $2, $3 FROM unnest($1::bytea[]) AS h",
            code_hashes,
            created_at,
            expires_at,
        )

    async def credentials(self, username: str) -> Credentials | None:
        row = await self._db.fetchrow(
            "SELECT id, username, password_hash FROM users WHERE username_key = $1",
            username.casefold(),
        )
        if row is None:
            return None
        return Credentials(user_id=row[0], username=row[1], password_hash=row[2])

    async def get_users(self, user_ids: list[str]) -> list[User]:
        if not user_ids:
            return []
        rows = await self._db.fetch(
            "SELECT id, username, created_at FROM users WHERE id = ANY($1::text[])", user_ids
        )
        return [User(id=r[0], username=r[1], created_at=r[2]) for r in rows]

    async def user_by_name(self, username: str) -> User | None:
        row = await self._db.fetchrow(
            "SELECT id, username, created_at FROM users WHERE username_key = $1",
            username.casefold(),
        )
        return None if row is None else User(id=row[0], username=row[1], created_at=row[2])

    async def add_device(self, device: Device, token_hash: bytes, max_devices: int) -> None:
        async def tx(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                # The user's row lock serialises device additions, so the count is exact.
                await conn.execute(
                    "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE", device.user_id
                )
                count = await conn.fetchval(
                    "SELECT count(*) FROM devices WHERE user_id = $1", device.user_id
                )
                if count >= max_devices:
                    raise TooManyDevices(
                        f"at most {max_devices} devices per user; revoke one first"
                    )
                await conn.execute(
                    f"INSERT INTO devices ({_DEVICE_COLS}, token_hash) VALUES ($1, $2, $3, $4, $5)",
                    device.id,
                    device.user_id,
                    device.name,
                    device.created_at,
                    token_hash,
                )

        await self._db.run(tx)

    async def list_devices(self, user_id: str) -> list[Device]:
        rows = await self._db.fetch(
            f"SELECT {_DEVICE_COLS} FROM devices WHERE user_id = $1 ORDER BY created_at, id",
            user_id,
        )
        return [_device(r) for r in rows]

    async def revoke_device(self, user_id: str, device_id: str) -> bool:
        return bool(await self._db.fetchval("SELECT pigeon_revoke($1, $2)", user_id, device_id))

    async def device_by_token(self, token_hash: bytes) -> Device | None:
        row = await self._db.fetchrow(
            f"SELECT {_DEVICE_COLS} FROM devices WHERE token_hash = $1", token_hash
        )
        return None if row is None else _device(row)

    async def set_visibility(self, user_id: str, visibility: Visibility) -> None:
        await self._db.execute(
            "UPDATE users SET visibility = $1 WHERE id = $2", visibility, user_id
        )

    async def presence_settings(
        self, user_ids: list[str]
    ) -> dict[str, tuple[Visibility, int | None]]:
        if not user_ids:
            return {}
        rows = await self._db.fetch(
            "SELECT id, visibility, last_seen_at FROM users WHERE id = ANY($1::text[])", user_ids
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    async def set_last_seen(self, user_id: str, at: int) -> None:
        await self._db.execute(
            "UPDATE users SET last_seen_at = greatest(coalesce(last_seen_at, 0), $1) WHERE id = $2",
            at,
            user_id,
        )

    async def set_disabled(self, user_id: str, at: int | None) -> bool:
        return bool(await self._db.fetchval(_SET_DISABLED, user_id, at))

    async def device_status(self, device_id: str) -> DeviceStatus | None:
        return _status(await self._db.fetchrow(f"{_STATUS} WHERE d.id = $1", device_id))

    async def device_status_by_token(self, token_hash: bytes) -> DeviceStatus | None:
        return _status(await self._db.fetchrow(f"{_STATUS} WHERE d.token_hash = $1", token_hash))

    async def account(self, username: str) -> AccountRecord | None:
        row = await self._db.fetchrow(f"{_RECORD} WHERE u.username_key = $1", username.casefold())
        return None if row is None else _record(row)

    async def list_accounts(self, limit: int, after: str | None = None) -> list[AccountRecord]:
        rows = await self._db.fetch(
            f'{_RECORD} WHERE u.username_key COLLATE "C" > $1'
            ' ORDER BY u.username_key COLLATE "C" LIMIT $2',
            (after or "").casefold(),
            limit,
        )
        return [_record(r) for r in rows]

    async def list_invites(self, now: int) -> list[InviteBatch]:
        rows = await self._db.fetch(
            "SELECT created_at, expires_at, count(*) FROM invites WHERE expires_at > $1"
            " GROUP BY created_at, expires_at ORDER BY expires_at, created_at",
            now,
        )
        return [InviteBatch(created_at=r[0], expires_at=r[1], count=r[2]) for r in rows]

    async def account_counts(self) -> AccountCounts:
        row = await self._db.fetchrow(
            "SELECT (SELECT count(*) FROM users), (SELECT count(disabled_at) FROM users),"
            " (SELECT count(*) FROM devices)"
        )
        return AccountCounts(users=row[0], disabled=row[1], devices=row[2])


_check: type[AccountStore] = PgAccounts
