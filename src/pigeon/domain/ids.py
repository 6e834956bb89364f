"""Identifiers: ULIDs, so ids sort by creation time and carry no coordination cost."""

from __future__ import annotations

from ulid import ULID


def new_id() -> str:
    """A fresh ULID in its canonical 26-character Crockford base32 form."""
    return str(ULID())


def is_id(value: str) -> bool:
    """True when `value` is a well-formed ULID string."""
    if len(value) != 26:
        return False
    try:
        ULID.from_str(value)
    except ValueError:
        return False
    return True
