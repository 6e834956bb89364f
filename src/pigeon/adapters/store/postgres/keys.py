"""PostgreSQL implementation of `KeyStore`, and its schema (migration 10).

Why claims are safe on many nodes at once: a claim picks each device's first one-time key with
`FOR UPDATE SKIP LOCKED` and deletes it in the same statement, so a concurrent claimer skips
the row being taken and picks the next one (or, when every remaining key is being taken by
others, the fallback key: a valid answer). No two transactions can delete the same row.

Announcements and to-device messages are appended by `pigeon_append` (functions.py), which
locks the devices it writes to sorted by id, as every other writer of inboxes does. The key
tables hold their own row locks only, taken before any device lock and never after one.
"""

from __future__ import annotations

import asyncpg

from pigeon.adapters.store.postgres.db import PgDb
from pigeon.domain.errors import BadRequest, Conflict, NotFound, TooManyKeys
from pigeon.domain.events import Delivery, DeviceList, KeysExhausted, ToDevice, encode_event
from pigeon.domain.keys import (
    ClaimedKey,
    DeviceChange,
    DeviceIdentity,
    DeviceKeys,
    KeyCounts,
    OneTimeKey,
)
from pigeon.domain.models import Device
from pigeon.ports import KeyStore

#: Migration 10: end-to-end encryption. Keys go with their device (ON DELETE CASCADE: the
#: revocation's DELETE removes them); chats may be created encrypted.
V10 = """
CREATE TABLE device_keys (
    device_id text COLLATE "C" PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    curve25519 text NOT NULL,
    ed25519 text NOT NULL,
    bundle text NOT NULL,
    signature text NOT NULL,
    fallback_id text,
    fallback_key text,
    fallback_signature text,
    fallback_used boolean NOT NULL DEFAULT false,
    published_at bigint NOT NULL
);
CREATE TABLE one_time_keys (
    device_id text COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    key_id text COLLATE "C" NOT NULL,
    key text NOT NULL,
    signature text NOT NULL,
    PRIMARY KEY (device_id, key_id)
);
ALTER TABLE chats ADD COLUMN encrypted boolean NOT NULL DEFAULT false;
"""

_COUNTS = (
    "SELECT (SELECT count(*) FROM one_time_keys WHERE device_id = $1),"
    " k.fallback_key IS NOT NULL, coalesce(k.fallback_used, false)"
    " FROM (SELECT 1) AS one LEFT JOIN device_keys k ON k.device_id = $1"
)
#: Devices to tell about a change of `user`'s devices: those of everyone sharing a chat with
#: them and the user's own, never the device that changed; in a stable order.
_AUDIENCE = """
SELECT coalesce(array_agg(d.id ORDER BY d.user_id, d.created_at, d.id), '{}')
FROM devices d
WHERE d.user_id IN (
    SELECT p.user_id FROM members me JOIN members p ON p.chat_id = me.chat_id
    WHERE me.user_id = $1
    UNION SELECT $1
) AND d.id <> $2
"""
_APPEND = "SELECT o_device, o_iseq, o_payload FROM pigeon_append($1, $2::bytea[], NULL, $3)"
_TAKE_ONE_TIME = """
WITH picked AS (
    SELECT t.id AS device_id, k.key_id
    FROM unnest($1::text[]) AS t(id)
    CROSS JOIN LATERAL (
        SELECT o.key_id FROM one_time_keys o WHERE o.device_id = t.id
        ORDER BY o.key_id LIMIT 1 FOR UPDATE SKIP LOCKED
    ) k
)
DELETE FROM one_time_keys o USING picked p
WHERE o.device_id = p.device_id AND o.key_id = p.key_id
RETURNING o.device_id, o.key_id, o.key, o.signature
"""
#: The fallback keys of devices with no one-time key left, marked used; `was_used` (read under
#: the row lock) tells the first hand-out since the upload, which the device is told of.
_TAKE_FALLBACK = """
WITH old AS (
    SELECT device_id, fallback_used FROM device_keys
    WHERE device_id = ANY($1::text[]) AND fallback_key IS NOT NULL
    ORDER BY device_id FOR UPDATE
)
UPDATE device_keys k SET fallback_used = true FROM old
WHERE k.device_id = old.device_id
RETURNING k.device_id, k.fallback_id, k.fallback_key, k.fallback_signature, old.fallback_used
"""
#: The fallback keys handed out in place of one-time keys (a claimer over its per-target
#: limit): read only, neither marked used nor told of, so no row lock either.
_READ_FALLBACK = """
SELECT device_id, fallback_id, fallback_key, fallback_signature FROM device_keys
WHERE device_id = ANY($1::text[]) AND fallback_key IS NOT NULL
"""
_QUERY = """
SELECT d.user_id, d.id, k.curve25519, k.ed25519, k.bundle, k.signature
FROM unnest($1::text[]) WITH ORDINALITY AS u(id, ord)
JOIN devices d ON d.user_id = u.id
LEFT JOIN device_keys k ON k.device_id = d.id
ORDER BY u.ord, d.created_at, d.id
"""


async def _counts(conn: asyncpg.Connection, device_id: str) -> KeyCounts:
    n, fallback, used = await conn.fetchrow(_COUNTS, device_id)
    return KeyCounts(
        one_time_keys=n, max_one_time_keys=0, fallback_key=fallback, fallback_used=used
    )


async def _append(
    conn: asyncpg.Connection, devices: list[str], raws: list[bytes], at: int
) -> list[Delivery]:
    if not devices:
        return []
    rows = await conn.fetch(_APPEND, devices, raws, at)
    return [Delivery(r[0], r[1], r[2]) for r in rows]


async def _announce(
    conn: asyncpg.Connection, user_id: str, device_id: str, change: DeviceChange, at: int
) -> list[Delivery]:
    devices: list[str] = await conn.fetchval(_AUDIENCE, user_id, device_id)
    raw = encode_event(DeviceList(user=user_id, device=device_id, change=change, at=at))
    return await _append(conn, devices, [raw] * len(devices), at)


class PgKeys:
    """Device keys and their announcements in PostgreSQL."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    async def upload(
        self,
        device: Device,
        identity: DeviceIdentity | None,
        one_time_keys: list[OneTimeKey],
        fallback: OneTimeKey | None,
        max_one_time_keys: int,
        at: int,
    ) -> tuple[KeyCounts, list[Delivery]]:
        async def tx(conn: asyncpg.Connection) -> tuple[KeyCounts, list[Delivery]]:
            async with conn.transaction():
                # the device's row, shared: a revocation waits for this upload (or went first)
                if not await conn.fetchval(
                    "SELECT true FROM devices WHERE id = $1 FOR KEY SHARE", device.id
                ):
                    raise NotFound("no such device")
                deliveries: list[Delivery] = []
                if identity is not None:
                    given = (identity.curve25519, identity.ed25519, identity.bundle)
                    inserted = await conn.fetchval(
                        "INSERT INTO device_keys (device_id, curve25519, ed25519, bundle,"
                        " signature, published_at) VALUES ($1, $2, $3, $4, $5, $6)"
                        " ON CONFLICT (device_id) DO NOTHING RETURNING true",
                        device.id,
                        *given,
                        identity.signature,
                        at,
                    )
                    if inserted:
                        deliveries = await _announce(conn, device.user_id, device.id, "keys", at)
                    else:
                        stored = await conn.fetchrow(
                            "SELECT curve25519, ed25519, bundle FROM device_keys"
                            " WHERE device_id = $1",
                            device.id,
                        )
                        if tuple(stored) != given:
                            raise Conflict(
                                "this device's identity keys are published and never change"
                            )
                elif (one_time_keys or fallback is not None) and not await conn.fetchval(
                    "SELECT true FROM device_keys WHERE device_id = $1", device.id
                ):
                    raise BadRequest("publish the device's identity keys first")
                if one_time_keys:
                    # One upload of this device at a time from here on, so that the cap below
                    # counts every key another upload adds (a count alone sees only this
                    # transaction's uncommitted rows). The row exists: checked just above.
                    await conn.execute(
                        "SELECT 1 FROM device_keys WHERE device_id = $1 FOR UPDATE", device.id
                    )
                    await conn.execute(
                        "INSERT INTO one_time_keys (device_id, key_id, key, signature)"
                        " SELECT $1, k.id, k.key, k.sig"
                        " FROM unnest($2::text[], $3::text[], $4::text[]) AS k(id, key, sig)"
                        " ON CONFLICT DO NOTHING",
                        device.id,
                        [k.id for k in one_time_keys],
                        [k.key for k in one_time_keys],
                        [k.signature for k in one_time_keys],
                    )
                    held = await conn.fetchval(
                        "SELECT count(*) FROM one_time_keys WHERE device_id = $1", device.id
                    )
                    if held > max_one_time_keys:
                        raise TooManyKeys(
                            f"a device holds at most {max_one_time_keys} one-time keys"
                            f" ({held} with these)"
                        )
                if fallback is not None:
                    await conn.execute(
                        "UPDATE device_keys SET fallback_id = $2, fallback_key = $3,"
                        " fallback_signature = $4, fallback_used = false WHERE device_id = $1",
                        device.id,
                        fallback.id,
                        fallback.key,
                        fallback.signature,
                    )
                return await _counts(conn, device.id), deliveries

        return await self._db.run(tx)

    async def counts(self, device_id: str) -> KeyCounts:
        return await self._db.run(lambda conn: _counts(conn, device_id))

    async def query(self, user_ids: list[str]) -> list[DeviceKeys]:
        rows = await self._db.fetch(_QUERY, list(dict.fromkeys(user_ids)))
        return [
            DeviceKeys(
                user=r[0],
                device=r[1],
                identity=None
                if r[2] is None
                else DeviceIdentity(curve25519=r[2], ed25519=r[3], bundle=r[4], signature=r[5]),
            )
            for r in rows
        ]

    async def owners(self, device_ids: list[str]) -> dict[str, str]:
        if not device_ids:
            return {}
        rows = await self._db.fetch(
            "SELECT id, user_id FROM devices WHERE id = ANY($1::text[])", device_ids
        )
        return {r[0]: r[1] for r in rows}

    async def claim(
        self, device_ids: list[str], at: int, fallback_only: frozenset[str] = frozenset()
    ) -> tuple[list[ClaimedKey], list[Delivery]]:
        wanted = list(dict.fromkeys(device_ids))

        async def tx(conn: asyncpg.Connection) -> tuple[list[ClaimedKey], list[Delivery]]:
            exhausted: list[str] = []
            async with conn.transaction():
                owners = {
                    r[0]: r[1]
                    for r in await conn.fetch(
                        "SELECT id, user_id FROM devices WHERE id = ANY($1::text[])", wanted
                    )
                }
                present = sorted(d for d in wanted if d in owners and d not in fallback_only)
                taken = {
                    r[0]: (r[1], r[2], r[3], False)
                    for r in await conn.fetch(_TAKE_ONE_TIME, present)
                }
                spared = [d for d in wanted if d in owners and d in fallback_only]
                if spared:
                    for r in await conn.fetch(_READ_FALLBACK, spared):
                        taken[r[0]] = (r[1], r[2], r[3], True)
                rest = [d for d in present if d not in taken]
                if rest:
                    for r in await conn.fetch(_TAKE_FALLBACK, rest):
                        taken[r[0]] = (r[1], r[2], r[3], True)
                        if not r[4]:
                            exhausted.append(r[0])
                raw = encode_event(KeysExhausted(at=at))
                deliveries = await _append(conn, exhausted, [raw] * len(exhausted), at)
            claimed = [
                ClaimedKey(
                    user=owners[d],
                    device=d,
                    id=taken[d][0],
                    key=taken[d][1],
                    signature=taken[d][2],
                    fallback=taken[d][3],
                )
                for d in wanted
                if d in taken
            ]
            return claimed, deliveries

        return await self._db.run(tx)

    async def announce(
        self, user_id: str, device_id: str, change: DeviceChange, at: int
    ) -> list[Delivery]:
        async def tx(conn: asyncpg.Connection) -> list[Delivery]:
            async with conn.transaction():
                return await _announce(conn, user_id, device_id, change, at)

        return await self._db.run(tx)

    async def to_device(
        self, sender: Device, payloads: list[tuple[str, str]], at: int
    ) -> list[Delivery]:
        devices = [d for d, _ in payloads]
        raws = [
            encode_event(ToDevice(sender=sender.user_id, sender_device=sender.id, payload=p, at=at))
            for _, p in payloads
        ]

        async def tx(conn: asyncpg.Connection) -> list[Delivery]:
            return await _append(conn, devices, raws, at)

        return await self._db.run(tx)


_check: type[KeyStore] = PgKeys
