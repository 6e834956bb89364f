"""PostgreSQL store: the shared store of a cluster of nodes.

Every node opens its own asyncpg pool on the same database; correctness under concurrent writers
on many nodes comes from row locks taken in one global order (see `functions.py`), not from any
coordination between nodes. Schema migrations are versioned and run under an advisory lock at
start-up, so nodes may start together.
"""

from __future__ import annotations

from pigeon.adapters.store.postgres.accounts import PgAccounts
from pigeon.adapters.store.postgres.attachments import PgAttachments
from pigeon.adapters.store.postgres.chats import PgChats
from pigeon.adapters.store.postgres.db import PgDb
from pigeon.adapters.store.postgres.keys import PgKeys
from pigeon.adapters.store.postgres.messages import PgMessages
from pigeon.adapters.store.postgres.push import PgPush
from pigeon.adapters.store.postgres.schema import migrate
from pigeon.ports import (
    AccountStore,
    AttachmentStore,
    ChatStore,
    KeyStore,
    MessageStore,
    PushStore,
    Store,
)


class PostgresStore:
    """The sub-stores over one PostgreSQL database, through a connection pool."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int,
        max_connections: int,
        command_timeout: float = 5.0,
        batches_in_flight: int = 1,
        max_batch: int = 256,
    ) -> None:
        self.db = PgDb(
            dsn,
            min_connections=min_connections,
            max_connections=max_connections,
            command_timeout=command_timeout,
        )
        self.accounts: AccountStore = PgAccounts(self.db)
        self.chats: ChatStore = PgChats(self.db)
        self.messages: MessageStore = PgMessages(
            self.db, max_inflight=batches_in_flight, max_batch=max_batch
        )
        self.attachments: AttachmentStore = PgAttachments(self.db)
        self.push: PushStore = PgPush(self.db)
        self.keys: KeyStore = PgKeys(self.db)

    async def open(self) -> None:
        await self.db.open(migrate)

    async def aclose(self) -> None:
        await self.db.aclose()

    async def ping(self) -> None:
        await self.db.ping()


_check: type[Store] = PostgresStore
