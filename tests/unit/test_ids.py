"""Our ULIDs are real ULIDs: checked against python-ulid's parser."""

from __future__ import annotations

import time

from ulid import ULID

from pigeon.domain.ids import is_id, new_id


def test_new_ids_parse_as_ulids_with_the_current_time() -> None:
    before = int(time.time() * 1000)
    ids = [new_id() for _ in range(1000)]
    after = int(time.time() * 1000)
    assert len(set(ids)) == 1000
    for value in ids:
        parsed = ULID.from_str(value)
        assert str(parsed) == value
        assert before <= parsed.milliseconds <= after
        assert is_id(value)


def test_is_id_rejects_anything_else() -> None:
    assert is_id(str(ULID()))
    for bad in ("", "x" * 26, "8" + "0" * 25, new_id().lower(), new_id()[:-1], 42, None):
        assert not is_id(bad)
