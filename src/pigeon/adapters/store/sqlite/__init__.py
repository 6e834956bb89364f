"""SQLite store: the embedded default. One database file in WAL mode under the data dir."""

from __future__ import annotations

from pathlib import Path

from pigeon.adapters.store.sqlite.accounts import SqliteAccounts
from pigeon.adapters.store.sqlite.attachments import SqliteAttachments
from pigeon.adapters.store.sqlite.chats import SqliteChats
from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.adapters.store.sqlite.keys import SqliteKeys
from pigeon.adapters.store.sqlite.messages import SqliteMessages
from pigeon.adapters.store.sqlite.push import SqlitePush
from pigeon.adapters.store.sqlite.schema import migrate
from pigeon.ports import (
    AccountStore,
    AttachmentStore,
    ChatStore,
    KeyStore,
    MessageStore,
    PushStore,
    Store,
)


class SqliteStore:
    """The sub-stores over one SQLite database with group commit."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", max_batch: int = 4096) -> None:
        self.db = SqliteDb(path, synchronous=synchronous, max_batch=max_batch)
        self.accounts: AccountStore = SqliteAccounts(self.db)
        self.chats: ChatStore = SqliteChats(self.db)
        self.messages: MessageStore = SqliteMessages(self.db)
        self.attachments: AttachmentStore = SqliteAttachments(self.db)
        self.push: PushStore = SqlitePush(self.db)
        self.keys: KeyStore = SqliteKeys(self.db)

    async def open(self) -> None:
        await self.db.open(migrate)

    async def aclose(self) -> None:
        await self.db.aclose()

    async def ping(self) -> None:
        await self.db.ping()


_check: type[Store] = SqliteStore
_check_chats: type[ChatStore] = SqliteChats
_check_messages: type[MessageStore] = SqliteMessages
