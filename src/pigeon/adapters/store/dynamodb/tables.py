"""The DynamoDB store's tables, their secondary indexes, and the shard functions of their keys.

Why it exists: table creation, the sub-stores and the tests must agree on one description of the
tables; this is it (docs/architecture.md, "DynamoDB store", explains each key). Every table has
the key `pk` (S, partition) + `sk` (S, sort), on-demand billing and TTL on `expires`; every
index has the key `<index>_pk` + `<index>_sk` (S), set only on the items it indexes (sparse).

A sub-store adds what it needs here (a new index is a new table attribute pair and a new
`Index`), and `DynamoDb.open` creates it where tables may be created.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Index:
    """A global secondary index. `projection` KEYS_ONLY unless a hot read needs more: an index
    that projects an attribute is written again whenever that attribute changes."""

    name: str
    projection: Literal["KEYS_ONLY", "ALL"] = "KEYS_ONLY"

    @property
    def pk(self) -> str:
        return f"{self.name}_pk"

    @property
    def sk(self) -> str:
        return f"{self.name}_sk"


@dataclass(frozen=True)
class Table:
    """One table: its name without the deployment's prefix, and its indexes."""

    name: str
    indexes: tuple[Index, ...] = ()

    def index(self, name: str) -> Index:
        for ix in self.indexes:
            if ix.name == name:
                return ix
        raise KeyError(f"table {self.name} has no index {name}")


#: Users (by their case-folded username too), devices, token hashes, invites.
ACCOUNTS = Table("accounts", (Index("by_name"),))
#: Chats, their members, the one direct chat of each pair; a user's chats by `by_user`.
CHATS = Table("chats", (Index("by_user"),))
#: Messages by (chat, seq), (device, cmid) claims, message-id pointers, the commit records of
#: other inbox events, the receipt log; `by_time` finds records to sweep and to recover.
MESSAGES = Table("messages", (Index("by_time"),))
#: Each device's inbox head (iseq counter, ack, reservations) and its entries by iseq.
INBOX = Table("inbox")
#: Attachment records, the chats they were shared into, each owner's creation window.
ATTACHMENTS = Table("attachments", (Index("by_day"),))
#: Push targets, the outbox of push jobs (due ones by `due`), the policy, dead letters.
PUSH = Table("push", (Index("due"),))
#: Each device's published keys and its one-time keys.
KEYS = Table("keys")

TABLES: tuple[Table, ...] = (ACCOUNTS, CHATS, MESSAGES, INBOX, ATTACHMENTS, PUSH, KEYS)

#: Partitions of one hour of `by_time` (write rate per index partition is capped by DynamoDB at
#: 1000 WCU/s: 64 shards carry ~60k records/s; raise it before the seeds' peak).
TIME_SHARDS = 64
#: Partitions of the push queue's `due` index.
DUE_SHARDS = 16


def shard(value: str, shards: int) -> int:
    """A stable shard of `value` in range(shards): CRC-32, the same in every process (Python's
    `hash` of a str is salted per process)."""
    return zlib.crc32(value.encode()) % shards
