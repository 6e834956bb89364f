"""PostgreSQL implementation of `AccountStore`."""

from __future__ import annotations

import asyncpg

from pigeon.adapters.store.postgres.db import PgDb
from pigeon.domain.errors import Conflict, Forbidden, TooManyDevices
from pigeon.domain.models import Credentials, Device, User, Visibility
from pigeon.ports import AccountStore

_DEVICE_COLS = "id, user_id, name, created_at"


def _device(row: asyncpg.Record) -> Device:
    return Device(id=row[0], user_id=row[1], name=row[2], created_at=row[3])


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


_check: type[AccountStore] = PgAccounts
