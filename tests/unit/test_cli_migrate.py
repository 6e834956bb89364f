"""The schema comparison of `pigeon migrate-store`: what goes where, what is refused, what is
reported. (The copy itself runs end to end in tests/e2e/test_migrate_store.py.)"""

from __future__ import annotations

import sqlite3

import pytest

from pigeon.cli_migrate import (
    MOVED,
    MigrationError,
    Plan,
    TargetColumn,
    check_unplaced,
    make_plan,
)


def col(name: str, type_: str = "text", optional: bool = False) -> TargetColumn:
    return TargetColumn(name, type_, optional)


def test_same_columns_are_copied_in_load_order_with_their_conversions() -> None:
    source = {"zeta": ["id"], "devices": ["id", "user_id"], "users": ["id", "push_names"]}
    target = {
        "users": [col("id"), col("push_names", "boolean")],
        "devices": [col("id"), col("user_id")],
        "zeta": [col("id")],
    }
    plan = make_plan(source, target)
    assert [t.name for t in plan.tables] == ["users", "devices", "zeta"]
    users = plan.tables[0]
    assert users.columns == ["id", "push_names"]
    assert users.select() == 'SELECT "id", "push_names" FROM "users"'
    assert users.converters[1] is bool
    assert plan.notes == [] and plan.unplaced == []


def test_the_chat_preview_moves_to_the_last_message() -> None:
    source = {"chats": ["id", "last_seq", "last_preview"], "messages": ["id", "chat_id", "seq"]}
    target = {
        "chats": [col("id"), col("last_seq", "bigint")],
        "messages": [
            col("id"),
            col("chat_id"),
            col("seq", "bigint"),
            col("preview", optional=True),
        ],
    }
    plan = make_plan(source, target)
    messages = plan.tables[1]
    assert messages.columns == ["id", "chat_id", "seq", "preview"]
    assert messages.expressions[-1] == MOVED[0].expression
    assert plan.unplaced == []  # carried, not dropped
    assert plan.notes == [f"chats.last_preview -> messages.preview: {MOVED[0].why}"]


def test_what_has_no_counterpart_is_reported() -> None:
    source = {"users": ["id", "nickname"], "lite_only": ["x"]}
    target = {"users": [col("id"), col("disabled_at", "bigint", optional=True)], "pg_only": []}
    plan = make_plan(source, target)
    assert plan.unplaced == ["lite_only", "users.nickname"]
    assert plan.notes == [
        "pg_only: not in this SQLite database, left empty",
        "users.disabled_at: no such SQLite column, left to its default",
    ]
    with pytest.raises(MigrationError, match=r"no SQLite source: users\.visibility"):
        make_plan({"users": ["id"]}, {"users": [col("id"), col("visibility")]})


def test_data_with_no_place_is_refused_and_empty_leftovers_are_noted() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE users (id TEXT, nickname TEXT)")
    conn.execute("CREATE TABLE lite_only (x)")
    conn.execute("INSERT INTO users VALUES ('u1', NULL)")
    plan = Plan(unplaced=["lite_only", "users.nickname"])
    check_unplaced(conn, plan)
    assert plan.notes == [
        "lite_only: only in SQLite, holds no data",
        "users.nickname: only in SQLite, holds no data",
    ]
    conn.execute("UPDATE users SET nickname = 'al'")
    with pytest.raises(MigrationError, match=r"no place for: users\.nickname"):
        check_unplaced(conn, Plan(unplaced=["lite_only", "users.nickname"]))
    conn.close()


def test_text_loses_nul_characters_and_says_so() -> None:
    plan = make_plan({"chats": ["name"]}, {"chats": [col("name")]})
    convert = plan.tables[0].converters[0]
    assert convert is not None
    assert convert("a\x00b") == "a\ufffdb" and convert("ab") == "ab"
    assert plan.nuls == {"chats.name": 1}


def test_a_moved_column_with_nowhere_to_go_is_not_carried() -> None:
    source = {"chats": ["id", "last_preview"], "messages": ["id"]}
    plan = make_plan(source, {"chats": [col("id")], "messages": [col("id")]})
    assert plan.unplaced == ["chats.last_preview"]
