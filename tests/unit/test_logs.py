"""Log lines keep their context: the node, the fields set around a command, and `extra=`."""

from __future__ import annotations

import asyncio
import json
import logging

from pigeon.logs import JsonFormatter, TextFormatter, bind_log_context, log_context


def record(msg: str, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("pigeon.test")
    return logger.makeRecord("pigeon.test", logging.INFO, __file__, 1, msg, (), None, extra=extra)


def test_json_lines_carry_node_context_and_extra_fields() -> None:
    formatter = JsonFormatter("host-a/1")
    with log_context(user="u1", device="d1"), log_context(rid=7, chat=None):
        doc = json.loads(formatter.format(record("sent", seq=42)))
    assert doc["msg"] == "sent" and doc["node"] == "host-a/1"
    assert (doc["user"], doc["device"], doc["rid"], doc["seq"]) == ("u1", "d1", 7, 42)
    assert "chat" not in doc  # None values are left out
    outside = json.loads(formatter.format(record("later")))
    assert "user" not in outside  # the context ended with its block


def test_text_lines_end_with_the_fields() -> None:
    with log_context(user="u1"):
        line = TextFormatter().format(record("hello", status=201))
    assert line.endswith("hello user=u1 status=201")


async def test_a_connection_binds_its_user_and_device_for_its_tasks() -> None:
    formatter = JsonFormatter("n")

    async def connection() -> dict[str, object]:
        bind_log_context(user="u2", device="d2")

        async def command() -> dict[str, object]:  # a task the connection starts
            doc: dict[str, object] = json.loads(formatter.format(record("cmd")))
            return doc

        return await asyncio.create_task(command())

    doc = await asyncio.create_task(connection())
    assert (doc["user"], doc["device"]) == ("u2", "d2")
    assert "user" not in json.loads(formatter.format(record("elsewhere")))
