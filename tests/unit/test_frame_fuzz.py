"""Property-based fuzzing of the frame decoder: whatever a client sends, the decoder returns a
command or an error reply with a stable code; it never raises."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.gateway import protocol as p
from pigeon.gateway.session import decode_command

CODES = {"bad_request", "unknown_command", "too_large"}
LIMIT = 4096

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
names = st.sampled_from([*sorted(p.COMMAND_NAMES), "", "teleport", "SEND"])


def _check(frame: bytes) -> None:
    result = decode_command(frame, LIMIT)
    if isinstance(result, p.Error):
        assert result.code in CODES and result.message
        p.encode(result)  # and it can be sent
    else:
        assert isinstance(result, p.Command)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes(frame: bytes) -> None:
    _check(frame)


@settings(max_examples=400, deadline=None)
@given(names, json_values, json_values, st.dictionaries(st.text(max_size=10), json_values))
def test_command_shaped_objects(name: str, rid: Any, value: Any, extra: dict[str, Any]) -> None:
    frame = {"t": name, "rid": rid, "chat": value, "body": value, **extra}
    _check(json.dumps(frame).encode())


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=20_000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    _check((opener * depth + "1" + closer * depth).encode())
    _check(
        b'{"t":"send","rid":1,"chat":'
        + (opener * depth).encode()
        + b"1"
        + (closer * depth).encode()
        + b"}"
    )


def test_oversized_frames_are_too_large() -> None:
    result = decode_command(b'{"t":"ping","rid":1,"pad":"' + b"x" * LIMIT + b'"}', LIMIT)
    assert isinstance(result, p.Error) and (result.code, result.rid) == ("too_large", 1)
