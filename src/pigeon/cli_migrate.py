"""`pigeon migrate-store --to postgresql://…`: a one-node deployment's SQLite store, copied into
an empty PostgreSQL database. The README's scale path is "start on SQLite, move to
PostgreSQL"; this is the move (docs/operations.md, "Moving from SQLite to PostgreSQL").

Why a tool that knows both engines: nothing else can carry a deployment across without losing
what makes it work. Tokens are stored as hashes, so devices must keep their rows; every device's
undelivered inbox entries must keep their `iseq` (the SDK acks cumulatively and detects gaps by
them); chats, devices and the dead letters must go on counting where they stopped. A copy of
rows through the ports would renumber what the stores assign, so the copy is row for row, table
by table, with the SQL of each engine kept in this module.

What it guarantees:
- One consistent snapshot of SQLite: the database is opened with an exclusive lock and read in
  one transaction. Taking that lock is also how a running server is detected (every connection
  of a server keeps a shared lock on a WAL database): the command then refuses, and a server
  started meanwhile waits for it. It is an advisory file lock: on a network file system that
  does not honour them, stop the server first.
- The target's schema is what `PostgresStore` migrates it to (opened first, as a node would),
  and it must hold no data. Both schemas are read from the databases themselves (SQLite at
  whatever migration level it is) and compared column by column: a SQLite table or column with
  no place in PostgreSQL is refused if it holds data, never dropped (an empty one is
  reported); a PostgreSQL column with no source keeps its default and is reported; the one
  known difference, the chat-list preview (on the chat row in SQLite, on the chat's last
  message row in PostgreSQL), is carried over (`MOVED`).
- All of it in one PostgreSQL transaction: COPY (binary) per table, identity sequences set past
  the copied ids, then row counts and counters verified. Any failure rolls back: the target is
  left without data and the command can be run again.

Media files are not touched: the blob store (a directory, or S3) is shared by reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer

from pigeon.config import PostgresSettings, S3BlobSettings, Settings, SqliteSettings, load_settings
from pigeon.domain.errors import PigeonError

if TYPE_CHECKING:
    import asyncpg

#: The order tables are loaded in: referenced tables first (foreign keys), and `inbox` before
#: `push_targets`, so that the push outbox trigger on `inbox` finds no target and derives no
#: job (the jobs are copied as they are). Tables both engines have that are not listed follow,
#: by name.
LOAD_ORDER = (
    "users",
    "devices",
    "chats",
    "members",
    "messages",
    "inbox",
    "receipt_log",
    "attachments",
    "attachment_chats",
    "invites",
    "push_targets",
    "push_jobs",
    "push_policy",
    "push_dead",
)
#: Each engine's record of its own migrations: not data, never copied.
SQLITE_BOOKKEEPING = frozenset({"schema_migrations"})
PG_BOOKKEEPING = frozenset({"schema_version"})
#: Tables a PostgreSQL migration fills with a row of defaults: replaced by the copy.
SEEDED = frozenset({"push_policy"})
#: Seconds to wait for the target's table locks (a node running on it holds them).
LOCK_TIMEOUT = "10s"
_BATCH = 2000


@dataclass(frozen=True)
class Moved:
    """A SQLite column that lives elsewhere in PostgreSQL: `expression` computes the target
    column from the source row of the target table (in SQLite SQL); `orphans` counts the
    values that find no row to go to."""

    source: tuple[str, str]
    target: tuple[str, str]
    expression: str
    orphans: str
    why: str


MOVED = (
    Moved(
        source=("chats", "last_preview"),
        target=("messages", "preview"),
        expression=(
            "(SELECT c.last_preview FROM chats c"
            " WHERE c.id = messages.chat_id AND c.last_seq = messages.seq)"
        ),
        orphans=(
            "SELECT count(*) FROM chats c WHERE c.last_preview IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM messages m WHERE m.chat_id = c.id AND m.seq = c.last_seq)"
        ),
        why="PostgreSQL keeps the chat-list preview on the chat's last message",
    ),
)

#: Invariants of the counters that must continue, checked on the copy: (what, PostgreSQL query
#: counting violations, tables it needs).
COUNTER_CHECKS = (
    (
        "a message beyond its chat's last_seq",
        "SELECT count(*) FROM messages m JOIN chats c ON c.id = m.chat_id WHERE m.seq > c.last_seq",
        ("messages", "chats"),
    ),
    (
        "an inbox entry at or beyond its device's next_iseq",
        "SELECT count(*) FROM inbox i JOIN devices d ON d.id = i.device_id"
        " WHERE i.iseq >= d.next_iseq",
        ("inbox", "devices"),
    ),
)


class MigrationError(Exception):
    """Why the store cannot be (or was not) moved, in one line for the operator."""


@dataclass(frozen=True)
class TargetColumn:
    """A PostgreSQL column as the catalog describes it."""

    name: str
    type: str
    #: NULL allowed, or a default (an identity counts): the copy may leave it out.
    optional: bool


@dataclass
class TablePlan:
    """How one table is copied: the target's columns in COPY order, the SQLite expressions that
    give them, and the conversion each value needs (None: as it is)."""

    name: str
    columns: list[str]
    expressions: list[str]
    converters: list[Callable[[Any], Any] | None]

    def select(self) -> str:
        return f"SELECT {', '.join(self.expressions)} FROM {_quote(self.name)}"


@dataclass
class Plan:
    """The tables to copy in order, and every difference between the schemas, for the report."""

    tables: list[TablePlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: SQLite tables, and columns ("table.column"), PostgreSQL has no place for: refused if
    #: they hold data (`check_unplaced`).
    unplaced: list[str] = field(default_factory=list)
    #: Text values whose NUL characters were replaced, per "table.column" (filled while
    #: copying: PostgreSQL's text cannot hold NUL).
    nuls: Counter[str] = field(default_factory=Counter)


@dataclass
class Summary:
    """What was copied, for the operator."""

    source: Path
    source_level: int
    target: str
    target_level: int
    rows: list[tuple[str, int]]
    sequences: list[str]
    notes: list[str]
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"copied {self.source} (SQLite schema {self.source_level}) to {self.target}"
            f" (PostgreSQL schema {self.target_level}) in {self.seconds:.1f} s, counts verified:"
        ]
        width = max((len(name) for name, _ in self.rows), default=0)
        out += [f"  {name:<{width}}  {count:>10}" for name, count in self.rows]
        out += [f"  {line}" for line in self.sequences]
        if self.notes:
            out.append("schema differences and notes:")
            out += [f"  {note}" for note in self.notes]
        return out


def _quote(name: str) -> str:
    """An identifier quoted for either engine."""
    return '"' + name.replace('"', '""') + '"'


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def where(dsn: str) -> str:
    """A DSN without its credentials: host:port/database."""
    try:
        parts = urlsplit(dsn)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
    except ValueError:
        return "the given DSN"


# -- the SQLite side ---------------------------------------------------------------------------


def open_source(path: Path) -> sqlite3.Connection:
    """The SQLite database, locked exclusively, inside one read transaction: a consistent
    snapshot nobody writes to while it is copied. Refuses a database in use."""
    if not path.is_file():
        raise MigrationError(f"no SQLite database at {path}")
    uri = f"{path.resolve().as_uri()}?mode=rw"  # never creates a file
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
    except sqlite3.Error as exc:
        conn.close()
        if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise MigrationError(
                f"{path} is in use: stop `pigeon serve` (and any pigeon command using it) first"
            ) from None
        raise MigrationError(f"cannot open {path}: {_one_line(exc)}") from None
    return conn


def source_schema(conn: sqlite3.Connection) -> tuple[int, dict[str, list[str]]]:
    """The database's migration level, and its tables with their columns (bookkeeping left
    out)."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    if "schema_migrations" not in names:
        raise MigrationError("not a Pigeon database (it has no schema_migrations table)")
    (level,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    tables = {
        name: [r[1] for r in conn.execute(f"PRAGMA table_info({_quote(name)})")]
        for name in names
        if name not in SQLITE_BOOKKEEPING
    }
    return int(level), tables


def _rows(conn: sqlite3.Connection, table: TablePlan) -> Iterator[tuple[Any, ...]]:
    """The table's rows, converted for PostgreSQL, read a batch at a time."""
    cursor = conn.execute(table.select())
    plain = all(c is None for c in table.converters)
    pairs = list(enumerate(table.converters))
    while batch := cursor.fetchmany(_BATCH):
        if plain:
            yield from batch
            continue
        for row in batch:
            yield tuple(row[i] if f is None or row[i] is None else f(row[i]) for i, f in pairs)


# -- comparing the schemas ---------------------------------------------------------------------


def _converter(pg_type: str, name: str, nuls: Counter[str]) -> Callable[[Any], Any] | None:
    """How a SQLite value becomes a value of the PostgreSQL column (None: as it is)."""
    if pg_type == "boolean":
        return bool
    if pg_type == "bytea":
        return lambda v: v.encode() if isinstance(v, str) else v
    if pg_type in ("json", "jsonb"):
        return lambda v: v.decode() if isinstance(v, bytes) else v
    if pg_type in ("text", "character varying", "character"):

        def text(v: Any) -> Any:
            if isinstance(v, str) and "\x00" in v:
                nuls[name] += 1
                return v.replace("\x00", "\ufffd")
            return v

        return text
    return None


def _names(columns: list[TargetColumn]) -> set[str]:
    return {c.name for c in columns}


def _ordered(shared: set[str]) -> list[str]:
    return [t for t in LOAD_ORDER if t in shared] + sorted(shared - set(LOAD_ORDER))


def make_plan(source: dict[str, list[str]], target: dict[str, list[TargetColumn]]) -> Plan:
    """Compare the schemas column by column: what goes where, and what differs (including
    what SQLite has and PostgreSQL has no place for, `Plan.unplaced`). Raises `MigrationError`
    if a PostgreSQL column without a default has no source."""
    plan = Plan(unplaced=[t for t in sorted(source) if t not in target])
    missing: list[str] = []
    for name in sorted(set(target) - set(source) - PG_BOOKKEEPING):
        plan.notes.append(f"{name}: not in this SQLite database, left empty")
    carried = {m.source for m in MOVED if m.target[1] in _names(target.get(m.target[0], []))}
    for name in _ordered(set(source) & set(target)):
        plan.tables.append(_plan_table(name, source, target[name], plan, missing))
        plan.unplaced += [
            f"{name}.{column}"
            for column in source[name]
            if column not in _names(target[name]) and (name, column) not in carried
        ]
    if missing:
        raise MigrationError(
            "PostgreSQL columns without a default have no SQLite source: " + ", ".join(missing)
        )
    return plan


def _plan_table(
    name: str,
    source: dict[str, list[str]],
    columns: list[TargetColumn],
    plan: Plan,
    missing: list[str],
) -> TablePlan:
    """One table's copy: each target column from its SQLite column of the same name, from a
    `MOVED` column, or left to its default (noted in `plan`; added to `missing` if it has
    none)."""
    table = TablePlan(name, [], [], [])
    for col in columns:
        moved = next((m for m in MOVED if m.target == (name, col.name)), None)
        if col.name in source[name]:
            expression = _quote(col.name)
        elif moved is not None and moved.source[1] in source.get(moved.source[0], []):
            expression = moved.expression
            plan.notes.append(f"{'.'.join(moved.source)} -> {name}.{col.name}: {moved.why}")
        elif col.optional:
            plan.notes.append(f"{name}.{col.name}: no such SQLite column, left to its default")
            continue
        else:
            missing.append(f"{name}.{col.name}")
            continue
        table.columns.append(col.name)
        table.expressions.append(expression)
        table.converters.append(_converter(col.type, f"{name}.{col.name}", plan.nuls))
    return table


def check_unplaced(sqlite: sqlite3.Connection, plan: Plan) -> None:
    """Refuse to leave behind any data PostgreSQL has no place for; what is empty is only
    noted."""
    holding = []
    for name in plan.unplaced:
        table, _, column = name.partition(".")
        test = f"{_quote(column)} IS NOT NULL" if column else "1"
        query = f"SELECT EXISTS (SELECT 1 FROM {_quote(table)} WHERE {test})"
        if sqlite.execute(query).fetchone()[0]:
            holding.append(name)
        else:
            plan.notes.append(f"{name}: only in SQLite, holds no data")
    if holding:
        raise MigrationError(
            "the SQLite store holds data PostgreSQL has no place for: "
            + ", ".join(holding)
            + " (this pigeon version cannot move it)"
        )


# -- the PostgreSQL side -----------------------------------------------------------------------

_TARGET_COLUMNS = """
SELECT c.table_name::text, c.column_name::text, c.data_type::text,
    c.is_nullable = 'YES' OR c.column_default IS NOT NULL OR c.is_identity = 'YES'
FROM information_schema.columns c
JOIN information_schema.tables t
    ON t.table_schema = c.table_schema AND t.table_name = c.table_name
WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
    AND c.is_generated = 'NEVER'
ORDER BY c.table_name, c.ordinal_position
"""
_SEQUENCES = """
SELECT c.table_name::text, c.column_name::text
FROM information_schema.columns c
WHERE c.table_schema = current_schema()
    AND pg_get_serial_sequence(format('%I.%I', c.table_schema, c.table_name), c.column_name)
        IS NOT NULL
"""


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection to the target, or a one-line reason why not."""
    import asyncpg

    if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        raise MigrationError("--to must be a postgresql:// DSN, e.g. postgresql://user@host/db")
    try:
        return await asyncpg.connect(
            dsn, timeout=10, server_settings={"application_name": "pigeon-migrate"}
        )
    except asyncpg.InvalidCatalogNameError:
        name = urlsplit(dsn).path.lstrip("/")
        raise MigrationError(
            f"PostgreSQL database {name!r} does not exist on {where(dsn).split('/')[0]}:"
            " create it (createdb), then run again"
        ) from None
    except Exception as exc:  # refused, unreachable, bad login, a malformed DSN
        message = _one_line(exc)
        password = _password(dsn)
        if password:
            message = message.replace(password, "***")
        raise MigrationError(f"cannot connect to PostgreSQL at {where(dsn)}: {message}") from None


def _password(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None


async def _tables(pg: asyncpg.Connection) -> list[str]:
    rows = await pg.fetch(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()"
    )
    return sorted(r[0] for r in rows)


async def check_empty(pg: asyncpg.Connection) -> None:
    """Refuse a target that holds data, or tables that are not Pigeon's."""
    tables = await _tables(pg)
    if not tables:
        return
    if "schema_version" not in tables:
        raise MigrationError(
            f"the target database holds tables that are not Pigeon's ({', '.join(tables[:5])}):"
            " give an empty database"
        )
    used = [
        t
        for t in tables
        if t not in PG_BOOKKEEPING | SEEDED
        and await pg.fetchval(f"SELECT EXISTS (SELECT 1 FROM {_quote(t)})")
    ]
    if used:
        raise MigrationError(
            f"the target database is not empty ({', '.join(used)} hold rows):"
            " migrate-store only fills an empty database"
        )


async def target_schema(pg: asyncpg.Connection) -> tuple[int, dict[str, list[TargetColumn]]]:
    """The target's migration level, and its tables with their columns (bookkeeping left
    out)."""
    level = await pg.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
    tables: dict[str, list[TargetColumn]] = {}
    for table, column, type_, optional in await pg.fetch(_TARGET_COLUMNS):
        if table not in PG_BOOKKEEPING:
            tables.setdefault(table, []).append(TargetColumn(column, type_, optional))
    return int(level), tables


async def migrate_target_schema(settings: Settings, dsn: str) -> None:
    """Bring the target's schema to this version's, exactly as a node starting on it would:
    by opening the PostgreSQL store (whatever its migrations are now)."""
    from pigeon.app import build_store

    store = build_store(
        settings.model_copy(
            update={"store": PostgresSettings(dsn=dsn, min_connections=1, max_connections=1)}
        )
    )
    try:
        await store.open()
    except PigeonError as exc:
        raise MigrationError(f"cannot migrate the target's schema: {exc.message}") from None
    await store.aclose()


async def _copy(
    pg: asyncpg.Connection, sqlite: sqlite3.Connection, schema: str, table: TablePlan
) -> int:
    if table.name in SEEDED:
        await pg.execute(f"DELETE FROM {_quote(table.name)}")
    if not table.columns:
        return 0
    status = await pg.copy_records_to_table(
        table.name, records=_rows(sqlite, table), columns=table.columns, schema_name=schema
    )
    return int(status.split()[-1])


async def _set_sequences(pg: asyncpg.Connection, copied: set[str]) -> list[str]:
    """Move every identity or serial sequence past the ids copied into its column."""
    out = []
    for table, column in await pg.fetch(_SEQUENCES):
        if table not in copied:
            continue
        value = await pg.fetchval(
            f"SELECT setval(pg_get_serial_sequence($1, $2), m)"
            f" FROM (SELECT max({_quote(column)}) AS m FROM {_quote(table)}) x"
            " WHERE m IS NOT NULL",
            _quote(table),
            column,
        )
        if value is not None:
            out.append(f"{table}.{column} continues after {value}")
    return out


async def _verify(
    pg: asyncpg.Connection, sqlite: sqlite3.Connection, plan: Plan, copied: dict[str, int]
) -> list[tuple[str, int]]:
    """Row counts per table, the same in SQLite, in what COPY wrote and in PostgreSQL; and the
    counters that must continue ahead of what they numbered."""
    rows = []
    for table in plan.tables:
        (expected,) = sqlite.execute(f"SELECT count(*) FROM {_quote(table.name)}").fetchone()
        found = await pg.fetchval(f"SELECT count(*) FROM {_quote(table.name)}")
        if not expected == copied[table.name] == found:
            raise MigrationError(
                f"{table.name}: {expected} rows in SQLite, {copied[table.name]} copied,"
                f" {found} in PostgreSQL: nothing was committed"
            )
        rows.append((table.name, int(found)))
    names = {t.name for t in plan.tables}
    for what, query, needs in COUNTER_CHECKS:
        if set(needs) <= names and (bad := await pg.fetchval(query)):
            raise MigrationError(
                f"the SQLite store is inconsistent ({bad} times {what}): nothing was committed"
            )
    return rows


def _orphan_notes(sqlite: sqlite3.Connection, source: dict[str, list[str]]) -> list[str]:
    notes = []
    for m in MOVED:
        if m.source[1] in source.get(m.source[0], []) and m.target[0] in source:
            (n,) = sqlite.execute(m.orphans).fetchone()
            if n:
                notes.append(
                    f"{'.'.join(m.source)}: {n} value(s) whose {m.target[0]} row is gone"
                    " (swept) are not carried"
                )
    return notes


async def copy_store(
    sqlite: sqlite3.Connection, source: dict[str, list[str]], pg: asyncpg.Connection
) -> tuple[int, list[tuple[str, int]], list[str], list[str]]:
    """The copy, in one transaction: lock and re-check the target, plan, COPY each table, set
    the sequences, verify. Returns the target's level, the rows per table, the sequences set
    and the notes on schema differences."""
    import asyncpg

    async with pg.transaction():
        await pg.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        tables = [t for t in await _tables(pg) if t not in PG_BOOKKEEPING]
        try:  # writers wait until the commit; a node running on the target holds them up
            await pg.execute(f"LOCK TABLE {', '.join(map(_quote, tables))} IN EXCLUSIVE MODE")
        except asyncpg.LockNotAvailableError:
            raise MigrationError(
                f"the target database is in use (its tables stayed locked for {LOCK_TIMEOUT})"
            ) from None
        await check_empty(pg)
        level, target = await target_schema(pg)
        plan = make_plan(source, target)
        check_unplaced(sqlite, plan)
        schema = await pg.fetchval("SELECT current_schema()")
        copied = {}
        for table in plan.tables:
            try:
                copied[table.name] = await _copy(pg, sqlite, schema, table)
            except Exception as exc:  # a value PostgreSQL refuses, a broken connection
                raise MigrationError(f"copying {table.name}: {_one_line(exc)}") from None
        sequences = await _set_sequences(pg, set(copied))
        rows = await _verify(pg, sqlite, plan, copied)
    notes = plan.notes + _orphan_notes(sqlite, source)
    notes += [
        f"{column}: {n} value(s) held NUL characters, stored with U+FFFD"
        " (PostgreSQL text cannot hold NUL)"
        for column, n in sorted(plan.nuls.items())
    ]
    return level, rows, sequences, notes


async def _analyze(pg: asyncpg.Connection, tables: list[str]) -> list[str]:
    """Fresh planner statistics (the first queries plan on them). Committed already: a
    failure here is only reported."""
    try:
        for table in tables:
            await pg.execute(f"ANALYZE {_quote(table)}")
    except Exception as exc:
        return [f"ANALYZE failed after the commit ({_one_line(exc)}): run it on the database"]
    return []


async def migrate(settings: Settings, dsn: str) -> Summary:
    """Move the configured SQLite store into the empty PostgreSQL database at `dsn`."""
    import asyncpg

    started = time.monotonic()
    path = settings.sqlite_path()
    sqlite = open_source(path)
    try:
        source_level, source = source_schema(sqlite)
        pg = await connect(dsn)
        try:
            await check_empty(pg)  # before creating anything in someone else's database
        finally:
            await pg.close()
        await migrate_target_schema(settings, dsn)
        pg = await connect(dsn)
        try:
            level, rows, sequences, notes = await copy_store(sqlite, source, pg)
            notes += await _analyze(pg, [table for table, _ in rows])
        finally:
            await pg.close()
    except (
        OSError,
        TimeoutError,
        sqlite3.Error,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        raise MigrationError(_one_line(exc)) from None
    finally:
        with contextlib.suppress(sqlite3.Error):
            sqlite.execute("ROLLBACK")
        sqlite.close()
    return Summary(
        source=path,
        source_level=source_level,
        target=where(dsn),
        target_level=level,
        rows=rows,
        sequences=sequences,
        notes=notes,
        seconds=time.monotonic() - started,
    )


# -- the command -------------------------------------------------------------------------------


def _media(settings: Settings) -> str:
    if isinstance(settings.blobs, S3BlobSettings):
        return f"media: in the S3 bucket {settings.blobs.bucket!r}, nothing to move"
    return (
        f"media: the files in {settings.blob_dir()} stay there; every node needs that directory"
        f" (this machine, or a shared file system) and the key files of {settings.data_dir}"
    )


def migrate_store(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="DSN",
            help="The empty PostgreSQL database: postgresql://user[:password]@host[:port]/db.",
        ),
    ],
    data_dir: Annotated[Path | None, typer.Option(help="The server's data directory.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML settings file (the server's, so paths agree).")
    ] = None,
) -> None:
    """Copy the stopped server's SQLite store into an empty PostgreSQL database.

    Everything is copied (users, devices and tokens, chats, messages, inboxes with their
    iseqs, receipts, attachments, invites, push state), verified, and summed up. Media files
    stay where they are. Run it with the server's settings; docs/operations.md, "Moving from
    SQLite to PostgreSQL"."""
    from pigeon.cli import fail

    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    settings = load_settings(config, **overrides)
    if not isinstance(settings.store, SqliteSettings):
        raise fail(
            "the configured store is PostgreSQL already: run migrate-store with the settings"
            " the SQLite server ran with"
        )
    try:
        summary = asyncio.run(migrate(settings, to))
    except MigrationError as exc:
        raise fail(str(exc)) from None
    for line in summary.lines():
        typer.echo(line)
    typer.echo(_media(settings))
    typer.echo(
        "next: start the nodes with PIGEON_STORE__TYPE=postgres and PIGEON_STORE__DSN set to"
        f" this database; keep {summary.source} until they work"
    )
