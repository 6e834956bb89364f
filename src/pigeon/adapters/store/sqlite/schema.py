"""Versioned SQLite schema. Migrations only ever append; each runs once, in order, on start."""

from __future__ import annotations

import logging
import sqlite3
import time


def _split(script: str) -> list[str]:
    return [part for part in script.split(";") if part.strip()]


log = logging.getLogger(__name__)

MIGRATIONS: list[tuple[int, str | list[str]]] = [
    (
        1,
        """
        CREATE TABLE users (
            id TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            username_key TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            token_hash BLOB NOT NULL UNIQUE,
            created_at INTEGER NOT NULL,
            next_iseq INTEGER NOT NULL DEFAULT 1,
            acked_iseq INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX devices_by_user ON devices(user_id);
        CREATE TABLE chats (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            name TEXT,
            created_by TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            direct_key TEXT UNIQUE,
            version INTEGER NOT NULL DEFAULT 0,
            next_pos INTEGER NOT NULL DEFAULT 0,
            last_seq INTEGER NOT NULL DEFAULT 0,
            last_activity_at INTEGER NOT NULL,
            last_sender TEXT,
            last_preview TEXT
        );
        CREATE TABLE members (
            chat_id TEXT NOT NULL REFERENCES chats(id),
            user_id TEXT NOT NULL REFERENCES users(id),
            role TEXT NOT NULL,
            pos INTEGER NOT NULL,
            delivered_seq INTEGER NOT NULL DEFAULT 0,
            read_seq INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (chat_id, user_id)
        ) WITHOUT ROWID;
        CREATE INDEX members_by_user ON members(user_id);
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            chat_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            sender TEXT NOT NULL,
            sender_device TEXT NOT NULL,
            cmid TEXT NOT NULL,
            at INTEGER NOT NULL,
            raw BLOB,
            pending INTEGER NOT NULL
        );
        CREATE UNIQUE INDEX messages_by_chat_seq ON messages(chat_id, seq);
        CREATE UNIQUE INDEX messages_by_cmid ON messages(sender_device, cmid);
        CREATE INDEX messages_by_at ON messages(at);
        CREATE TABLE inbox (
            device_id TEXT NOT NULL,
            iseq INTEGER NOT NULL,
            message_id TEXT,
            payload BLOB,
            at INTEGER NOT NULL,
            PRIMARY KEY (device_id, iseq)
        ) WITHOUT ROWID;
        CREATE INDEX inbox_by_at ON inbox(at);
        CREATE TABLE receipt_log (
            chat_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            seq INTEGER NOT NULL,
            at INTEGER NOT NULL,
            PRIMARY KEY (chat_id, user_id, kind, seq)
        ) WITHOUT ROWID;
        CREATE INDEX receipt_log_by_at ON receipt_log(at);
        """,
    ),
    (
        2,
        """
        ALTER TABLE users ADD COLUMN visibility TEXT NOT NULL DEFAULT 'chats';
        ALTER TABLE users ADD COLUMN last_seen_at INTEGER;
        """,
    ),
    (
        3,
        """
        CREATE TABLE attachments (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL REFERENCES users(id),
            content_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            filename TEXT,
            encrypted INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            uploaded_at INTEGER,
            meta TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX attachments_by_owner ON attachments(owner, created_at);
        CREATE INDEX attachments_by_created ON attachments(created_at, id);
        CREATE TABLE attachment_chats (
            attachment_id TEXT NOT NULL REFERENCES attachments(id),
            chat_id TEXT NOT NULL REFERENCES chats(id),
            PRIMARY KEY (attachment_id, chat_id)
        ) WITHOUT ROWID;
        """,
    ),
    (
        4,
        """
        CREATE TABLE invites (
            code_hash BLOB PRIMARY KEY,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        ) WITHOUT ROWID;
        """,
    ),
    (
        5,
        # Push: targets, the outbox (`push_jobs`, also the embedded queue) and its dead letters.
        # The trigger is the outbox: it marks a device's job of the chat pending in the
        # transaction that appends the message entry. It writes only when the job was idle (a
        # burst is one write), and costs one index probe for devices without a target. A job's
        # `due_at` is when it may be claimed: its grace and its window (`push_policy`, set by
        # the worker's settings) are in it, so a claim is a range of the `push_jobs_due` index.
        [
            *_split(
                """
                ALTER TABLE users ADD COLUMN push_names INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE messages ADD COLUMN push_preview TEXT;
                CREATE TABLE push_targets (
                    device_id TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
                    target TEXT,
                    removed_reason TEXT,
                    updated_at INTEGER NOT NULL
                ) WITHOUT ROWID;
                CREATE TABLE push_jobs (
                    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                    chat_id TEXT NOT NULL,
                    pending INTEGER NOT NULL,
                    last_iseq INTEGER NOT NULL DEFAULT 0,
                    invite_iseq INTEGER NOT NULL DEFAULT 0,
                    due_at INTEGER NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    leased_until INTEGER NOT NULL DEFAULT 0,
                    pushed_at INTEGER NOT NULL DEFAULT 0,
                    PRIMARY KEY (device_id, chat_id)
                ) WITHOUT ROWID;
                CREATE INDEX push_jobs_due ON push_jobs(due_at) WHERE pending = 1;
                CREATE INDEX push_jobs_idle ON push_jobs(pushed_at) WHERE pending = 0;
                CREATE TABLE push_policy (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    grace_ms INTEGER NOT NULL,
                    window_ms INTEGER NOT NULL
                );
                INSERT INTO push_policy VALUES (1, 0, 0);
                CREATE TABLE push_dead (
                    id INTEGER PRIMARY KEY,
                    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
                    chat_id TEXT NOT NULL,
                    invite_iseq INTEGER NOT NULL,
                    attempts INTEGER NOT NULL,
                    error TEXT NOT NULL,
                    failed_at INTEGER NOT NULL
                );
                """
            ),
            """
            CREATE TRIGGER push_outbox AFTER INSERT ON inbox
            WHEN NEW.message_id IS NOT NULL AND EXISTS (
                SELECT 1 FROM push_targets WHERE device_id = NEW.device_id AND target IS NOT NULL
            )
            BEGIN
                INSERT INTO push_jobs (device_id, chat_id, pending, due_at)
                VALUES (
                    NEW.device_id,
                    (SELECT chat_id FROM messages WHERE id = NEW.message_id),
                    1,
                    NEW.at + (SELECT grace_ms FROM push_policy)
                )
                ON CONFLICT (device_id, chat_id) DO UPDATE SET
                    pending = 1,
                    due_at = max(excluded.due_at, pushed_at + (SELECT window_ms FROM push_policy))
                WHERE pending = 0;
            END
            """,
        ],
    ),
    (
        6,
        # Accounts an operator disabled (`pigeon admin users disable`): NULL while enabled.
        # (Pages of users by name use the unique index on `username_key`.)
        """
        ALTER TABLE users ADD COLUMN disabled_at INTEGER;
        """,
    ),
    (
        7,
        # End-to-end encryption (keys.py): each device's public identity keys and fallback key,
        # its one-time keys (deleted as they are claimed), both deleted with their device; and
        # chats created encrypted, which refuse plaintext.
        """
        CREATE TABLE device_keys (
            device_id TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
            curve25519 TEXT NOT NULL,
            ed25519 TEXT NOT NULL,
            bundle TEXT NOT NULL,
            signature TEXT NOT NULL,
            fallback_id TEXT,
            fallback_key TEXT,
            fallback_signature TEXT,
            fallback_used INTEGER NOT NULL DEFAULT 0,
            published_at INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE one_time_keys (
            device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            key_id TEXT NOT NULL,
            key TEXT NOT NULL,
            signature TEXT NOT NULL,
            PRIMARY KEY (device_id, key_id)
        ) WITHOUT ROWID;
        ALTER TABLE chats ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        8,
        # A user's devices in the order the message path hands out their entries (oldest
        # first): the send's member query and a receipt's targets read them in index order
        # instead of sorting them per statement (SQLite's sorter, allocated per execution).
        """
        CREATE INDEX devices_by_user_created ON devices(user_id, created_at, id);
        DROP INDEX devices_by_user;
        """,
    ),
    (
        9,
        # The retention sweep finds expired messages and inbox entries in the orders their
        # tables keep (sweep.py): these indexes were written on the message path for it alone.
        """
        DROP INDEX messages_by_at;
        DROP INDEX inbox_by_at;
        """,
    ),
]


def migrate(conn: sqlite3.Connection) -> None:
    """Apply every migration newer than the database's recorded version, each atomically."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at INTEGER)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    for version, sql in MIGRATIONS:
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?)", (version, int(time.time() * 1000))
            )
            conn.execute("COMMIT")
            log.info("store schema migration %d applied", version, extra={"version": version})
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _statements(script: str | list[str]) -> list[str]:
    """A migration's statements: a script split on `;`, or a list given as such (a trigger's
    body holds `;`s of its own)."""
    return script if isinstance(script, list) else _split(script)
