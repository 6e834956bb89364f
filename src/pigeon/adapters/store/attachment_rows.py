"""The row shape of an attachment, shared by the SQLite and PostgreSQL adapters: both keep the
same columns in the same order and `meta` as JSON text, so one mapping serves both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from pigeon.domain.media import AttachmentRecord

#: The columns of `attachments`, in the order `record` reads them.
COLS = "id, owner, content_type, size, sha256, filename, encrypted, created_at, uploaded_at, meta"
#: A (created_at, id) cursor before every attachment (the sweeps walk in that order).
BEFORE_ALL = (-(2**63), "")

_decode_meta = msgspec.json.Decoder(dict[str, Any]).decode


def record(row: Sequence[Any]) -> AttachmentRecord:
    """An attachment from a row of `COLS` (an sqlite3 tuple or an asyncpg Record)."""
    return AttachmentRecord(
        id=row[0],
        owner=row[1],
        content_type=row[2],
        size=row[3],
        sha256=row[4],
        filename=row[5],
        encrypted=bool(row[6]),
        created_at=row[7],
        uploaded_at=row[8],
        meta=_decode_meta(row[9]),
    )


def encode_meta(meta: dict[str, Any]) -> str:
    """`meta` as the JSON text both engines store."""
    return msgspec.json.encode(meta).decode()
