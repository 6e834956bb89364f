"""Frame decoding and error mapping."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest

from pigeon.domain import errors as e
from pigeon.domain.events import Message, decode_event, encode_event, inbox_frame
from pigeon.gateway import protocol as p
from pigeon.gateway.connection import frame_iseq
from pigeon.gateway.errors import HTTP_STATUS, should_reconnect, to_error


def test_commands_decode_by_tag() -> None:
    cmd = p.command_decoder.decode(b'{"t":"send","rid":7,"chat":"c","cmid":"m","body":"hi"}')
    assert isinstance(cmd, p.Send) and (cmd.rid, cmd.body, cmd.attachment) == (7, "hi", None)
    assert isinstance(p.command_decoder.decode(b'{"t":"list_chats","rid":"x"}'), p.ListChats)
    with pytest.raises(msgspec.ValidationError):
        p.command_decoder.decode(b'{"t":"send","rid":1,"chat":"c","cmid":"m","bogus":1}')


def test_every_command_has_a_unique_name() -> None:
    assert len(p.COMMAND_NAMES) == len(get_args(p.AnyCommand)) == 26


def test_inbox_frames_carry_the_encoded_event() -> None:
    m = Message(id="i", chat="c", seq=3, sender="s", sender_device="d", cmid="x", at=1, body="b")
    frame = inbox_frame(42, encode_event(m))
    assert frame_iseq(frame) == 42
    decoded = msgspec.json.decode(frame)
    assert decoded["t"] == "event" and decode_event(msgspec.json.encode(decoded["event"])) == m
    assert frame_iseq(b'{"t":"ok","rid":1}') == 0


def test_every_domain_error_has_a_status_and_unexpected_errors_are_internal() -> None:
    assert set(HTTP_STATUS) == set(e.ALL_ERRORS)
    assert to_error(1, e.GroupFull("x")).code == "group_full"
    err = to_error(2, ZeroDivisionError())
    assert (err.code, err.temporary) == ("internal", True)
    assert should_reconnect(4000) and should_reconnect(1001) and not should_reconnect(4502)
