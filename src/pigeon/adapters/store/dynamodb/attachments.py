"""DynamoDB implementation of `AttachmentStore`: attachment records, their shares into chats,
and each owner's creation window.

Why it exists: the quota ("at most n attachments per window") must hold on any number of nodes
without a lock. Each owner has one window item listing the creation times within the window;
a creation rewrites it on condition that its `version` is the one read, in the transaction
that puts the record, so two concurrent creations cannot both take the last place (the loser
reads again). Readability is the owner, or a member item (chats table) of a chat the
attachment was shared into: it follows membership with nothing to update here.

The sweep finds old records through `by_day`, whose partition is `D#<shard>` (16 shards of
the record id) and sort key `num_key(created_at)#<id>`: one range per shard up to the cut-off,
with no lower bound in time to know (docs/architecture.md, "DynamoDB store", attachments).
"""

from __future__ import annotations

from typing import Any

import msgspec

from pigeon.adapters.store.dynamodb.codec import (
    EXPIRES,
    PK,
    SK,
    Expr,
    Item,
    bool_of,
    encode,
    expires_at,
    int_of,
    is_live,
    key,
    num_key,
    opt_int,
    opt_str,
    str_of,
)
from pigeon.adapters.store.dynamodb.db import ConditionFailed, DynamoDb, TransactionCancelled
from pigeon.adapters.store.dynamodb.keyspace import member_key
from pigeon.adapters.store.dynamodb.tables import ATTACHMENTS, CHATS, shard
from pigeon.domain.errors import NotFound, Unavailable
from pigeon.domain.media import AttachmentRecord, refuse_if_over_quota
from pigeon.ports import AttachmentStore, Clock
from pigeon.services.clock import SystemClock

BY_DAY = ATTACHMENTS.index("by_day")
#: Partitions of `by_day` (creations are rare: 50 per hour and user by default).
DAY_SHARDS = 16
#: How long after the retention a record's TTL lets DynamoDB delete it: the sweep, which also
#: deletes its blob, should find it first; TTL is the backstop.
TTL_MARGIN_MS = 24 * 3_600_000
_ATTEMPTS = 16

_encode_meta = msgspec.json.encode
_decode_meta = msgspec.json.Decoder(dict[str, Any]).decode


def _record_key(attachment_id: str) -> Item:
    return key(f"A#{attachment_id}")


def _record_of(item: Item) -> AttachmentRecord:
    return AttachmentRecord(
        id=str_of(item, PK)[2:],
        owner=str_of(item, "owner"),
        content_type=str_of(item, "content_type"),
        size=int_of(item, "size"),
        sha256=str_of(item, "sha256"),
        filename=opt_str(item, "filename"),
        encrypted=bool_of(item, "encrypted"),
        created_at=int_of(item, "created_at"),
        uploaded_at=opt_int(item, "uploaded_at"),
        meta=_decode_meta(bytes(item["meta"]["B"])),
    )


class DynamoAttachments:
    """Attachment records and their shares on DynamoDB (the `attachments` table).

    `retention_ms`: records and shares carry a TTL that long (plus `TTL_MARGIN_MS`) after their
    creation; None leaves them to the sweep alone. `clock` tells reads which TTLs have passed.
    """

    def __init__(
        self, db: DynamoDb, retention_ms: int | None = None, clock: Clock | None = None
    ) -> None:
        self._db = db
        self._retention = retention_ms
        self._clock = clock or SystemClock()

    def _expires(self, created_at: int) -> int | None:
        if self._retention is None:
            return None
        return expires_at(created_at, self._retention + TTL_MARGIN_MS)

    async def create(
        self, record: AttachmentRecord, *, max_per_window: int, window_start: int
    ) -> None:
        db = self._db
        window_key = key(f"O#{record.owner}")
        item = _record_key(record.id) | encode(
            {
                "owner": record.owner,
                "content_type": record.content_type,
                "size": record.size,
                "sha256": record.sha256,
                "filename": record.filename,
                "encrypted": record.encrypted,
                "created_at": record.created_at,
                "uploaded_at": record.uploaded_at,
                "meta": _encode_meta(record.meta),
                BY_DAY.pk: f"D#{shard(record.id, DAY_SHARDS)}",
                BY_DAY.sk: f"{num_key(record.created_at)}#{record.id}",
                EXPIRES: self._expires(record.created_at),
            }
        )
        for _ in range(_ATTEMPTS):
            window = await db.get(ATTACHMENTS, window_key)
            recent = [] if window is None else [int(v["N"]) for v in window["recent"]["L"]]
            version = 0 if window is None else int_of(window, "version")
            recent = sorted((t for t in recent if t >= window_start), reverse=True)
            blocking = recent[max_per_window - 1] if 0 < max_per_window <= len(recent) else None
            if max_per_window <= 0 or blocking is not None:
                refuse_if_over_quota(blocking, max_per_window, window_start)
            expr = Expr()
            as_read = (
                f"attribute_not_exists({expr.name(PK)})"
                if window is None
                else f"{expr.name('version')} = {expr.value(version)}"
            )
            new_window = window_key | encode(
                {"recent": [record.created_at, *recent], "version": version + 1}
            )
            try:
                await db.transact_write(
                    [
                        db.tx_put(ATTACHMENTS, item, f"attribute_not_exists({PK})"),
                        db.tx_put(ATTACHMENTS, new_window, as_read, expr),
                    ]
                )
                return
            except TransactionCancelled as exc:
                if 0 in exc.failed:
                    stored = exc.reasons[0].item
                    if stored is not None and _record_of(stored) == _record_of(item):
                        return  # an attempt of this call committed it (timed out, retried)
                    raise NotFound("attachment id exists already") from None
                continue  # another creation of this owner took the window: count again
        raise Unavailable("attachments: create kept conflicting; retry")

    async def _live(self, attachment_id: str) -> Item | None:
        item = await self._db.get(ATTACHMENTS, _record_key(attachment_id))
        if item is None or not is_live(item, self._clock.now_ms()):
            return None
        return item

    async def get(self, attachment_id: str) -> AttachmentRecord | None:
        item = await self._live(attachment_id)
        return None if item is None else _record_of(item)

    async def mark_uploaded(
        self, attachment_id: str, at: int, meta: dict[str, Any]
    ) -> AttachmentRecord | None:
        expr = Expr()
        up = expr.name("uploaded_at")
        try:
            item = await self._db.update(
                ATTACHMENTS,
                _record_key(attachment_id),
                f"SET {up} = if_not_exists({up}, {expr.value(at)}),"
                f" {expr.name('meta')} = {expr.value(_encode_meta(meta))}",
                expr,
                condition=f"attribute_exists({expr.name(PK)})",
                returns="ALL_NEW",
                idempotent=True,
            )
        except ConditionFailed:
            return None
        return _record_of(item)

    async def share(self, attachment_id: str, chat_id: str) -> None:
        db = self._db
        item = await self._live(attachment_id)
        if item is None:
            raise NotFound("no such attachment")
        expr = Expr()
        mark = db.tx_update(
            ATTACHMENTS,
            _record_key(attachment_id),
            f"SET {expr.name('shared')} = {expr.value(True)}",
            expr,
            f"attribute_exists({expr.name(PK)})",
        )
        share = key(f"A#{attachment_id}", f"S#{chat_id}") | encode(
            {EXPIRES: opt_int(item, EXPIRES)}
        )
        try:
            await db.transact_write([mark, db.tx_put(ATTACHMENTS, share)])
        except TransactionCancelled:
            raise NotFound("no such attachment") from None

    async def _shares(self, attachment_id: str) -> list[str]:
        expr = Expr()
        items = await self._db.query_items(
            ATTACHMENTS,
            f"{expr.name(PK)} = {expr.value(f'A#{attachment_id}')}"
            f" AND begins_with({expr.name(SK)}, {expr.value('S#')})",
            expr,
            consistent=True,
        )
        return [str_of(i, SK)[2:] for i in items]

    async def may_read(self, user_id: str, attachment_id: str) -> bool:
        item = await self._live(attachment_id)
        if item is None:
            return False
        if str_of(item, "owner") == user_id:
            return True
        chats = await self._shares(attachment_id)
        if not chats:
            return False
        members = await self._db.batch_get(
            CHATS, [member_key(c, user_id) for c in chats], projection=PK
        )
        return bool(members)

    async def sweep(self, before: int, unshared_before: int) -> list[str]:
        cut = num_key(max(before, unshared_before, 0))
        deleted: list[str] = []
        for n in range(DAY_SHARDS):
            expr = Expr()
            condition = (
                f"{expr.name(BY_DAY.pk)} = {expr.value(f'D#{n}')}"
                f" AND {expr.name(BY_DAY.sk)} < {expr.value(cut)}"
            )
            async for page in self._db.query(ATTACHMENTS, condition, expr, index=BY_DAY):
                deleted += await self._sweep_page(page, before, unshared_before)
        return deleted

    async def _sweep_page(self, page: list[Item], before: int, unshared_before: int) -> list[str]:
        """Delete the condemned records of one page of `by_day` (with their shares)."""
        ids = {str_of(i, PK)[2:]: int(str_of(i, BY_DAY.sk).split("#")[0]) for i in page}
        maybe = [a for a, at in ids.items() if at >= before]  # kept if they were shared
        shared: set[str] = set()
        if maybe:
            found = await self._db.batch_get(ATTACHMENTS, [_record_key(a) for a in maybe])
            shared = {str_of(i, PK)[2:] for i in found if bool_of(i, "shared")}
        doomed = [
            a for a, at in ids.items() if at < before or (at < unshared_before and a not in shared)
        ]
        for attachment_id in doomed:
            shares = [
                key(f"A#{attachment_id}", f"S#{c}") for c in await self._shares(attachment_id)
            ]
            await self._db.batch_write(ATTACHMENTS, deletes=[*shares, _record_key(attachment_id)])
        return doomed


_check: type[AttachmentStore] = DynamoAttachments
