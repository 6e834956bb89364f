"""DynamoDB implementation of `KeyStore`: device keys, one-time key claims, announcements and
to-device messages.

Why it exists: end-to-end encryption needs one-time keys handed out at most once, on any number
of nodes, and a device told exactly once that its one-time keys ran out. Here a key is handed
out only by the transaction that deleted it (a Delete on condition it exists, with the count's
decrement), and the fallback key is marked used by a conditional update in the same transaction
as the `KeysExhausted` record of the append protocol (`inbox.append_events` with `extra`), so
exactly one claimer tells the device (docs/architecture.md, "DynamoDB store", "keys").
"""

from __future__ import annotations

import random
from typing import Any

from pigeon.adapters.store.dynamodb import inbox
from pigeon.adapters.store.dynamodb.chats import partners
from pigeon.adapters.store.dynamodb.codec import (
    PK,
    SK,
    Expr,
    Item,
    bool_of,
    encode,
    int_of,
    key,
    opt_int,
    opt_str,
    str_of,
    strs_of,
)
from pigeon.adapters.store.dynamodb.db import DynamoDb, TransactionCancelled
from pigeon.adapters.store.dynamodb.inbox import NewEvent, Policy
from pigeon.adapters.store.dynamodb.keyspace import device_key, keys_key, user_key
from pigeon.adapters.store.dynamodb.tables import ACCOUNTS, KEYS
from pigeon.domain.errors import BadRequest, Conflict, NotFound, TooManyKeys, Unavailable
from pigeon.domain.events import Delivery, DeviceList, KeysExhausted, ToDevice, encode_event
from pigeon.domain.ids import new_id
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

#: New one-time keys one upload may carry: a transaction holds 100 items, and an upload's
#: also holds the keys item, the device check and maybe its announcement's record.
MAX_KEYS_PER_UPLOAD = 96
_ATTEMPTS = 8
#: How many of the first one-time keys a claimer that lost a race chooses from.
_SPREAD = 16


def one_time_key(device_id: str, key_id: str) -> Item:
    return key(f"K#{device_id}", f"O#{key_id}")


def _counts(item: Item | None) -> KeyCounts:
    if item is None:
        return KeyCounts(
            one_time_keys=0, max_one_time_keys=0, fallback_key=False, fallback_used=False
        )
    return KeyCounts(
        one_time_keys=opt_int(item, "otk") or 0,
        max_one_time_keys=0,
        fallback_key="fallback_id" in item,
        fallback_used=bool_of(item, "fallback_used"),
    )


def _identity(item: Item | None) -> DeviceIdentity | None:
    if item is None or "curve25519" not in item:
        return None
    return DeviceIdentity(
        curve25519=str_of(item, "curve25519"),
        ed25519=str_of(item, "ed25519"),
        bundle=str_of(item, "bundle"),
        signature=str_of(item, "signature"),
    )


def _fallback(device_id: str, user_id: str, item: Item | None) -> ClaimedKey | None:
    if item is None or "fallback_id" not in item:
        return None
    return ClaimedKey(
        user=user_id,
        device=device_id,
        id=str_of(item, "fallback_id"),
        key=str_of(item, "fallback_key"),
        signature=str_of(item, "fallback_signature"),
        fallback=True,
    )


class DynamoKeys:
    """Device keys and their announcements on DynamoDB."""

    def __init__(self, db: DynamoDb, policy: Policy | None = None) -> None:
        self._db = db
        self._policy = policy or Policy()
        self._rng = random.Random()

    # -- upload -----------------------------------------------------------------------------------

    async def upload(
        self,
        device: Device,
        identity: DeviceIdentity | None,
        one_time_keys: list[OneTimeKey],
        fallback: OneTimeKey | None,
        max_one_time_keys: int,
        at: int,
    ) -> tuple[KeyCounts, list[Delivery]]:
        db = self._db
        for _ in range(_ATTEMPTS):
            if await db.get(ACCOUNTS, device_key(device.id)) is None:
                raise NotFound("no such device")
            stored = await db.get(KEYS, keys_key(device.id))
            known = _identity(stored)
            if identity is not None and known is not None and not _same(identity, known):
                raise Conflict("this device's identity keys are published and never change")
            if known is None and identity is None:
                if one_time_keys or fallback is not None:
                    raise BadRequest("publish the device's identity keys first")
                return _counts(stored), []
            held = await db.batch_get(KEYS, [one_time_key(device.id, k.id) for k in one_time_keys])
            held_ids = {str_of(h, SK)[2:] for h in held}
            new = list({k.id: k for k in one_time_keys if k.id not in held_ids}.values())
            if len(new) > MAX_KEYS_PER_UPLOAD:
                raise BadRequest(f"at most {MAX_KEYS_PER_UPLOAD} new one-time keys per upload")
            count = opt_int(stored, "otk") if stored is not None else None
            if (count or 0) + len(new) > max_one_time_keys:
                raise TooManyKeys(
                    f"a device holds at most {max_one_time_keys} one-time keys"
                    f" ({(count or 0) + len(new)} with these)"
                )
            publish = known is None and identity is not None
            extra = [
                self._update_keys(
                    device.id, identity if publish else None, new, fallback, count, at
                ),
                db.tx_check(ACCOUNTS, device_key(device.id), *_exists()),
            ]
            extra += [
                db.tx_put(
                    KEYS,
                    one_time_key(device.id, k.id)
                    | encode({"key": k.key, "signature": k.signature}),
                    f"attribute_not_exists({PK})",
                )
                for k in new
            ]
            targets: list[str] = []
            payload = b""
            if publish:
                targets = await self._audience(device.user_id, device.id)
                event = DeviceList(user=device.user_id, device=device.id, change="keys", at=at)
                payload = encode_event(event)
            try:
                out = await inbox.append_events(
                    db, targets, payload, at, policy=self._policy, extra=extra
                )
            except TransactionCancelled as exc:
                if 1 in exc.failed:
                    raise NotFound("no such device") from None
                continue  # the keys moved under us (a concurrent upload or claim): read again
            after = await db.get(KEYS, keys_key(device.id))
            return _counts(after), out
        raise Unavailable("the device's keys keep changing")

    def _update_keys(
        self,
        device_id: str,
        identity: DeviceIdentity | None,
        new: list[OneTimeKey],
        fallback: OneTimeKey | None,
        count: int | None,
        at: int,
    ) -> dict[str, Any]:
        """The keys item's update, on condition it is as read: identity published (or, with
        `identity`, not yet), the one-time key count unchanged."""
        expr = Expr()
        curve, otk = expr.name("curve25519"), expr.name("otk")
        sets = []
        if identity is not None:
            sets += [
                f"{curve} = {expr.value(identity.curve25519)}",
                f"{expr.name('ed25519')} = {expr.value(identity.ed25519)}",
                f"{expr.name('bundle')} = {expr.value(identity.bundle)}",
                f"{expr.name('signature')} = {expr.value(identity.signature)}",
                f"{expr.name('published_at')} = {expr.value(at)}",
            ]
        if fallback is not None:
            sets += [
                f"{expr.name('fallback_id')} = {expr.value(fallback.id)}",
                f"{expr.name('fallback_key')} = {expr.value(fallback.key)}",
                f"{expr.name('fallback_signature')} = {expr.value(fallback.signature)}",
                f"{expr.name('fallback_used')} = {expr.value(False)}",
                # a new generation: its first hand-out is told, whatever its id
                f"{expr.name('fallback_gen')} = {expr.value(new_id())}",
            ]
        sets.append(f"{otk} = {expr.value((count or 0) + len(new))}")
        conditions = [
            f"attribute_not_exists({curve})"
            if identity is not None
            else f"attribute_exists({curve})",
            f"attribute_not_exists({otk})" if count is None else f"{otk} = {expr.value(count)}",
        ]
        return self._db.tx_update(
            KEYS, keys_key(device_id), "SET " + ", ".join(sets), expr, " AND ".join(conditions)
        )

    async def _audience(self, user_id: str, device_id: str) -> list[str]:
        """The devices of everyone sharing a chat with the user and the user's own, but never
        `device_id`."""
        users = await partners(self._db, user_id) | {user_id}
        found = await self._db.batch_get(ACCOUNTS, [user_key(u) for u in sorted(users)])
        pairs = sorted((str_of(u, PK)[2:], d) for u in found for d in strs_of(u, "device_ids"))
        return [d for _, d in pairs if d != device_id]

    # -- reads ------------------------------------------------------------------------------------

    async def counts(self, device_id: str) -> KeyCounts:
        return _counts(await self._db.get(KEYS, keys_key(device_id)))

    async def query(self, user_ids: list[str]) -> list[DeviceKeys]:
        out: list[DeviceKeys] = []
        for user_id in user_ids:
            expr = Expr()
            cond = (
                f"{expr.name(PK)} = {expr.value(f'U#{user_id}')}"
                f" AND begins_with({expr.name(SK)}, {expr.value('D#')})"
            )
            devices = await self._db.query_items(ACCOUNTS, cond, expr, consistent=True)
            ordered = sorted((int_of(d, "created_at"), str_of(d, SK)[2:]) for d in devices)
            found = await self._db.batch_get(KEYS, [keys_key(d) for _, d in ordered])
            by_device = {str_of(k, PK)[2:]: k for k in found}
            out += [
                DeviceKeys(user=user_id, device=d, identity=_identity(by_device.get(d)))
                for _, d in ordered
            ]
        return out

    async def owners(self, device_ids: list[str]) -> dict[str, str]:
        if not device_ids:
            return {}
        found = await self._db.batch_get(ACCOUNTS, [device_key(d) for d in device_ids])
        return {str_of(p, PK)[2:]: str_of(p, "user") for p in found}

    # -- claims -----------------------------------------------------------------------------------

    async def claim(
        self, device_ids: list[str], at: int, fallback_only: frozenset[str] = frozenset()
    ) -> tuple[list[ClaimedKey], list[Delivery]]:
        wanted = list(dict.fromkeys(device_ids))
        owners = await self.owners(wanted)
        out: list[ClaimedKey] = []
        told: list[Delivery] = []
        for device_id in wanted:
            user_id = owners.get(device_id)
            if user_id is None:
                continue
            if device_id in fallback_only:
                found = _fallback(device_id, user_id, await self._db.get(KEYS, keys_key(device_id)))
            else:
                found = await self._take(device_id, user_id)
                if found is None:
                    found, deliveries = await self._take_fallback(device_id, user_id, at)
                    told += deliveries
            if found is not None:
                out.append(found)
        return out, told

    async def _take(self, device_id: str, user_id: str) -> ClaimedKey | None:
        """The device's first one-time key, deleted by this call's transaction (so handed out
        once, on any node); None when it has none left. A claimer that lost a key to another
        tries a random one of the next few, so that concurrent claimers spread out instead of
        all racing for the same first key."""
        db = self._db
        lost = 0
        while True:
            expr = Expr()
            cond = (
                f"{expr.name(PK)} = {expr.value(f'K#{device_id}')}"
                f" AND begins_with({expr.name(SK)}, {expr.value('O#')})"
            )
            page = _SPREAD if lost else 1
            first = await db.query_items(
                KEYS, cond, expr, consistent=True, limit=page, page_size=page
            )
            if not first:
                return None
            item = self._rng.choice(first)
            e = Expr()
            try:
                await db.transact_write(
                    [
                        db.tx_delete(
                            KEYS,
                            key(str_of(item, PK), str_of(item, SK)),
                            f"attribute_exists({e.name(PK)})",
                            e,
                        ),
                        self._decrement(device_id),
                    ]
                )
            except TransactionCancelled as exc:
                if 1 in exc.failed and 0 not in exc.failed:
                    return None  # the keys item is gone: the device was revoked
                lost += 1
                continue  # another claimer took it: another one
            return ClaimedKey(
                user=user_id,
                device=device_id,
                id=str_of(item, SK)[2:],
                key=str_of(item, "key"),
                signature=str_of(item, "signature"),
            )

    def _decrement(self, device_id: str) -> dict[str, Any]:
        expr = Expr()
        return self._db.tx_update(
            KEYS,
            keys_key(device_id),
            f"ADD {expr.name('otk')} {expr.value(-1)}",
            expr,
            f"attribute_exists({expr.name(PK)})",
        )

    async def _take_fallback(
        self, device_id: str, user_id: str, at: int
    ) -> tuple[ClaimedKey | None, list[Delivery]]:
        """The fallback key; the first hand-out of its generation marks it used and tells the
        device, in one transaction (a claimer losing the condition just hands it out)."""
        item = await self._db.get(KEYS, keys_key(device_id))
        found = _fallback(device_id, user_id, item)
        if item is None or found is None or bool_of(item, "fallback_used"):
            return found, []
        gen = opt_str(item, "fallback_gen") or found.id
        expr = Expr()
        used = expr.name("fallback_used")
        mark = self._db.tx_update(
            KEYS,
            keys_key(device_id),
            f"SET {used} = {expr.value(True)}",
            expr,
            f"{used} = {expr.value(False)} AND {expr.name('fallback_gen')} = {expr.value(gen)}"
            if "fallback_gen" in item
            else f"{used} = {expr.value(False)}",
        )
        try:
            told = await inbox.append_events(
                self._db,
                [device_id],
                encode_event(KeysExhausted(at=at)),
                at,
                policy=self._policy,
                event_id=f"exhausted:{device_id}:{gen}",
                extra=[mark],
            )
        except TransactionCancelled as exc:
            if 0 not in exc.failed:
                raise
            return found, []  # marked by a concurrent claim, which tells the device
        return found, told

    # -- events -----------------------------------------------------------------------------------

    async def announce(
        self, user_id: str, device_id: str, change: DeviceChange, at: int
    ) -> list[Delivery]:
        targets = await self._audience(user_id, device_id)
        event = DeviceList(user=user_id, device=device_id, change=change, at=at)
        return await inbox.append_events(
            self._db, targets, encode_event(event), at, policy=self._policy
        )

    async def to_device(
        self, sender: Device, payloads: list[tuple[str, str]], at: int
    ) -> list[Delivery]:
        existing = await self.owners([d for d, _ in payloads])
        events = [
            NewEvent(
                [device_id],
                encode_event(
                    ToDevice(sender=sender.user_id, sender_device=sender.id, payload=p, at=at)
                ),
            )
            for device_id, p in payloads
            if device_id in existing
        ]
        if not events:
            return []
        return await inbox.append_many(self._db, events, at, policy=self._policy)


def _same(a: DeviceIdentity, b: DeviceIdentity) -> bool:
    """Identity keys are the same if the keys and their bundle are (as on the SQL stores)."""
    return (a.curve25519, a.ed25519, a.bundle) == (b.curve25519, b.ed25519, b.bundle)


def _exists() -> tuple[str, Expr]:
    expr = Expr()
    return f"attribute_exists({expr.name(PK)})", expr


_check: type[KeyStore] = DynamoKeys
