"""Redis Cluster key slots: which master owns a channel, and how commands are cut per slot.

Why it exists: on a cluster a channel lives on the master that owns its key slot, a
(S)SUBSCRIBE may not span slots, and the owner of each slot is learned from CLUSTER SLOTS.
These are the stateless parts of that; `RedisBus` keeps the current map and refreshes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot
from redis.exceptions import RedisError

from pigeon.adapters.bus.redis.wire import Dialer, hang_up
from pigeon.domain.errors import Unavailable

SLOTS = 16384
#: Channels per SUBSCRIBE command on a single server (a cluster needs one per slot anyway).
SUBSCRIBE_CHUNK = 1000
#: At most this often the cluster slot map is re-read when asked repeatedly.
REFRESH_MIN_INTERVAL = 0.2

#: The master owning a slot: (key "host:port", host, port).
Owner = tuple[str, str, int]


def channel_commands(
    verb: bytes, channels: list[str], *, cluster: bool
) -> list[tuple[bytes | str, ...]]:
    """`verb` ((S)SUBSCRIBE or (S)UNSUBSCRIBE) commands for `channels`: one per slot on a
    cluster (a command may not span slots), chunks of SUBSCRIBE_CHUNK channels otherwise."""
    if not channels:
        return []
    if cluster:
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        return [(verb, *group) for group in by_slot.values()]
    return [
        (verb, *channels[i : i + SUBSCRIBE_CHUNK]) for i in range(0, len(channels), SUBSCRIBE_CHUNK)
    ]


async def fetch_slots(
    dialer: Dialer, candidates: Sequence[tuple[str | None, int | None]], timeout: float
) -> list[Owner | None]:
    """Owner of each slot per CLUSTER SLOTS, from the first of `candidates` that answers."""
    error: Exception | None = None
    for host, port in candidates:
        conn = dialer.dial(host, port)
        try:
            async with asyncio.timeout(timeout):
                await conn.connect()
                command = conn.pack_commands([(b"CLUSTER", b"SLOTS")])
                await conn.send_packed_command(command, check_health=False)
                reply = await conn.read_response()
        except (RedisError, OSError, TimeoutError) as exc:
            error = exc
            continue
        finally:
            await hang_up(conn)
        return parse_slots(reply, host or dialer.host)
    raise Unavailable(f"redis bus: no cluster node answered CLUSTER SLOTS: {error}")


def parse_slots(reply: list[Any], asked: str) -> list[Owner | None]:
    """CLUSTER SLOTS -> the master of each slot as (key, host, port); None if uncovered."""
    slots: list[Owner | None] = [None] * SLOTS
    for start, end, master, *_ in reply:
        host = master[0].decode() or asked  # empty: the node we asked
        port = int(master[1])
        owner = (f"{host}:{port}", host, port)
        slots[start : end + 1] = [owner] * (end - start + 1)
    return slots
