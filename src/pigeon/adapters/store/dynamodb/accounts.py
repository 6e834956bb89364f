"""DynamoDB implementation of `AccountStore`: users, devices, token hashes and invites.

Why it exists: authentication runs on every connection and every REST call, so it must be one
read whatever the load; the items are laid out for that (docs/architecture.md, "DynamoDB
store", **accounts**). The token item and the device pointer carry copies of what
`device_status` needs (the device and its user's `disabled_at`), kept exact by writing them in
the same transaction as the user: `set_disabled` on condition that the user's devices are the
ones it read, `add_device` on condition that `disabled_at` is the one it read.

The user item counts its devices (`devices`, `device_ids`), so the cap on devices is one
conditional update, and a revocation one transaction. What a revoked device leaves behind
(inbox entries, one-time keys, push jobs) is unreachable once its inbox head, keys item and
push target are gone in that transaction, and is deleted after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

from pigeon.adapters.store.dynamodb.codec import (
    PK,
    SK,
    SOLO,
    Expr,
    Item,
    encode,
    int_of,
    key,
    opt_int,
    str_of,
    strs_of,
)
from pigeon.adapters.store.dynamodb.db import ConditionFailed, DynamoDb, TransactionCancelled
from pigeon.adapters.store.dynamodb.inbox import head_item
from pigeon.adapters.store.dynamodb.keyspace import (
    device_key,
    head_key,
    keys_key,
    target_key,
    user_key,
)
from pigeon.adapters.store.dynamodb.tables import ACCOUNTS, INBOX, KEYS, PUSH, Table
from pigeon.domain.errors import Conflict, Forbidden, NotFound, TooManyDevices, Unavailable
from pigeon.domain.models import Credentials, Device, User, Visibility
from pigeon.ports import AccountCounts, AccountRecord, AccountStore, DeviceStatus, InviteBatch

#: The one partition of invites, and of the `by_name` index (written only at registration).
INVITES = "I"
BY_NAME = ACCOUNTS.index("by_name")
#: Attempts of a read-then-write whose condition a concurrent writer may break (each retry
#: reads again); then `Unavailable`, temporary.
_ATTEMPTS = 16

#: Deletes what is left in a revoked device's inbox partition, releasing the messages its
#: entries name (as an ack does: `pending` drops once per entry, bodies go at 0). The append
#: protocol's module (`inbox.py`) provides it; `DynamoStore` passes it in.
ReleaseInbox = Callable[[str], Awaitable[None]]


def token_key(token_hash: bytes) -> Item:
    return key(f"T#{token_hash.hex()}")


def _name_key(username: str) -> Item:
    return key(f"N#{username.casefold()}")


def _user_of(item: Item) -> User:
    return User(
        id=str_of(item, PK)[2:],
        username=str_of(item, "username"),
        created_at=int_of(item, "created_at"),
    )


def _device_of(item: Item) -> Device:
    return Device(
        id=str_of(item, "device"),
        user_id=str_of(item, "user"),
        name=str_of(item, "name"),
        created_at=int_of(item, "created_at"),
    )


def _status_of(item: Item | None) -> DeviceStatus | None:
    if item is None:
        return None
    return DeviceStatus(device=_device_of(item), disabled_at=opt_int(item, "disabled_at"))


def _record_of(item: Item) -> AccountRecord:
    user = _user_of(item)
    return AccountRecord(
        id=user.id,
        username=user.username,
        created_at=user.created_at,
        devices=opt_int(item, "devices") or 0,
        disabled_at=opt_int(item, "disabled_at"),
    )


class DynamoAccounts:
    """Users and devices on DynamoDB (the `accounts` table; a device's inbox head is created
    and deleted with it in the `inbox` table)."""

    def __init__(self, db: DynamoDb, release_inbox: ReleaseInbox) -> None:
        self._db = db
        self._release_inbox = release_inbox

    # -- users --------------------------------------------------------------------------------

    async def create_user(
        self, user: User, password_hash: str, invite: bytes | None = None, at: int = 0
    ) -> None:
        db = self._db
        folded = user.username.casefold()
        name = _name_key(user.username) | encode({"user": user.id})
        item = user_key(user.id) | encode(
            {
                "username": user.username,
                "password_hash": password_hash,
                "created_at": user.created_at,
                "visibility": "chats",
                "devices": 0,
                BY_NAME.pk: "U",
                BY_NAME.sk: folded,
            }
        )
        new = f"attribute_not_exists({PK})"
        items = [db.tx_put(ACCOUNTS, name, new), db.tx_put(ACCOUNTS, item, new)]
        if invite is not None:
            expr = Expr()
            spent, expires = expr.name("spent_at"), expr.name("expires_at")
            items.append(
                db.tx_update(
                    ACCOUNTS,
                    key(INVITES, invite.hex()),
                    f"SET {spent} = {expr.value(at)}",
                    expr,
                    f"attribute_exists({expr.name(PK)}) AND attribute_not_exists({spent})"
                    f" AND {expires} > {expr.value(at)}",
                )
            )
        try:
            await db.transact_write(items)
        except TransactionCancelled as exc:
            if 1 in exc.failed:  # user ids are new: an attempt of this call committed it
                return
            if 0 in exc.failed:
                raise Conflict(f"username {user.username!r} is taken") from None
            raise Forbidden("unknown, used or expired invite code") from None

    async def add_invites(self, code_hashes: list[bytes], created_at: int, expires_at: int) -> None:
        puts = [
            key(INVITES, h.hex()) | encode({"created_at": created_at, "expires_at": expires_at})
            for h in code_hashes
        ]
        await self._db.batch_write(ACCOUNTS, puts)

    async def _user_item(self, username: str) -> Item | None:
        name = await self._db.get(ACCOUNTS, _name_key(username))
        if name is None:
            return None
        return await self._db.get(ACCOUNTS, user_key(str_of(name, "user")))

    async def credentials(self, username: str) -> Credentials | None:
        item = await self._user_item(username)
        if item is None:
            return None
        user = _user_of(item)
        return Credentials(
            user_id=user.id, username=user.username, password_hash=str_of(item, "password_hash")
        )

    async def get_users(self, user_ids: list[str]) -> list[User]:
        items = await self._db.batch_get(ACCOUNTS, [user_key(u) for u in user_ids])
        return [_user_of(i) for i in items]

    async def user_by_name(self, username: str) -> User | None:
        item = await self._user_item(username)
        return None if item is None else _user_of(item)

    async def set_visibility(self, user_id: str, visibility: Visibility) -> None:
        expr = Expr()
        await self._set_if_user(
            user_id, f"SET {expr.name('visibility')} = {expr.value(visibility)}", expr
        )

    async def presence_settings(
        self, user_ids: list[str]
    ) -> dict[str, tuple[Visibility, int | None]]:
        items = await self._db.batch_get(ACCOUNTS, [user_key(u) for u in user_ids])
        return {
            str_of(i, PK)[2:]: (
                cast(Visibility, str_of(i, "visibility")),
                opt_int(i, "last_seen_at"),
            )
            for i in items
        }

    async def set_last_seen(self, user_id: str, at: int) -> None:
        expr = Expr()
        seen, when = expr.name("last_seen_at"), expr.value(at)
        await self._set_if_user(
            user_id,
            f"SET {seen} = {when}",
            expr,
            f" AND (attribute_not_exists({seen}) OR {seen} < {when})",  # never backwards
        )

    async def _set_if_user(self, user_id: str, update: str, expr: Expr, also: str = "") -> None:
        """An idempotent SET on the user, if there is one (else nothing, like an UPDATE)."""
        condition = f"attribute_exists({expr.name(PK)}){also}"
        with contextlib.suppress(ConditionFailed):
            await self._db.update(
                ACCOUNTS, user_key(user_id), update, expr, condition=condition, idempotent=True
            )

    # -- devices ------------------------------------------------------------------------------

    async def add_device(self, device: Device, token_hash: bytes, max_devices: int) -> None:
        db = self._db
        for _ in range(_ATTEMPTS):
            user = await db.get(ACCOUNTS, user_key(device.user_id))
            if user is None:
                raise NotFound("no such user")
            disabled_at = opt_int(user, "disabled_at")
            copies: dict[str, Any] = {
                "device": device.id,
                "user": device.user_id,
                "name": device.name,
                "created_at": device.created_at,
                "token_hash": token_hash,
            }
            expr = Expr()
            count, dis = expr.name("devices"), expr.name("disabled_at")
            as_read = (
                f"attribute_not_exists({dis})"
                if disabled_at is None
                else f"{dis} = {expr.value(disabled_at)}"
            )
            new = f"attribute_not_exists({PK})"
            head = head_item(device.id, device.user_id)
            items = [
                db.tx_update(
                    ACCOUNTS,
                    user_key(device.user_id),
                    f"ADD {count} {expr.value(1)}, {expr.name('device_ids')}"
                    f" {expr.value(frozenset({device.id}))}",
                    expr,
                    f"attribute_exists({expr.name(PK)}) AND {count} < {expr.value(max_devices)}"
                    f" AND {as_read}",
                ),
                db.tx_put(ACCOUNTS, key(f"U#{device.user_id}", f"D#{device.id}") | encode(copies)),
                db.tx_put(
                    ACCOUNTS,
                    device_key(device.id) | encode(copies | {"disabled_at": disabled_at}),
                    new,
                ),
                db.tx_put(
                    ACCOUNTS,
                    token_key(token_hash) | encode(copies | {"disabled_at": disabled_at}),
                    new,
                ),
                db.tx_put(INBOX, head, new),
            ]
            try:
                await db.transact_write(items)
                return
            except TransactionCancelled as exc:
                if 2 in exc.failed:  # device ids are new: an attempt of this call committed it
                    return
                if 0 in exc.failed:
                    stored = exc.reasons[0].item
                    if stored is None:
                        raise NotFound("no such user") from None
                    if (opt_int(stored, "devices") or 0) >= max_devices:
                        raise TooManyDevices(
                            f"at most {max_devices} devices per user; revoke one first"
                        ) from None
                    continue  # disabled or enabled meanwhile: read again
                raise Conflict("device or token exists already") from None
        raise Unavailable("accounts: add_device kept conflicting; retry")

    async def list_devices(self, user_id: str) -> list[Device]:
        expr = Expr()
        items = await self._db.query_items(
            ACCOUNTS,
            f"{expr.name(PK)} = {expr.value(f'U#{user_id}')}"
            f" AND begins_with({expr.name(SK)}, {expr.value('D#')})",
            expr,
            consistent=True,
        )
        return sorted((_device_of(i) for i in items), key=lambda d: (d.created_at, d.id))

    async def revoke_device(self, user_id: str, device_id: str) -> bool:
        db = self._db
        pointer = await db.get(ACCOUNTS, device_key(device_id))
        if pointer is None or str_of(pointer, "user") != user_id:
            return False
        expr = Expr()
        ids = expr.name("device_ids")
        items = [
            db.tx_update(
                ACCOUNTS,
                user_key(user_id),
                f"ADD {expr.name('devices')} {expr.value(-1)}"
                f" DELETE {ids} {expr.value(frozenset({device_id}))}",
                expr,
                f"contains({ids}, {expr.value(device_id)})",
            ),
            db.tx_delete(ACCOUNTS, key(f"U#{user_id}", f"D#{device_id}")),
            db.tx_delete(ACCOUNTS, device_key(device_id)),
            db.tx_delete(ACCOUNTS, token_key(bytes(pointer["token_hash"]["B"]))),
            db.tx_delete(INBOX, head_key(device_id)),
            db.tx_delete(KEYS, keys_key(device_id)),
            db.tx_delete(PUSH, target_key(device_id)),
        ]
        try:
            await db.transact_write(items)
        except TransactionCancelled as exc:
            if exc.retried:  # perhaps our own first attempt: the pointer says
                return await db.get(ACCOUNTS, device_key(device_id)) is None
            return False
        await self._leftovers(device_id)
        return True

    async def _leftovers(self, device_id: str) -> None:
        """After a revocation: its one-time keys, push jobs and dead letters, and its inbox."""
        await _drain(self._db, KEYS, f"K#{device_id}")
        await _drain(self._db, PUSH, f"P#{device_id}")
        expr = Expr()
        entries = await self._db.query_items(
            INBOX, f"{expr.name(PK)} = {expr.value(f'D#{device_id}')}", expr, limit=1
        )
        if not entries:
            return
        await self._release_inbox(device_id)

    async def device_by_token(self, token_hash: bytes) -> Device | None:
        status = await self.device_status_by_token(token_hash)
        return None if status is None else status.device

    async def device_status(self, device_id: str) -> DeviceStatus | None:
        return _status_of(await self._db.get(ACCOUNTS, device_key(device_id)))

    async def device_status_by_token(self, token_hash: bytes) -> DeviceStatus | None:
        return _status_of(await self._db.get(ACCOUNTS, token_key(token_hash)))

    async def set_disabled(self, user_id: str, at: int | None) -> bool:
        db = self._db
        for _ in range(_ATTEMPTS):
            expr = Expr()
            items = await db.query_items(
                ACCOUNTS, f"{expr.name(PK)} = {expr.value(f'U#{user_id}')}", expr, consistent=True
            )
            user = next((i for i in items if str_of(i, SK) == SOLO), None)
            if user is None:
                return False
            if (opt_int(user, "disabled_at") is None) == (at is None):
                return True  # disabled already (the first time stays), or enabled already
            devices = [i for i in items if str_of(i, SK) != SOLO]
            try:
                await db.transact_write(
                    [self._tx_disable_user(user, at)]
                    + [
                        self._tx_copy(k, at)
                        for d in devices
                        for k in (
                            device_key(str_of(d, "device")),
                            token_key(bytes(d["token_hash"]["B"])),
                        )
                    ]
                )
                return True
            except TransactionCancelled:
                continue  # a device came or went, or another operator acted: read again
        raise Unavailable("accounts: set_disabled kept conflicting; retry")

    def _tx_disable_user(self, user: Item, at: int | None) -> dict[str, Any]:
        """Set or clear `disabled_at` on the user, on condition that its devices are the ones
        read (a device added meanwhile would miss its copy)."""
        expr = Expr()
        dis, count = expr.name("disabled_at"), expr.name("devices")
        seen = strs_of(user, "device_ids")
        same = [f"{count} = {expr.value(len(seen))}"]
        same += [f"contains({expr.name('device_ids')}, {expr.value(d)})" for d in sorted(seen)]
        if at is None:
            update, state = f"REMOVE {dis}", f"attribute_exists({dis})"
        else:
            update, state = f"SET {dis} = {expr.value(at)}", f"attribute_not_exists({dis})"
        return self._db.tx_update(
            ACCOUNTS, key(str_of(user, PK)), update, expr, " AND ".join([state, *same])
        )

    def _tx_copy(self, item_key: Item, at: int | None) -> dict[str, Any]:
        expr = Expr()
        dis = expr.name("disabled_at")
        update = f"REMOVE {dis}" if at is None else f"SET {dis} = {expr.value(at)}"
        return self._db.tx_update(
            ACCOUNTS, item_key, update, expr, f"attribute_exists({expr.name(PK)})"
        )

    # -- the operator's reads -----------------------------------------------------------------

    async def account(self, username: str) -> AccountRecord | None:
        item = await self._user_item(username)
        return None if item is None else _record_of(item)

    async def list_accounts(self, limit: int, after: str | None = None) -> list[AccountRecord]:
        if limit <= 0:
            return []
        expr = Expr()
        condition = f"{expr.name(BY_NAME.pk)} = {expr.value('U')}"
        if after:  # a key may not be empty: no cursor is the whole range
            condition += f" AND {expr.name(BY_NAME.sk)} > {expr.value(after.casefold())}"
        found = await self._db.query_items(
            ACCOUNTS,
            condition,
            expr,
            index=BY_NAME,
            limit=limit,
            page_size=limit,
        )
        users = await self._db.batch_get(ACCOUNTS, [key(str_of(i, PK)) for i in found])
        by_id = {str_of(u, PK): u for u in users}
        return [_record_of(by_id[str_of(i, PK)]) for i in found if str_of(i, PK) in by_id]

    async def list_invites(self, now: int) -> list[InviteBatch]:
        expr = Expr()
        expires, spent = expr.name("expires_at"), expr.name("spent_at")
        items = await self._db.query_items(
            ACCOUNTS,
            f"{expr.name(PK)} = {expr.value(INVITES)}",
            expr,
            where=f"{expires} > {expr.value(now)} AND attribute_not_exists({spent})",
            consistent=True,
        )
        groups: dict[tuple[int, int], int] = {}
        for i in items:
            batch = (int_of(i, "created_at"), int_of(i, "expires_at"))
            groups[batch] = groups.get(batch, 0) + 1
        return [
            InviteBatch(created_at=c, expires_at=e, count=n)
            for (c, e), n in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0]))
        ]

    async def account_counts(self) -> AccountCounts:
        """One Scan of the table (an operator's command): users are `U#` items alone in their
        partition, devices their pointers (`D#`)."""
        users = disabled = devices = 0
        expr = Expr()
        kwargs: dict[str, Any] = {
            "TableName": self._db.name(ACCOUNTS),
            "ProjectionExpression": ", ".join(expr.name(n) for n in (PK, SK, "disabled_at")),
            "ConsistentRead": True,
            **expr.kwargs(),
        }
        while True:
            page = await self._db.call("scan", idempotent=True, **kwargs)
            for item in page.get("Items", []):
                pk, sk = str_of(item, PK), str_of(item, SK)
                if sk != SOLO:
                    continue
                if pk.startswith("U#"):
                    users += 1
                    disabled += "disabled_at" in item
                elif pk.startswith("D#"):
                    devices += 1
            start = page.get("LastEvaluatedKey")
            if not start:
                return AccountCounts(users=users, disabled=disabled, devices=devices)
            kwargs["ExclusiveStartKey"] = start


async def _drain(db: DynamoDb, table: Table, pk: str) -> None:
    """Delete every item of one partition (idempotent: a crash leaves the rest to a retry)."""
    expr = Expr()
    async for page in db.query(
        table,
        f"{expr.name(PK)} = {expr.value(pk)}",
        expr,
        projection=f"{expr.name(PK)}, {expr.name(SK)}",
    ):
        if page:
            await db.batch_write(table, deletes=[key(pk, str_of(i, SK)) for i in page])


_check: type[AccountStore] = DynamoAccounts
