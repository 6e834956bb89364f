"""Versioned PostgreSQL schema. Migrations only ever append; each runs once, in order, on start.

Several nodes may start at once: `migrate` holds a transaction-level advisory lock while it reads
`schema_version` and applies what is missing, so exactly one of them migrates and the others then
find nothing to do. Every migration runs in that one transaction: all or nothing.

Identifiers are ULIDs (ASCII) and compare bytewise (`COLLATE "C"`): cheaper than the database's
linguistic collation, and the same order as SQLite's. Times are integer milliseconds (`bigint`).
Rows updated on every message (a device's counters, a chat's last seq, a member's marks, a
message's pending count) leave free space in their pages (`fillfactor`) so that those updates,
which touch no indexed column, stay HOT: no index writes, and pages clean themselves.

Large installations would partition `messages`, `inbox` and `receipt_log` by time (`PARTITION BY
RANGE (at)`, one partition per day or week): retention then drops whole partitions instead of
deleting rows, and the sweeper's chunked deletes (`at` indexes) are only the fallback for the
partition that straddles the cut-off. The primary keys would have to include `at`, which is why it
is not done at this size; see docs/architecture.md.
"""

from __future__ import annotations

import logging
import time

import asyncpg

from pigeon.adapters.store.postgres import batch_functions, functions, push_schema, set_functions
from pigeon.adapters.store.postgres import keys as e2e_keys

log = logging.getLogger(__name__)

#: Key of the advisory lock that serialises migrations across nodes ("pigeon" in ASCII).
MIGRATION_LOCK = 0x706967656F6E

_TABLES = """
CREATE TABLE users (
    id text COLLATE "C" PRIMARY KEY,
    username text NOT NULL,
    username_key text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at bigint NOT NULL,
    visibility text NOT NULL DEFAULT 'chats',
    last_seen_at bigint
);
CREATE TABLE devices (
    id text COLLATE "C" PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL REFERENCES users(id),
    name text NOT NULL,
    token_hash bytea NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    next_iseq bigint NOT NULL DEFAULT 1,
    acked_iseq bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 70);
-- list_devices and every "devices of these users" lookup, in their stable order
CREATE INDEX devices_by_user ON devices (user_id, created_at, id);
CREATE TABLE chats (
    id text COLLATE "C" PRIMARY KEY,
    kind text NOT NULL,
    name text,
    created_by text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    -- "<user>:<user>" sorted, for direct chats only: one direct chat per pair, race-free
    direct_key text COLLATE "C" UNIQUE,
    version bigint NOT NULL DEFAULT 0,
    next_pos integer NOT NULL DEFAULT 0,
    last_seq bigint NOT NULL DEFAULT 0,
    last_activity_at bigint NOT NULL,
    last_sender text COLLATE "C"
) WITH (fillfactor = 70);
CREATE TABLE members (
    chat_id text COLLATE "C" NOT NULL REFERENCES chats(id),
    user_id text COLLATE "C" NOT NULL REFERENCES users(id),
    role text NOT NULL,
    pos integer NOT NULL,
    delivered_seq bigint NOT NULL DEFAULT 0,
    read_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id, user_id)
) WITH (fillfactor = 70);
CREATE INDEX members_by_user ON members (user_id);
-- The chat-list preview lives on the message row (not on the chat, as in SQLite) so that
-- erasing a body on ack never has to lock the chat row: see functions.py, lock order.
CREATE TABLE messages (
    id text COLLATE "C" PRIMARY KEY,
    chat_id text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    sender text COLLATE "C" NOT NULL,
    sender_device text COLLATE "C" NOT NULL,
    cmid text COLLATE "C" NOT NULL,
    at bigint NOT NULL,
    raw bytea,
    preview text,
    pending integer NOT NULL
) WITH (fillfactor = 85);
CREATE UNIQUE INDEX messages_by_chat_seq ON messages (chat_id, seq);
CREATE UNIQUE INDEX messages_by_cmid ON messages (sender_device, cmid);
CREATE INDEX messages_by_at ON messages (at);
CREATE TABLE inbox (
    device_id text COLLATE "C" NOT NULL,
    iseq bigint NOT NULL,
    message_id text COLLATE "C",
    payload bytea,
    at bigint NOT NULL,
    PRIMARY KEY (device_id, iseq)
);
CREATE INDEX inbox_by_at ON inbox (at);
CREATE TABLE receipt_log (
    chat_id text COLLATE "C" NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    kind text NOT NULL,
    seq bigint NOT NULL,
    at bigint NOT NULL,
    PRIMARY KEY (chat_id, user_id, kind, seq)
);
CREATE INDEX receipt_log_by_at ON receipt_log (at);
"""

# Attachment metadata (the bytes are in a BlobStore under the id) and the chats each one was
# shared into. `meta` is what the server learnt after the upload (thumbnail, dimensions).
_ATTACHMENTS = """
CREATE TABLE attachments (
    id text COLLATE "C" PRIMARY KEY,
    owner text COLLATE "C" NOT NULL REFERENCES users(id),
    content_type text NOT NULL,
    size bigint NOT NULL,
    sha256 text NOT NULL,
    filename text,
    encrypted boolean NOT NULL,
    created_at bigint NOT NULL,
    uploaded_at bigint,
    meta jsonb NOT NULL DEFAULT '{}'
);
-- the upload quota: an owner's newest attachments
CREATE INDEX attachments_by_owner ON attachments (owner, created_at);
-- the sweep, in (created_at, id) order
CREATE INDEX attachments_by_created ON attachments (created_at, id);
CREATE TABLE attachment_chats (
    attachment_id text COLLATE "C" NOT NULL REFERENCES attachments(id),
    chat_id text COLLATE "C" NOT NULL REFERENCES chats(id),
    PRIMARY KEY (attachment_id, chat_id)
);
"""

#: A message that reaches no device is never stored (its body is dropped at once): its chat-list
#: preview must not keep the text either.
_NO_PREVIEW_WITHOUT_RECIPIENTS = """
CREATE FUNCTION pigeon_no_orphan_preview() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.pending = 0 THEN
        NEW.preview := NULL;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER messages_no_orphan_preview BEFORE INSERT ON messages
FOR EACH ROW EXECUTE FUNCTION pigeon_no_orphan_preview();
"""

#: Single-use registration invites (`registration = "invite"`), by the SHA-256 of their code.
_INVITES = """
CREATE TABLE invites (
    code_hash bytea PRIMARY KEY,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL
);
"""

#: Accounts an operator disabled (`pigeon admin users disable`; NULL while enabled), and the
#: operator's pages of users by name, in bytewise order as on SQLite (`username_key`'s unique
#: index has the database's collation). Adding a nullable column rewrites nothing.
_DISABLED_USERS = """
ALTER TABLE users ADD COLUMN disabled_at bigint;
CREATE INDEX users_by_name ON users (username_key COLLATE "C");
"""

#: (version, SQL). Never edit a released migration: append a new one (functions included, with
#: CREATE OR REPLACE).
MIGRATIONS: list[tuple[int, str]] = [
    (1, _TABLES),
    (2, functions.V2),
    (3, _ATTACHMENTS),
    (4, _NO_PREVIEW_WITHOUT_RECIPIENTS),
    (5, _INVITES),
    (6, batch_functions.V6),
    (7, push_schema.V7),
    (8, _DISABLED_USERS),
    (9, set_functions.V9),
    (10, e2e_keys.V10),
]


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every migration newer than the database's recorded version, under the migration
    lock, in one transaction. Returns the versions applied (empty when up to date)."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version integer PRIMARY KEY, applied_at bigint NOT NULL)"
        )
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                version,
                int(time.time() * 1000),
            )
            applied.append(version)
    for version in applied:  # after the commit: logged only once they hold
        log.info("store schema migration %d applied", version, extra={"version": version})
    return applied
