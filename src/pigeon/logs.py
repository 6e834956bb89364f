"""Structured logging: one JSON object per line (or plain text for humans at a terminal).

Why structured: an operator greps one user's or one request's lines across nodes. So every line
carries the context it was logged in (`node`, and where known `user`, `device`, `rid`, `chat`:
set with `log_context` by the gateway around each command) and whatever the call passed as
`extra=`. REST requests get an access log line each (`gateway/access_log.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgspec

#: The context of the command being handled (a copy per task: asyncio copies contextvars).
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "pigeon_log_context", default=None
)
#: Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add `fields` (e.g. user, device, rid, chat) to every line logged inside the block."""
    current = _context.get()
    token = _context.set({**current, **fields} if current else fields)
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: Any) -> None:
    """Add `fields` to every line the current task (and the tasks it starts) logs from now on:
    for a connection's handler, its user and device, once."""
    current = _context.get()
    _context.set({**current, **fields} if current else fields)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's context and `extra=` fields (None values left out)."""
    out: dict[str, Any] = {}
    context = _context.get()
    if context:
        out.update(context)
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    return {k: v for k, v in out.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """Formats a record as `{"ts", "level", "logger", "msg", "node", ...context, ...extra}`."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self._node = node

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "node": self._node,
        }
        for key, value in _fields(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(doc, enc_hook=str).decode()


class TextFormatter(logging.Formatter):
    """Plain text for a terminal, the context and extra fields as `key=value` at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        head, sep, rest = line.partition("\n")  # a traceback stays below the line
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{head} {tail}{sep}{rest}"


def node_name() -> str:
    """This process's name in logs: host, and the worker index under `--workers`."""
    worker = os.environ.get("PIGEON_WORKER")
    host = socket.gethostname()
    return f"{host}/{worker}" if worker is not None else host


def setup_logging(level: str, json: bool) -> None:
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node_name()) if json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
