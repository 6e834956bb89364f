"""DynamoDB store: the seeds' database, for a cluster whose store must scale out (AWS DynamoDB,
or any server that speaks its API, such as ScyllaDB's Alternator).

Why it exists: PostgreSQL is one server, the ceiling of every cluster; DynamoDB spreads each
table over as many partitions as the load needs. The table design, and how the message path
keeps its guarantees without multi-statement transactions, are in docs/architecture.md
("DynamoDB store").

The package: `db.py` (client, tables, retries, capacity), `codec.py` (item encoding) and
`tables.py` (the tables and indexes) are the foundation; each sub-store of the `Store` port is
a module of its own beside them (`accounts.py`, `chats.py`, `messages.py`, `attachments.py`,
`push.py`, `keys.py`), given the shared `DynamoDb` in its constructor and set as an attribute
of `DynamoStore` here. `recovery.py` is the store's cold-path worker (roll-forward of sends
interrupted by a crash), which the app starts beside the retention sweeper.
"""

from __future__ import annotations

from pigeon.adapters.store.dynamodb.accounts import DynamoAccounts
from pigeon.adapters.store.dynamodb.attachments import DynamoAttachments
from pigeon.adapters.store.dynamodb.chats import DynamoChats
from pigeon.adapters.store.dynamodb.db import DynamoDb
from pigeon.adapters.store.dynamodb.inbox import DAY_MS, Policy
from pigeon.adapters.store.dynamodb.keys import DynamoKeys
from pigeon.adapters.store.dynamodb.messages import DynamoMessages
from pigeon.adapters.store.dynamodb.push import DynamoPush
from pigeon.ports import (
    AccountStore,
    AttachmentStore,
    ChatStore,
    Clock,
    KeyStore,
    MessageStore,
    PushStore,
    Store,
)
from pigeon.services.clock import SystemClock


class DynamoStore:
    """The sub-stores over one `DynamoDb` (one client, one set of tables).

    `clock` decides leases and which TTLs have passed; `retention_ms` is the TTL of messages,
    events and inbox entries (counted from their write) and, when given, of attachments
    (counted from their creation, plus a day: the sweep normally deletes them, with their
    blobs, first). Without it attachments carry no TTL and messages the default 30 days.
    """

    def __init__(
        self,
        db: DynamoDb,
        *,
        clock: Clock | None = None,
        retention_ms: int | None = None,
        lock_wait_ms: int = 10_000,
    ) -> None:
        clock = clock or SystemClock()
        policy = Policy(clock=clock, retention_ms=retention_ms or 30 * DAY_MS)
        self.db = db
        self.policy = policy
        self._messages = DynamoMessages(db, policy, lock_wait_ms=lock_wait_ms)
        self.messages: MessageStore = self._messages
        self.accounts: AccountStore = DynamoAccounts(db, self._messages.release_inbox)
        self.chats: ChatStore = DynamoChats(db, policy, lock_wait_ms=lock_wait_ms)
        self.attachments: AttachmentStore = DynamoAttachments(db, retention_ms, clock)
        self.push: PushStore = DynamoPush(db, clock)
        self.keys: KeyStore = DynamoKeys(db, policy)

    async def open(self) -> None:
        """Connect; create missing tables and indexes if allowed, else check they exist."""
        await self.db.open()

    async def aclose(self) -> None:
        await self.db.aclose()

    async def ping(self) -> None:
        await self.db.ping()

    async def recover(self, since: int | None = None) -> int:
        """Roll forward the sends and events a crash left pending past their lease, among the
        records written since `since` (ms; None: the last hour): `DynamoMessages.recover`."""
        return await self._messages.recover(since)

    async def recover_turn(self, owner: str, hold_ms: int, overlap_ms: int) -> int | None:
        """`recover` from where the last pass of any node left off, if it is `owner`'s turn
        (one node at a time): `DynamoMessages.recover_turn`."""
        return await self._messages.recover_turn(owner, hold_ms, overlap_ms)


_check: type[Store] = DynamoStore
