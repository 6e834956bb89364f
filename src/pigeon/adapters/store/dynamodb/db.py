"""DynamoDB access for the store's sub-stores: one aiobotocore client, the tables, retries with
backoff, typed failures and the capacity each call consumed.

Why it exists: every sub-store needs the same handful of things done the same way, and done
right once. This module is the only one in the adapter that sees botocore; the sub-stores see
`ConditionFailed`, `TransactionCancelled` and pigeon's domain errors.

- **Retries.** Throttling (`ProvisionedThroughputExceededException`, `ThrottlingException`,
  `RequestLimitExceeded`, a transaction cancelled only by conflicts or throttling) means the
  request was refused and nothing was applied, so it is retried whatever the call, with
  exponential backoff and full jitter (a sleep drawn from [0, min(cap, base * 2**attempt)]),
  and surfaces as `Unavailable` when it persists. `InternalServerError`, a 5xx, a timeout or a
  broken connection leave the outcome unknown: retried only for calls marked `idempotent`
  (reads; conditional writes; transactions, which carry a `ClientRequestToken`). botocore's own
  retries are off so that this loop is the only one.
- **A retried conditional write may fail on its own first attempt**: a `ConditionFailed` or a
  cancelled transaction says `retried=True` then, with the item as stored, for the caller to
  recognise its own write (e.g. the same message id).
- **Sizes.** Items are checked against the 400 KB limit before they are sent (`TooLarge`), and
  a transaction against its 100 items and 4 MB.
- **Capacity.** Every data call asks for `ReturnConsumedCapacity=TOTAL`; `capacity` adds up read
  and write units per table and counts calls, retries and throttles, for the capacity model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar

import aiohttp
import msgspec
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from pigeon.adapters.store.dynamodb.codec import (
    EXPIRES,
    MAX_ITEM_BYTES,
    PK,
    SK,
    Expr,
    Item,
    item_size,
    key,
)
from pigeon.adapters.store.dynamodb.tables import ACCOUNTS, TABLES, Index, Table
from pigeon.domain.errors import TooLarge, Unavailable

log = logging.getLogger(__name__)

#: Refused requests: nothing was applied, always safe to send again.
THROTTLED = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TransactionConflictException",
    }
)
#: The outcome is unknown: safe to send again only if the call is idempotent.
TRANSIENT = frozenset({"InternalServerError", "ServiceUnavailable", "InternalFailure"})
#: Cancellation reasons of a transaction that are worth retrying as a whole.
_RETRY_REASONS = frozenset(
    {"None", "TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}
)
_READS = frozenset({"get_item", "batch_get_item", "query", "scan", "transact_get_items"})
_WRITES = frozenset(
    {"put_item", "update_item", "delete_item", "batch_write_item", "transact_write_items"}
)
MAX_TRANSACTION_ITEMS = 100
MAX_TRANSACTION_BYTES = 4 * 1024 * 1024
_BATCH_GET = 100
_BATCH_WRITE = 25


class ConditionFailed(Exception):
    """A conditional write found the item otherwise: `item` is the item as stored (None if
    there is none, or the call did not ask for it), `retried` whether an earlier attempt of
    this call may have been applied (then `item` may be this call's own write)."""

    def __init__(self, item: Item | None, retried: bool) -> None:
        super().__init__("conditional check failed")
        self.item = item
        self.retried = retried


class CancelReason(msgspec.Struct, frozen=True):
    """Why one item of a cancelled transaction failed: DynamoDB's code (`None` when this item
    was fine), and the item as stored when a condition failed and it was asked for."""

    code: str
    message: str | None = None
    item: Item | None = None


class TransactionCancelled(Exception):
    """A transaction was cancelled because of its conditions (conflicts and throttling are
    retried, never raised as this): `reasons[i]` is the outcome of the i-th item."""

    def __init__(self, reasons: list[CancelReason], retried: bool) -> None:
        codes = ", ".join(r.code for r in reasons)
        super().__init__(f"transaction cancelled: [{codes}]")
        self.reasons = reasons
        self.retried = retried

    @property
    def failed(self) -> list[int]:
        """Indexes of the items whose condition failed."""
        return [i for i, r in enumerate(self.reasons) if r.code == "ConditionalCheckFailed"]


class RequestRefused(Exception):
    """DynamoDB refused a request as malformed (a `ValidationException` that is not about a
    size): a bug in the adapter, never retried, an `internal` error for the client."""


class ErrorCode(Unavailable):
    """DynamoDB answered with an error the adapter does not map to anything better (a missing
    table, denied credentials...): `unavailable` for the client, `code` for the adapter."""

    def __init__(self, op: str, code: str) -> None:
        super().__init__(f"dynamodb {op}: {code}")
        self.code = code


N = TypeVar("N", int, float)


def _changed(now: dict[str, N], before: dict[str, N]) -> dict[str, N]:
    """What moved between two counts by key (unchanged keys left out)."""
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


class CapacitySnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The capacity counters at one instant (`Capacity.snapshot`); subtract two for a delta."""

    calls: dict[str, int]
    read_units: float
    write_units: float
    units_by_table: dict[str, float]
    #: Data calls whose response reported no consumed capacity (moto's transactions).
    unreported: int
    #: Attempts sent again after a throttle or a transient failure.
    retries: int
    #: Throttles seen (each also counted in `retries` unless it was the last attempt).
    throttled: int

    def __sub__(self, other: CapacitySnapshot) -> CapacitySnapshot:
        return CapacitySnapshot(
            calls=_changed(self.calls, other.calls),
            read_units=self.read_units - other.read_units,
            write_units=self.write_units - other.write_units,
            units_by_table=_changed(self.units_by_table, other.units_by_table),
            unreported=self.unreported - other.unreported,
            retries=self.retries - other.retries,
            throttled=self.throttled - other.throttled,
        )


class Capacity:
    """Counters of what the store asked of DynamoDB: calls per operation, read and write
    capacity units (as DynamoDB reports them) in total and per table, retries and throttles.
    Plain additions on the event loop; read with `snapshot`."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.read_units = 0.0
        self.write_units = 0.0
        self.units_by_table: dict[str, float] = {}
        #: (table, "read" or "write") -> units: what the Prometheus counters export.
        self.units_by_kind: dict[tuple[str, str], float] = {}
        self.unreported = 0
        self.retries = 0
        self.throttled = 0

    def record(self, op: str, consumed: Any) -> None:
        self.calls[op] += 1
        entries = consumed if isinstance(consumed, list) else [consumed] if consumed else []
        if not entries:
            self.unreported += 1
            return
        for entry in entries:
            units = float(entry.get("CapacityUnits", 0.0))
            table = str(entry.get("TableName", "?"))
            self.units_by_table[table] = self.units_by_table.get(table, 0.0) + units
            kind = "read" if op in _READS else "write"
            self.units_by_kind[table, kind] = self.units_by_kind.get((table, kind), 0.0) + units
            if kind == "read":
                self.read_units += units
            else:
                self.write_units += units

    def snapshot(self) -> CapacitySnapshot:
        return CapacitySnapshot(
            calls=dict(self.calls),
            read_units=self.read_units,
            write_units=self.write_units,
            units_by_table=dict(self.units_by_table),
            unreported=self.unreported,
            retries=self.retries,
            throttled=self.throttled,
        )


class DynamoDb:
    """The client and tables of one deployment (`table_prefix` + each table's name).

    `endpoint_url` None means AWS; anything else a DynamoDB-compatible server (ScyllaDB's
    Alternator, moto, DynamoDB Local). Credentials left None come from botocore's usual chain
    (environment, shared config and credentials files, container or instance role).
    `create_tables`: `open` creates missing tables and indexes (on-demand billing) and enables
    TTL; otherwise it only checks that they exist as expected.
    """

    def __init__(
        self,
        *,
        table_prefix: str = "pigeon_",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        create_tables: bool = False,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_attempts: int = 8,
        backoff_base: float = 0.025,
        backoff_cap: float = 1.0,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_connections: int = 64,
        tables: Sequence[Table] = TABLES,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.prefix = table_prefix
        self.tables = tuple(tables)
        self.capacity = Capacity()
        self._endpoint = endpoint_url
        self._region = region
        self._create = create_tables
        self._credentials = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key}
        self._max_attempts = max_attempts
        self._base = backoff_base
        self._cap = backoff_cap
        self._config = AioConfig(
            retries={"total_max_attempts": 1},  # ours, below, are the only retries
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_connections,
        )
        self._rng = random.Random()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create or check the tables."""
        if self._stack is not None:
            return
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "dynamodb",
                    region_name=self._region,
                    endpoint_url=self._endpoint,
                    config=self._config,
                    **self._credentials,
                )
            )
            for table in self.tables:
                await self._ensure_table(table)
        except BaseException:
            await stack.aclose()
            self._client = None
            raise
        self._stack = stack

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    async def ping(self) -> None:
        """One strongly consistent read of a key that is never written (readiness): one
        attempt, no retries, `Unavailable` if it fails or is throttled."""
        await self.call(
            "get_item",
            idempotent=True,
            attempts=1,
            TableName=self.name(ACCOUNTS),
            Key=key("#ping"),
            ConsistentRead=True,
        )

    def name(self, table: Table) -> str:
        """The table's name in this deployment."""
        return self.prefix + table.name

    # -- the one call -----------------------------------------------------------------------------

    async def call(
        self, op: str, *, idempotent: bool, attempts: int | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Run one DynamoDB operation (`op` is the client's method name), retrying as the module
        says. Raises `ConditionFailed`, `TransactionCancelled`, `TooLarge`, `RequestRefused` or
        `Unavailable`."""
        client = self._client
        if client is None:
            raise Unavailable("store is closed")
        if op in _READS or op in _WRITES:
            kwargs.setdefault("ReturnConsumedCapacity", "TOTAL")
        limit = attempts or self._max_attempts
        for attempt in range(limit):
            try:
                response: dict[str, Any] = await getattr(client, op)(**kwargs)
            except ClientError as exc:
                error: Exception = self._retryable(op, exc, idempotent, attempt)
            except ParamValidationError as exc:
                raise RequestRefused(f"dynamodb {op}: {exc}") from exc
            except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                error = Unavailable(f"dynamodb {op}: {type(exc).__name__}")
                if not idempotent:
                    raise error from exc
            else:
                if "ReturnConsumedCapacity" in kwargs:
                    self.capacity.record(op, response.get("ConsumedCapacity"))
                else:
                    self.capacity.calls[op] += 1
                return response
            if attempt == limit - 1:
                log.warning("dynamodb %s failed %d times: %s", op, limit, error)
                raise error
            self.capacity.retries += 1
            await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _retryable(self, op: str, exc: ClientError, idempotent: bool, attempt: int) -> Exception:
        """The `Unavailable` to raise if this failure of `op` persists; raises at once what
        must not be retried."""
        code = _code(exc)
        if code == "ConditionalCheckFailedException":
            raise ConditionFailed(exc.response.get("Item"), attempt > 0) from None
        if code == "TransactionCanceledException":
            reasons = _reasons(exc)
            if any(r.code == "ConditionalCheckFailed" for r in reasons):
                raise TransactionCancelled(reasons, attempt > 0) from None
            if not reasons or any(r.code not in _RETRY_REASONS for r in reasons):
                raise self._refused(op, exc) from exc
            self.capacity.throttled += 1
        elif code in THROTTLED:
            self.capacity.throttled += 1
        elif not (idempotent and (code in TRANSIENT or _status(exc) >= 500)):
            raise self._refused(op, exc) from exc
        error = ErrorCode(op, code)
        error.__cause__ = exc
        return error

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return self._rng.uniform(0.0, min(self._cap, self._base * 2**attempt))

    @staticmethod
    def _refused(op: str, exc: ClientError) -> Exception:
        code = _code(exc)
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if code == "ValidationException" and message.lower().startswith("item size"):
            return TooLarge(f"dynamodb {op}: {message}")
        if code == "ValidationException":
            return RequestRefused(f"dynamodb {op}: {message}")
        return ErrorCode(op, code)

    # -- single items -----------------------------------------------------------------------------

    async def get(
        self, table: Table, item_key: Item, *, consistent: bool = True, projection: str = ""
    ) -> Item | None:
        """One item by key, or None. Strongly consistent unless asked otherwise."""
        kwargs: dict[str, Any] = {"ConsistentRead": consistent}
        if projection:
            kwargs["ProjectionExpression"] = projection
        response = await self.call(
            "get_item", idempotent=True, TableName=self.name(table), Key=item_key, **kwargs
        )
        found: Item | None = response.get("Item")
        return found

    async def put(
        self, table: Table, item: Item, *, condition: str = "", expr: Expr | None = None
    ) -> None:
        """Write a whole item; with `condition`, only if it holds (`ConditionFailed` with the
        stored item otherwise). Conditional puts are retried as idempotent, plain ones too (a
        repeated identical put changes nothing)."""
        check_item_size(item)
        kwargs = _conditional(condition, expr)
        await self.call(
            "put_item", idempotent=True, TableName=self.name(table), Item=item, **kwargs
        )

    async def put_new(self, table: Table, item: Item) -> None:
        """Write an item only if its key is free: `ConditionFailed` with the stored item if it
        is taken (the building block of uniqueness: usernames, cmids, direct chats)."""
        await self.put(table, item, condition=f"attribute_not_exists({PK})")

    async def update(
        self,
        table: Table,
        item_key: Item,
        update: str,
        expr: Expr,
        *,
        condition: str = "",
        returns: str = "NONE",
        idempotent: bool = False,
    ) -> Item:
        """UpdateItem. `returns` is DynamoDB's ReturnValues (`ALL_NEW`, `UPDATED_NEW`...); the
        attributes it asked for are returned ({} for NONE). Only an update that gives the same
        result when applied twice (SET to constants, a condition that a second application
        fails) may say `idempotent`: `ADD` and `SET x = x + :n` alone are not."""
        kwargs = _conditional(condition, expr)
        response = await self.call(
            "update_item",
            idempotent=idempotent,
            TableName=self.name(table),
            Key=item_key,
            UpdateExpression=update,
            ReturnValues=returns,
            **kwargs,
        )
        attributes: Item = response.get("Attributes", {})
        return attributes

    async def add(
        self, table: Table, item_key: Item, attribute: str, delta: int = 1, *, must_exist: bool
    ) -> int:
        """`ADD attribute :delta`, returning the new value: the atomic counter. An absent
        attribute counts from 0. With `must_exist`, a missing item raises `ConditionFailed`
        instead of being created. Not idempotent: never retried after an unknown outcome (a
        lost answer to a counter that moved is a number taken by nobody)."""
        expr = Expr()
        condition = f"attribute_exists({expr.name(PK)})" if must_exist else ""
        attributes = await self.update(
            table,
            item_key,
            f"ADD {expr.name(attribute)} {expr.value(delta)}",
            expr,
            condition=condition,
            returns="UPDATED_NEW",
        )
        return int(attributes[attribute]["N"])

    async def delete(
        self,
        table: Table,
        item_key: Item,
        *,
        condition: str = "",
        expr: Expr | None = None,
        returns_old: bool = False,
    ) -> Item | None:
        """Delete one item (idempotent: deleting a missing item is no error unless a condition
        says so). With `returns_old`, the item as it was (None if there was none): the way to
        take something exactly once, e.g. a one-time key."""
        kwargs = _conditional(condition, expr)
        if returns_old:
            kwargs["ReturnValues"] = "ALL_OLD"
        response = await self.call(
            "delete_item", idempotent=True, TableName=self.name(table), Key=item_key, **kwargs
        )
        old: Item | None = response.get("Attributes")
        return old

    # -- transactions -----------------------------------------------------------------------------

    def tx_put(
        self, table: Table, item: Item, condition: str = "", expr: Expr | None = None
    ) -> dict[str, Any]:
        """A Put for `transact_write`."""
        check_item_size(item)
        return {
            "Put": {"TableName": self.name(table), "Item": item, **_conditional(condition, expr)}
        }

    def tx_update(
        self, table: Table, item_key: Item, update: str, expr: Expr, condition: str = ""
    ) -> dict[str, Any]:
        """An Update for `transact_write`."""
        body = {"TableName": self.name(table), "Key": item_key, "UpdateExpression": update}
        return {"Update": body | _conditional(condition, expr)}

    def tx_delete(
        self, table: Table, item_key: Item, condition: str = "", expr: Expr | None = None
    ) -> dict[str, Any]:
        """A Delete for `transact_write`."""
        body = {"TableName": self.name(table), "Key": item_key}
        return {"Delete": body | _conditional(condition, expr)}

    def tx_check(self, table: Table, item_key: Item, condition: str, expr: Expr) -> dict[str, Any]:
        """A ConditionCheck for `transact_write`: the transaction happens only if it holds."""
        body = {"TableName": self.name(table), "Key": item_key}
        return {"ConditionCheck": body | _conditional(condition, expr)}

    async def transact_write(
        self, items: Sequence[dict[str, Any]], *, token: str | None = None
    ) -> None:
        """TransactWriteItems: all of `items` or none. A cancellation by conditions raises
        `TransactionCancelled` (its `failed` says which items); conflicts and throttling are
        retried. `token` (default: a new one per call) makes attempts of this call idempotent
        for DynamoDB's 10 minutes; pass the same token to repeat a call after a crash."""
        if not 1 <= len(items) <= MAX_TRANSACTION_ITEMS:
            raise ValueError(f"a transaction holds 1..{MAX_TRANSACTION_ITEMS} items")
        size = sum(item_size(i["Put"]["Item"]) for i in items if "Put" in i)
        if size > MAX_TRANSACTION_BYTES:
            raise TooLarge(f"transaction of {size} bytes (DynamoDB's limit: 4 MB)")
        await self.call(
            "transact_write_items",
            idempotent=True,
            TransactItems=list(items),
            ClientRequestToken=token or uuid.uuid4().hex,
        )

    # -- many items -------------------------------------------------------------------------------

    async def query(
        self,
        table: Table,
        key_condition: str,
        expr: Expr,
        *,
        index: Index | None = None,
        where: str = "",
        projection: str = "",
        forward: bool = True,
        consistent: bool = False,
        page_size: int | None = None,
    ) -> AsyncIterator[list[Item]]:
        """The pages of a Query, in key order (`forward=False`: descending). A page may be
        empty while more follow: DynamoDB filters (`where`) after it reads (`page_size` counts items
        read, not items kept). Strongly consistent reads are refused on a global index."""
        kwargs: dict[str, Any] = {"KeyConditionExpression": key_condition, **expr.kwargs()}
        if index is not None:
            kwargs["IndexName"] = index.name
        if where:
            kwargs["FilterExpression"] = where
        if projection:
            kwargs["ProjectionExpression"] = projection
        if page_size is not None:
            kwargs["Limit"] = page_size
        kwargs |= {"ScanIndexForward": forward, "ConsistentRead": consistent}
        while True:
            response = await self.call(
                "query", idempotent=True, TableName=self.name(table), **kwargs
            )
            yield list(response.get("Items", []))
            start = response.get("LastEvaluatedKey")
            if not start:
                return
            kwargs["ExclusiveStartKey"] = start

    async def query_items(
        self,
        table: Table,
        key_condition: str,
        expr: Expr,
        *,
        limit: int | None = None,
        **options: Any,
    ) -> list[Item]:
        """The items of a Query, at most `limit` of them after filtering (reading on past
        pages that the filter emptied)."""
        out: list[Item] = []
        async for page in self.query(table, key_condition, expr, **options):
            out += page
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    async def count(
        self,
        table: Table,
        key_condition: str,
        expr: Expr,
        *,
        index: Index | None = None,
        where: str = "",
        consistent: bool = False,
    ) -> int:
        """How many items a Query finds (after its filter), paging through. Select=COUNT
        costs what the Query costs: capacity is per item read, not per item returned."""
        kwargs: dict[str, Any] = {"KeyConditionExpression": key_condition, **expr.kwargs()}
        if index is not None:
            kwargs["IndexName"] = index.name
        if where:
            kwargs["FilterExpression"] = where
        total = 0
        while True:
            response = await self.call(
                "query",
                idempotent=True,
                TableName=self.name(table),
                Select="COUNT",
                ConsistentRead=consistent,
                **kwargs,
            )
            total += int(response.get("Count", 0))
            start = response.get("LastEvaluatedKey")
            if not start:
                return total
            kwargs["ExclusiveStartKey"] = start

    async def batch_get(
        self, table: Table, keys: Iterable[Item], *, consistent: bool = True, projection: str = ""
    ) -> list[Item]:
        """The items of these keys that exist (any order), 100 keys a call, unprocessed keys
        asked again with backoff (`Unavailable` if DynamoDB keeps leaving some)."""
        name = self.name(table)
        pending = _unique(keys)
        out: list[Item] = []
        extra: dict[str, Any] = {"ConsistentRead": consistent}
        if projection:
            extra["ProjectionExpression"] = projection
        for start in range(0, len(pending), _BATCH_GET):
            request = {name: {"Keys": pending[start : start + _BATCH_GET], **extra}}
            for attempt in range(self._max_attempts):
                response = await self.call("batch_get_item", idempotent=True, RequestItems=request)
                out += response.get("Responses", {}).get(name, [])
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                self.capacity.retries += 1
                await asyncio.sleep(self._backoff(attempt))
            else:
                raise Unavailable("dynamodb batch_get_item: keys left unprocessed")
        return out

    async def batch_write(
        self, table: Table, puts: Sequence[Item] = (), deletes: Sequence[Item] = ()
    ) -> None:
        """Unconditional puts and deletes, 25 a call, not atomic: for writes that are each
        idempotent and made visible by something else (inbox entries before their message is
        committed, cleanup). Unprocessed items are sent again with backoff."""
        for item in puts:
            check_item_size(item)
        requests = [{"PutRequest": {"Item": i}} for i in puts]
        requests += [{"DeleteRequest": {"Key": k}} for k in deletes]
        name = self.name(table)
        for start in range(0, len(requests), _BATCH_WRITE):
            request: dict[str, Any] = {name: requests[start : start + _BATCH_WRITE]}
            for attempt in range(self._max_attempts):
                response = await self.call(
                    "batch_write_item", idempotent=True, RequestItems=request
                )
                request = response.get("UnprocessedItems") or {}
                if not request:
                    break
                self.capacity.retries += 1
                await asyncio.sleep(self._backoff(attempt))
            else:
                raise Unavailable("dynamodb batch_write_item: items left unprocessed")

    # -- tables -----------------------------------------------------------------------------------

    async def _ensure_table(self, table: Table) -> None:
        name = self.name(table)
        description = await self._describe(name)
        if description is None:
            if not self._create:
                raise Unavailable(f"dynamodb table {name} does not exist (store.create_tables)")
            await self._create_table(table)
            description = await self._wait_active(name)
        _check_keys(name, description)
        present = {ix["IndexName"] for ix in description.get("GlobalSecondaryIndexes", [])}
        for index in table.indexes:
            if index.name in present:
                continue
            if not self._create:
                raise Unavailable(f"dynamodb table {name} lacks index {index.name}")
            await self._control(
                "update_table",
                TableName=name,
                AttributeDefinitions=_attributes((index,)),
                GlobalSecondaryIndexUpdates=[{"Create": _index_spec(index)}],
            )
            await self._wait_active(name)
        await self._ensure_ttl(name)

    async def _ensure_ttl(self, name: str) -> None:
        ttl = (await self._control("describe_time_to_live", TableName=name)).get(
            "TimeToLiveDescription", {}
        )
        status, attribute = ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")
        if status in ("ENABLED", "ENABLING") and attribute == EXPIRES:
            return
        if status in ("ENABLED", "ENABLING"):
            raise Unavailable(f"dynamodb table {name} expires items by {attribute}, not {EXPIRES}")
        if not self._create:
            log.warning("dynamodb table %s has no TTL: expired items stay until swept", name)
            return
        await self._control(
            "update_time_to_live",
            TableName=name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": EXPIRES},
        )

    async def _create_table(self, table: Table) -> None:
        kwargs: dict[str, Any] = {
            "TableName": self.name(table),
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": _attributes(table.indexes),
            "KeySchema": [
                {"AttributeName": PK, "KeyType": "HASH"},
                {"AttributeName": SK, "KeyType": "RANGE"},
            ],
        }
        if table.indexes:
            kwargs["GlobalSecondaryIndexes"] = [_index_spec(ix) for ix in table.indexes]
        try:
            await self._control("create_table", **kwargs)
        except ErrorCode as exc:  # another node is creating it right now
            if exc.code != "ResourceInUseException":
                raise

    async def _describe(self, name: str) -> dict[str, Any] | None:
        try:
            table: dict[str, Any] = (await self._control("describe_table", TableName=name))["Table"]
        except ErrorCode as exc:
            if exc.code == "ResourceNotFoundException":
                return None
            raise
        return table

    async def _wait_active(self, name: str, timeout: float = 600.0) -> dict[str, Any]:
        """Poll until the table and its indexes are ACTIVE (seconds on AWS; at once on moto)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        while True:
            description = await self._describe(name)
            if description is not None and _active(description):
                return description
            if loop.time() > deadline:
                raise Unavailable(f"dynamodb table {name} did not become active")
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _control(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """A control-plane call (tables, TTL): retried on throttling like any other."""
        return await self.call(op, idempotent=op.startswith("describe"), **kwargs)


def check_item_size(item: Item) -> None:
    """`TooLarge` if the item is over `MAX_ITEM_BYTES` (DynamoDB would refuse it)."""
    size = item_size(item)
    if size > MAX_ITEM_BYTES:
        raise TooLarge(f"item of {size} bytes (DynamoDB's limit: {MAX_ITEM_BYTES})")


def _conditional(condition: str, expr: Expr | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = expr.kwargs() if expr is not None else {}
    if condition:
        kwargs["ConditionExpression"] = condition
        kwargs["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
    return kwargs


def _unique(keys: Iterable[Item]) -> list[Item]:
    """BatchGetItem refuses a request that names one key twice."""
    seen: set[tuple[str, str]] = set()
    out = []
    for k in keys:
        ident = (k[PK]["S"], k[SK]["S"])
        if ident not in seen:
            seen.add(ident)
            out.append(k)
    return out


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _reasons(exc: ClientError) -> list[CancelReason]:
    return [
        CancelReason(
            code=str(r.get("Code") or "None"), message=r.get("Message"), item=r.get("Item")
        )
        for r in exc.response.get("CancellationReasons", [])
    ]


def _attributes(indexes: Iterable[Index]) -> list[dict[str, str]]:
    names = [PK, SK] + [a for ix in indexes for a in (ix.pk, ix.sk)]
    return [{"AttributeName": a, "AttributeType": "S"} for a in names]


def _index_spec(index: Index) -> dict[str, Any]:
    return {
        "IndexName": index.name,
        "KeySchema": [
            {"AttributeName": index.pk, "KeyType": "HASH"},
            {"AttributeName": index.sk, "KeyType": "RANGE"},
        ],
        "Projection": {"ProjectionType": index.projection},
    }


def _active(description: dict[str, Any]) -> bool:
    indexes = description.get("GlobalSecondaryIndexes", [])
    return description.get("TableStatus") == "ACTIVE" and all(
        ix.get("IndexStatus", "ACTIVE") == "ACTIVE" for ix in indexes
    )


def _check_keys(name: str, description: dict[str, Any]) -> None:
    schema = {k["AttributeName"]: k["KeyType"] for k in description.get("KeySchema", [])}
    if schema != {PK: "HASH", SK: "RANGE"}:
        raise Unavailable(f"dynamodb table {name} has the key {schema}, not pk + sk")
