"""DynamoDB store: the seeds' database, for a cluster whose store must scale out (AWS DynamoDB,
or any server that speaks its API, such as ScyllaDB's Alternator).

Why it exists: PostgreSQL is one server, the ceiling of every cluster; DynamoDB spreads each
table over as many partitions as the load needs. The table design, and how the message path
keeps its guarantees without multi-statement transactions, are in docs/architecture.md
("DynamoDB store").

This package is built in steps. `db.py` (client, tables, retries, capacity), `codec.py` (item
encoding) and `tables.py` (the tables and indexes) are the foundation; each sub-store of the
`Store` port is a module of its own beside them (`accounts.py`, `chats.py`, `messages.py`,
`attachments.py`, `push.py`, `keys.py`), given the shared `DynamoDb` in its constructor and
set as an attribute of `DynamoStore` in `__init__`. All six exist and `DynamoStore` type-checks
as a `Store`; it is not selectable in the settings until it also runs the whole contract suite,
the end-to-end and the fault suites (then: `StoreSettings`, `app.build_store`, the contract
suite's adapters).
"""

from __future__ import annotations

from pigeon.adapters.store.dynamodb.accounts import DynamoAccounts
from pigeon.adapters.store.dynamodb.attachments import DynamoAttachments
from pigeon.adapters.store.dynamodb.chats import DynamoChats
from pigeon.adapters.store.dynamodb.db import DynamoDb
from pigeon.adapters.store.dynamodb.keys import DynamoKeys
from pigeon.adapters.store.dynamodb.messages import DynamoMessages
from pigeon.adapters.store.dynamodb.push import DynamoPush
from pigeon.ports import (
    AccountStore,
    AttachmentStore,
    ChatStore,
    KeyStore,
    MessageStore,
    PushStore,
    Store,
)


class DynamoStore:
    """The sub-stores over one `DynamoDb` (one client, one set of tables)."""

    def __init__(self, db: DynamoDb) -> None:
        self.db = db
        self.messages: MessageStore = (messages := DynamoMessages(db))
        self.accounts: AccountStore = DynamoAccounts(db, messages.release_inbox)
        self.chats: ChatStore = DynamoChats(db)
        self.attachments: AttachmentStore = DynamoAttachments(db)
        self.push: PushStore = DynamoPush(db)
        self.keys: KeyStore = DynamoKeys(db)

    async def open(self) -> None:
        """Connect; create missing tables and indexes if allowed, else check they exist."""
        await self.db.open()

    async def aclose(self) -> None:
        await self.db.aclose()

    async def ping(self) -> None:
        await self.db.ping()


_check: type[Store] = DynamoStore
