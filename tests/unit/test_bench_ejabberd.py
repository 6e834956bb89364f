"""`pigeon bench compare`'s ejabberd target: the XMPP it speaks (pure parts) and one short
real run against a spawned ejabberd, when it is installed."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from pigeon.bench import compare, ejabberd
from pigeon.bench.cli import bench_app
from pigeon.bench.one_to_one import STAMP_DIGITS
from pigeon.bench.server import Node, Target

FULL_JID = b"4824303125703345744690@localhost/5221733237447306227706"
#: A bind result exactly as ejabberd 23.01 sends it.
BIND_RESULT = (
    b"<iq xmlns='jabber:client' type='result' id='b'><bind xmlns='urn:ietf:params:xml:ns:"
    b"xmpp-bind'><jid>" + FULL_JID + b"</jid></bind></iq>"
)

needs_ejabberd = pytest.mark.skipif(
    not ejabberd.installed(),
    reason="needs erl and ejabberd's Erlang code under /usr/lib/*/ejabberd-* (apt-get install"
    " ejabberd)",
)


def delivered(to: bytes, mid: int, body: bytes) -> bytes:
    """A message frame as ejabberd delivers it to the recipient."""
    return (
        b"<message xmlns='jabber:client' xml:lang='en' to='%s' from='1@localhost/2' type='chat'"
        b" id='%d'><body>%s</body></message>" % (to, mid, body)
    )


class FakeSock:
    """Records what the generator sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)


def test_parse_jid_from_bind_result() -> None:
    assert ejabberd.parse_jid(BIND_RESULT) == FULL_JID
    with pytest.raises(ValueError, match="no <jid>"):
        ejabberd.parse_jid(b"<iq type='error' id='b'/>")


def test_message_frame_carries_the_padded_stamp() -> None:
    frame = ejabberd.message(FULL_JID, 7, 123, b"xx")
    stamp = b"0" * (STAMP_DIGITS - 3) + b"123"
    assert frame == (
        b'<message to="'
        + FULL_JID
        + b'" type="chat" id="7"><body>'
        + stamp
        + b"xx</body></message>"
    )


async def test_generator_reads_the_stamp_and_a_delivery_drives_the_closed_loop() -> None:
    gen = compare._XmppGenerator(compare.Workload(pairs=1, size=30))
    tx, rx = compare._XmppSocket(gen), compare._XmppSocket(gen)
    compare._pair_up(gen, [tx, rx], [FULL_JID])
    rx.pair = gen.pairs[0]
    sock = FakeSock()
    tx.sock = sock  # type: ignore[assignment]  # records sends, all the generator uses
    gen.sending = gen.measuring = True
    sent_at = time.perf_counter_ns() - 5_000_000
    body = b"%0*d" % (STAMP_DIGITS, sent_at) + b"x" * 10
    rx.on_frame(b"<r xmlns='urn:xmpp:sm:3'/>")  # not a message: ignored
    tx.on_frame(delivered(FULL_JID, 1, body))  # to the sender (a bounce): not counted
    assert gen.received == 0 and not sock.sent
    rx.on_frame(delivered(FULL_JID, 1, body))
    assert gen.received == gen.received_in_window == 1
    assert 5_000_000 <= gen.samples[0] < 5_000_000_000
    [frame] = sock.sent  # the delivery let the pair send its next message
    assert frame.startswith(b'<message to="' + FULL_JID + b'"') and gen.committed == 1
    assert len(frame[frame.index(b"<body>") + 6 : frame.index(b"</body>")]) == 30


def test_cli_asks_to_install_ejabberd_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ejabberd, "erl_libs", lambda: None)
    result = CliRunner().invoke(bench_app, ["compare", "--targets", "relay,pigeon,ejabberd"])
    assert result.exit_code == 2
    assert "apt-get install ejabberd" in " ".join(result.output.replace("│", " ").split())


@needs_ejabberd
async def test_compare_against_a_spawned_ejabberd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Closed and open loop on a real ejabberd, which is gone after, with its temp dir."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[psutil.Process] = []
    names: list[str] = []
    running = ejabberd.running

    @contextlib.asynccontextmanager
    async def recorded(cpu: int | None) -> AsyncIterator[tuple[str, Node]]:
        async with running(cpu) as (url, node):
            assert node.pid is not None
            seen.append(psutil.Process(node.pid))
            names.append(seen[-1].name())
            yield url, node

    monkeypatch.setattr(ejabberd, "running", recorded)
    closed = compare.Workload(pairs=5, inflight=2, duration=0.5, warmup=0.2)
    opened = compare.Workload(pairs=5, rate=200, duration=1.0, warmup=0.2)
    results = await compare.compare(["ejabberd"], [closed, opened], Target(), 1)
    for r in results:
        assert r.target == "ejabberd" and r.lost == 0 and r.delivered_per_s > 0
        assert 0 < r.latency_ms["p50_ms"] <= r.latency_ms["p99_ms"]
        assert r.cpu_us_per_msg is not None
    assert results[0].committed > 5 * 2  # deliveries drove the closed loop on
    assert 150 < results[1].delivered_per_s < 250
    assert names == ["beam.smp", "beam.smp"]  # erl execs it: its CPU
    assert not any(p.is_running() for p in seen)
    assert not os.listdir(tmp_path)


@needs_ejabberd
async def test_a_failed_start_leaves_no_ejabberd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spawned: list[subprocess.Popen[bytes]] = []
    spawn = ejabberd._spawn

    def recorded(root: Path, libs: Path, cpu: int | None) -> subprocess.Popen[bytes]:
        spawned.append(spawn(root, libs, cpu))
        return spawned[-1]

    monkeypatch.setattr(ejabberd, "_spawn", recorded)
    with pytest.raises(RuntimeError, match="did not start"):
        async with ejabberd.running(None, timeout=0.0):
            pass
    [proc] = spawned
    assert proc.returncode is not None  # stopped and reaped
    assert not os.listdir(tmp_path)
