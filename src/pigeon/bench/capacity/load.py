"""The load generator of `pigeon bench capacity`: connected devices that send on an open-loop
schedule and ack like the SDK, and the counts a phase is judged by.

Apart from the measuring so that it can be read (and changed) without the counters: what the
devices do is what the figures are per. The raw WebSocket client of `bench/wire.py` keeps the
generator far below the nodes' cost; `counting_socket` adds up the client wire's bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

from pigeon.bench.accounts import bounded, make_devices
from pigeon.bench.acks import Acker
from pigeon.bench.capacity.params import Backend, Params
from pigeon.bench.one_to_one import STAMP_DIGITS
from pigeon.bench.server import ServerHandle
from pigeon.bench.wire import WireSocket

_EVENT = b'{"t":"event","iseq":'
_OK = b'{"t":"ok","rid":'
_BODY = b'"body":"'
TICK = 0.001  # open-loop scheduling granularity
QUIET = 0.3  # drained: no frame for this long after the last expected message
GROUP_SENDERS = 4
#: Set-up requests in flight on DynamoDB: moto answers one request at a time, and logins that
#: time out there are retried into `conflict`.
SLOW_STORE_SETUP = 5


@dataclass
class WireBytes:
    """Bytes on the client WebSockets, both ways, frame headers included."""

    sent: int = 0
    received: int = 0


def counting_socket(meter: WireBytes) -> type[WireSocket]:
    """A `WireSocket` class that adds what its sockets send and receive to `meter`."""

    class Counting(WireSocket):
        def data_received(self, data: bytes) -> None:
            meter.received += len(data)
            super().data_received(data)

        def send(self, payload: bytes) -> None:
            meter.sent += len(payload) + (6 if len(payload) < 126 else 8)
            super().send(payload)

        def send_many(self, payloads: list[bytes]) -> None:
            meter.sent += sum(len(p) + (6 if len(p) < 126 else 8) for p in payloads)
            super().send_many(payloads)

    return Counting


class Device(Acker):
    """One connected device: acks events like the SDK (`bench/acks.py`), answers set-up
    requests."""

    __slots__ = ("gen", "pending", "user")

    def __init__(self, gen: Generator, user: str) -> None:
        super().__init__(gen.loop)
        self.gen = gen
        self.user = user
        self.pending: dict[bytes, asyncio.Future[bytes]] = {}

    def on_frame(self, frame: bytes) -> None:
        gen = self.gen
        gen.last_frame = time.monotonic()
        if frame.startswith(_EVENT):
            start = len(_EVENT)
            iseq = int(frame[start : frame.index(b",", start)])
            self.on_event(iseq, gen.on_event(frame))
        elif frame.startswith(_OK):
            if frame[len(_OK)] != 0x22:  # a numeric rid: a send's reply
                gen.committed += 1
            else:
                self._reply(frame)
        elif frame.startswith(b'{"t":"error"') and not (
            b'"rid":"c' in frame and self._reply(frame)
        ):
            gen.errors += 1

    def _reply(self, frame: bytes) -> bool:
        start = frame.index(b'"rid":"') + 7
        rid = frame[start : frame.index(b'"', start)]
        future = self.pending.pop(rid, None)
        if future is not None and not future.done():
            future.set_result(frame)
        return future is not None

    async def request(self, command: str, **fields: Any) -> dict[str, Any]:
        """A set-up command and its reply (not the measured path: a plain decode is fine)."""
        assert self.sock is not None
        self.rid += 1
        rid = f"c{self.rid}"
        future: asyncio.Future[bytes] = self.gen.loop.create_future()
        self.pending[rid.encode()] = future
        self.sock.send(msgspec.json.encode({"t": command, "rid": rid, **fields}))
        async with asyncio.timeout(60):
            reply: dict[str, Any] = msgspec.json.decode(await future)
        if reply.get("t") != "ok":
            raise RuntimeError(f"{command} failed: {reply}")
        return dict(reply["result"])


@dataclass
class Sender:
    device: Device
    chat: bytes
    fanout: int  # deliveries expected per message


class Generator:
    """Every device of one node count's run, and the counts of the phase under way."""

    def __init__(self, size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.wire = WireBytes()
        self.socket_class = counting_socket(self.wire)
        self.pad = b"x" * max(0, size - STAMP_DIGITS)
        self.pairs: list[Sender] = []
        self.group: list[Sender] = []
        self.devices: list[Device] = []
        self.rid = 0
        self.reset()

    def reset(self) -> None:
        """Start a phase: counts from zero."""
        self.committed = 0
        self.sent = 0
        self.expected = 0
        self.received = 0
        self.errors = 0
        self.samples: list[int] = []
        self.sending = False
        self.last_frame = time.monotonic()

    async def connect(self, url: str, token: str, user: str) -> Device:
        device = Device(self, user)
        ws = url.replace("http://", "ws://") + "/v1/ws?token=" + token
        device.sock = await self.socket_class.connect(ws, device.on_frame)
        self.devices.append(device)
        return device

    def on_event(self, frame: bytes) -> bool:
        """Count a message and its latency (True); a receipt or a chat update is not (False)."""
        i = frame.find(_BODY)
        if i < 0:
            return False
        i += len(_BODY)
        self.received += 1
        self.samples.append(time.perf_counter_ns() - int(frame[i : i + STAMP_DIGITS]))
        return True

    def frame(self, sender: Sender, stamp: int) -> bytes:
        self.rid += 1
        return b'{"t":"send","rid":%d,"chat":"%s","cmid":"%d","body":"%020d%s"%s}' % (
            self.rid,
            sender.chat,
            self.rid,
            stamp,
            self.pad,
            sender.device.ride(),  # the sender's pending ack rides along, as in the SDK
        )

    async def offer(self, senders: list[Sender], rate: float, seconds: float) -> None:
        """Open loop: `rate` sends per second in all, round-robin over `senders`."""
        self.sending = True
        t0 = time.perf_counter_ns()
        interval_ns = 1e9 / rate
        end = t0 + seconds * 1e9
        k = 0
        while (now := time.perf_counter_ns()) < end:
            due = int((now - t0) / interval_ns)
            while k < due:
                sender = senders[k % len(senders)]
                assert sender.device.sock is not None
                sender.device.sock.send(self.frame(sender, now))
                self.sent += 1
                self.expected += sender.fanout
                k += 1
            await asyncio.sleep(TICK)  # the schedule's clock tick, not synchronisation
        self.sending = False

    async def drain(self, timeout: float) -> bool:
        """Until every send is answered, every delivery arrived, every device's lazy ack went
        out (receipts wait up to `LAZY_ACK_DELAY` for a send that no longer comes) and no frame
        came for QUIET seconds; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.committed + self.errors >= self.sent and self.received >= self.expected
            if done and time.monotonic() - self.last_frame >= QUIET and not self._acks_pending():
                return True
            await asyncio.sleep(0.05)  # polling counts that frames move: no event to await
        return False

    def _acks_pending(self) -> bool:
        return any(device.ack_pending for device in self.devices)

    def close(self) -> None:
        for device in self.devices:
            device.cancel()
            if device.sock is not None:
                device.sock.close()


async def setup(handle: ServerHandle, p: Params) -> Generator:
    """Accounts on node 0, devices spread over the nodes, the direct chats and the group."""
    urls, n = handle.urls, len(handle.urls)
    gen = Generator(p.size)
    concurrency = SLOW_STORE_SETUP if p.store is Backend.dynamodb else 50
    accounts, _ = await make_devices(
        handle.url, 2 * p.pairs + p.members, 1, concurrency=concurrency
    )
    pair_accounts, members = accounts[: 2 * p.pairs], accounts[2 * p.pairs :]
    jobs: list[Callable[[], Awaitable[Device]]] = []
    for k in range(p.pairs):
        tx, rx = pair_accounts[2 * k], pair_accounts[2 * k + 1]
        jobs.append(partial(gen.connect, urls[k % n], tx.token, tx.user))
        jobs.append(partial(gen.connect, urls[(k + 1) % n], rx.token, rx.user))
    jobs += [partial(gen.connect, urls[j % n], m.token, m.user) for j, m in enumerate(members)]
    devices = await bounded(concurrency, jobs)
    pair_devices, member_devices = devices[: 2 * p.pairs], devices[2 * p.pairs :]
    chats = await bounded(
        min(20, concurrency),
        [
            partial(
                pair_devices[2 * k].request, "create_chat", participants=[rx.user], kind="direct"
            )
            for k, rx in enumerate(pair_accounts[1::2])
        ],
    )
    gen.pairs = [
        Sender(pair_devices[2 * k], str(chat["id"]).encode(), 1) for k, chat in enumerate(chats)
    ]
    if p.members > 1:
        group = await member_devices[0].request(
            "create_chat", participants=[m.user for m in members[1:]], name="capacity"
        )
        chat = str(group["id"]).encode()
        gen.group = [
            Sender(d, chat, p.members - 1) for d in member_devices[: min(GROUP_SENDERS, p.members)]
        ]
    await gen.drain(10.0)  # the chat updates, acked
    return gen
