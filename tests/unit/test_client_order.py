"""The SDK delivers each inbox event once and in order, also when a live event overtakes the
connection's `ready` frame and turns out to be exactly the next one expected."""

from __future__ import annotations

import asyncio

import msgspec

from pigeon.client import PigeonClient
from pigeon.domain.events import ReadState, encode_event


def _event(iseq: int) -> bytes:
    raw = encode_event(ReadState(chat="C", seq=iseq, at=0)).decode()
    return f'{{"t":"event","iseq":{iseq},"event":{raw}}}'.encode()


def _ready(acked: int) -> bytes:
    frame = {"t": "ready", "user": "U", "device": "D", "acked": acked, "server_time": 0}
    return msgspec.json.encode(frame)


async def test_an_event_that_overtook_ready_is_delivered_once() -> None:
    client = PigeonClient("http://127.0.0.1:1", "token", auto_ack=False)
    client._on_frame(_event(57))  # a live push before `ready` (a fresh client expects 1)
    client._on_frame(_ready(56))  # the device acked up to 56 on an earlier connection
    client._on_frame(_event(57))  # the inbox sync replays it
    client._on_frame(_event(58))
    first = await client.next_event(1)
    second = await client.next_event(1)
    assert isinstance(first, ReadState) and isinstance(second, ReadState)
    assert (first.seq, second.seq) == (57, 58)
    assert client.pending_events() == 0
    if client._gap_timer is not None:
        client._gap_timer.cancel()


async def test_the_reorder_window_counts_what_it_held_and_what_it_asked_for() -> None:
    client = PigeonClient("http://127.0.0.1:1", "token", auto_ack=False, gap_timeout=0.05)
    client._on_frame(_event(1))
    client._on_frame(_event(3))  # early: held
    client._on_frame(_event(2))  # the gap fills by itself
    assert (client.reorder_held, client.reorder_syncs) == (1, 0)
    assert 0 <= client.reorder_max_wait < client.gap_timeout
    asked = asyncio.Event()

    async def request(kind: str, **fields: object) -> object:  # the sync, not sent anywhere
        assert (kind, fields) == ("sync", {"after": 3})
        asked.set()
        return {"iseq": 3}

    client.request = request  # type: ignore[method-assign]
    client._connected.set()
    client._on_frame(_event(5))  # 4 never comes: the window runs out, a sync is asked for
    await asyncio.wait_for(asked.wait(), 5)
    assert (client.reorder_held, client.reorder_syncs) == (2, 1)
    if client._gap_timer is not None:
        client._gap_timer.cancel()
