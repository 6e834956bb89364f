"""SQLite implementation of `KeyStore`: device keys, claims, announcements, to-device.

Why it is simple: every write runs on the database's one writer thread, so a claim's "read the
first one-time key, delete it" cannot interleave with another claim; the `DELETE ... RETURNING`
takes the key and removes it in one statement anyway.
"""

from __future__ import annotations

import sqlite3

from pigeon.adapters.store.sqlite import inbox
from pigeon.adapters.store.sqlite.db import SqliteDb
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

_COUNTS = (
    "SELECT (SELECT count(*) FROM one_time_keys WHERE device_id = ?1),"
    " k.fallback_key IS NOT NULL, k.fallback_used"
    " FROM (SELECT 1) LEFT JOIN device_keys k ON k.device_id = ?1"
)
#: Devices to tell about a change of `user`'s devices: those of everyone sharing a chat with
#: them and the user's own, but never the device that changed.
_AUDIENCE = """
SELECT d.id, d.next_iseq FROM devices d
WHERE d.user_id IN (
    SELECT p.user_id FROM members me JOIN members p ON p.chat_id = me.chat_id
    WHERE me.user_id = ?1
    UNION SELECT ?1
) AND d.id <> ?2
ORDER BY d.user_id, d.created_at, d.id
"""
_TAKE_ONE_TIME = (
    "DELETE FROM one_time_keys WHERE device_id = ?1 AND key_id ="
    " (SELECT key_id FROM one_time_keys WHERE device_id = ?1 ORDER BY key_id LIMIT 1)"
    " RETURNING key_id, key, signature"
)
_TAKE_FALLBACK = (
    "UPDATE device_keys SET fallback_used = 1 WHERE device_id = ? AND fallback_key IS NOT NULL"
    " RETURNING fallback_id, fallback_key, fallback_signature"
)
#: The fallback key handed out in place of a one-time key (a claimer over its per-target
#: limit): read only, neither marked used nor told of.
_READ_FALLBACK = (
    "SELECT fallback_id, fallback_key, fallback_signature FROM device_keys"
    " WHERE device_id = ? AND fallback_key IS NOT NULL"
)


def _counts(conn: sqlite3.Connection, device_id: str) -> KeyCounts:
    n, fallback, used = conn.execute(_COUNTS, (device_id,)).fetchone()
    return KeyCounts(
        one_time_keys=n,
        max_one_time_keys=0,
        fallback_key=bool(fallback),
        fallback_used=bool(used),
    )


def _take(
    conn: sqlite3.Connection, device_id: str, at: int
) -> tuple[tuple[str, str, str] | None, bool, list[Delivery]]:
    """One of the device's one-time keys, taken (`fallback` False); else its fallback key,
    marked used, with a `KeysExhausted` event in its inbox the first time since its upload;
    else nothing. Returns (id, key, signature) or None, `fallback`, the deliveries."""
    row = conn.execute(_TAKE_ONE_TIME, (device_id,)).fetchone()
    if row is not None:
        return row, False, []
    used = conn.execute(
        "SELECT fallback_used FROM device_keys WHERE device_id = ?", (device_id,)
    ).fetchone()
    row = conn.execute(_TAKE_FALLBACK, (device_id,)).fetchone()
    if row is None or used is None or used[0]:
        return row, True, []
    raw = encode_event(KeysExhausted(at=at))
    return row, True, inbox.append(conn, [device_id], raw, at)


def announce(
    conn: sqlite3.Connection, user_id: str, device_id: str, change: DeviceChange, at: int
) -> list[Delivery]:
    """Append a `DeviceList` event to the inboxes of the change's audience (in `conn`'s
    transaction)."""
    targets = conn.execute(_AUDIENCE, (user_id, device_id)).fetchall()
    event = DeviceList(user=user_id, device=device_id, change=change, at=at)
    return inbox.append_to(conn, targets, encode_event(event), at)


class SqliteKeys:
    """Device keys and their announcements in SQLite."""

    def __init__(self, db: SqliteDb) -> None:
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
        def tx(conn: sqlite3.Connection) -> tuple[KeyCounts, list[Delivery]]:
            if conn.execute("SELECT 1 FROM devices WHERE id = ?", (device.id,)).fetchone() is None:
                raise NotFound("no such device")
            deliveries: list[Delivery] = []
            stored = conn.execute(
                "SELECT curve25519, ed25519, bundle, signature FROM device_keys"
                " WHERE device_id = ?",
                (device.id,),
            ).fetchone()
            if identity is not None:
                given = (identity.curve25519, identity.ed25519, identity.bundle)
                if stored is None:
                    conn.execute(
                        "INSERT INTO device_keys (device_id, curve25519, ed25519, bundle,"
                        " signature, published_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (device.id, *given, identity.signature, at),
                    )
                    deliveries = announce(conn, device.user_id, device.id, "keys", at)
                elif tuple(stored[:3]) != given:
                    raise Conflict("this device's identity keys are published and never change")
            elif stored is None and (one_time_keys or fallback is not None):
                raise BadRequest("publish the device's identity keys first")
            conn.executemany(
                "INSERT INTO one_time_keys (device_id, key_id, key, signature)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(device.id, k.id, k.key, k.signature) for k in one_time_keys],
            )
            counts = _counts(conn, device.id)
            if counts.one_time_keys > max_one_time_keys:
                raise TooManyKeys(
                    f"a device holds at most {max_one_time_keys} one-time keys"
                    f" ({counts.one_time_keys} with these)"
                )
            if fallback is not None:
                conn.execute(
                    "UPDATE device_keys SET fallback_id = ?, fallback_key = ?,"
                    " fallback_signature = ?, fallback_used = 0 WHERE device_id = ?",
                    (fallback.id, fallback.key, fallback.signature, device.id),
                )
                counts = _counts(conn, device.id)
            return counts, deliveries

        return await self._db.write(tx)

    async def counts(self, device_id: str) -> KeyCounts:
        return await self._db.read(lambda conn: _counts(conn, device_id))

    async def query(self, user_ids: list[str]) -> list[DeviceKeys]:
        def q(conn: sqlite3.Connection) -> list[DeviceKeys]:
            out: list[DeviceKeys] = []
            for user_id in user_ids:
                rows = conn.execute(
                    "SELECT d.id, k.curve25519, k.ed25519, k.bundle, k.signature"
                    " FROM devices d LEFT JOIN device_keys k ON k.device_id = d.id"
                    " WHERE d.user_id = ? ORDER BY d.created_at, d.id",
                    (user_id,),
                ).fetchall()
                out += [_device_keys(user_id, r) for r in rows]
            return out

        return await self._db.read(q)

    async def owners(self, device_ids: list[str]) -> dict[str, str]:
        def q(conn: sqlite3.Connection) -> dict[str, str]:
            if not device_ids:
                return {}
            marks = ",".join("?" * len(device_ids))
            sql = f"SELECT id, user_id FROM devices WHERE id IN ({marks})"
            return {r[0]: r[1] for r in conn.execute(sql, device_ids)}

        return await self._db.read(q)

    async def claim(
        self, device_ids: list[str], at: int, fallback_only: frozenset[str] = frozenset()
    ) -> tuple[list[ClaimedKey], list[Delivery]]:
        def tx(conn: sqlite3.Connection) -> tuple[list[ClaimedKey], list[Delivery]]:
            out: list[ClaimedKey] = []
            deliveries: list[Delivery] = []
            for device_id in dict.fromkeys(device_ids):
                owner = conn.execute(
                    "SELECT user_id FROM devices WHERE id = ?", (device_id,)
                ).fetchone()
                if owner is None:
                    continue
                if device_id in fallback_only:
                    row, fallback = conn.execute(_READ_FALLBACK, (device_id,)).fetchone(), True
                else:
                    row, fallback, told = _take(conn, device_id, at)
                    deliveries += told
                if row is not None:
                    out.append(
                        ClaimedKey(
                            user=owner[0],
                            device=device_id,
                            id=row[0],
                            key=row[1],
                            signature=row[2],
                            fallback=fallback,
                        )
                    )
            return out, deliveries

        return await self._db.write(tx)

    async def announce(
        self, user_id: str, device_id: str, change: DeviceChange, at: int
    ) -> list[Delivery]:
        return await self._db.write(lambda conn: announce(conn, user_id, device_id, change, at))

    async def to_device(
        self, sender: Device, payloads: list[tuple[str, str]], at: int
    ) -> list[Delivery]:
        def tx(conn: sqlite3.Connection) -> list[Delivery]:
            out: list[Delivery] = []
            for device_id, payload in payloads:
                event = ToDevice(
                    sender=sender.user_id, sender_device=sender.id, payload=payload, at=at
                )
                out += inbox.append(conn, [device_id], encode_event(event), at)
            return out

        return await self._db.write(tx)


def _device_keys(user_id: str, r: tuple[str, str | None, str, str, str]) -> DeviceKeys:
    identity = (
        None
        if r[1] is None
        else DeviceIdentity(curve25519=r[1], ed25519=r[2], bundle=r[3], signature=r[4])
    )
    return DeviceKeys(user=user_id, device=r[0], identity=identity)


_check: type[KeyStore] = SqliteKeys
