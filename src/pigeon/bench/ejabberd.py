"""ejabberd as a `pigeon bench compare` target: its process and the XMPP it is spoken to in.

Why: the issue asks how Pigeon compares with an established chat server on the same 1:1
workload. ejabberd (the Debian package, when installed) runs as a subprocess of the benchmark
with a config of its own in a fresh temp dir (removed after), never the system service:
- one scheduler (`+S 1:1`) on the pinned core, the issue's rule of one core per server, and
  scheduler busy-wait off (`+sbwt none`, also for the dirty schedulers), so its CPU figure is
  work, not spinning; the Popen pid is beam.smp itself (`erl` execs it), so its process CPU
  (every scheduler and async thread) is what `Node.cpu_seconds` reads;
- clients log in anonymously (SASL ANONYMOUS): no accounts to create;
- nothing throttles the load. A WebSocket session takes `shaper`, `max_stanza_size` and
  `access` from the first `ejabberd_c2s` listener; there is none, so its shaper is `none` and
  its stanza size unlimited (with the packaged config it would get `c2s_shaper`, which shapes
  every client to 3,000 B/s: about 17 of these messages a second). `shaper_rules` is empty, so
  no rule names a shaper and `max_user_sessions` is unlimited. The listener's backlog is raised
  from its default of 5, which drops SYNs when hundreds of sockets connect at once.
  `max_fsm_queue` bounds a session's queue at 100,000 stanzas (far above what a run keeps in
  flight), so an overloaded run fails loudly instead of growing without end.

What it does per message is lighter than Pigeon's job: the only modules are `mod_ping`, so an
online recipient's message is routed from session to session and stored nowhere (no offline
store, no archive), and no receipt or acknowledgement goes back to the sender (XMPP has no
server ack). The comparison is still the issue's target.

XMPP over WebSocket (RFC 7395): subprotocol `xmpp`, one stanza per text frame. Set-up parses
with regexes; the measured path (`message`, and the generator reading the stamp after `BODY`)
stays as cheap as Pigeon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pigeon.bench.server import Node, free_port, pin, stop
from pigeon.bench.wire import WireSocket

NOT_INSTALLED = (
    "ejabberd is not installed: apt-get install ejabberd, then service ejabberd stop"
    " (the benchmark starts its own)"
)
#: Where Debian's multiarch packages put ejabberd and its Erlang libraries.
LIB_ROOT = Path("/usr/lib")
SUBPROTOCOLS = ("xmpp",)
OPEN = b'<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0"/>'
AUTH = b'<auth xmlns="urn:ietf:params:xml:ns:xmpp-sasl" mechanism="ANONYMOUS"/>'
BIND = b'<iq type="set" id="b"><bind xmlns="urn:ietf:params:xml:ns:xmpp-bind"/></iq>'
#: What every message frame ejabberd delivers starts with, and the tag its stamp follows.
MESSAGE = b"<message"
BODY = b"<body>"
_JID = re.compile(rb"<jid>([^<]+)</jid>")
_FAILED = (b"<failure", b"<stream:error", b"type='error'")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)

CONFIG = """\
hosts: [localhost]
loglevel: warning
log_rotate_count: 0
auth_method: anonymous
anonymous_protocol: sasl_anon
allow_multiple_connections: true
default_db: mnesia
listen:
  - port: {port}
    ip: "127.0.0.1"
    module: ejabberd_http
    backlog: 1024
    request_handlers:
      /ws: ejabberd_http_ws
shaper_rules: {{}}
acl: {{}}
access_rules:
  local:
    allow: all
  c2s:
    allow: all
max_fsm_queue: 100000
modules:
  mod_ping: {{}}
"""


def erl_libs() -> Path | None:
    """The directory holding ejabberd's Erlang applications (ERL_LIBS), or None without `erl`
    or ejabberd."""
    if shutil.which("erl") is None:
        return None
    for app in sorted(LIB_ROOT.glob("*/ejabberd-*/ebin/ejabberd.app")):
        return app.parents[2]
    return None


def installed() -> bool:
    """Whether the `ejabberd` target can run here (the CLI and the tests ask first)."""
    return erl_libs() is not None


def message(to: bytes, mid: int, stamp: int, pad: bytes) -> bytes:
    """A chat message to the full JID `to` whose body is the send stamp, zero-padded to
    STAMP_DIGITS, then `pad` (as Pigeon's body)."""
    return b'<message to="%s" type="chat" id="%d"><body>%020d%s</body></message>' % (
        to,
        mid,
        stamp,
        pad,
    )


def parse_jid(frame: bytes) -> bytes:
    """The full JID from a bind result."""
    match = _JID.search(frame)
    if match is None:
        raise ValueError(f"no <jid> in {frame!r}")
    return match.group(1)


async def login(url: str, on_frame: Callable[[bytes], None]) -> tuple[WireSocket, bytes]:
    """Open a stream, log in anonymously and bind a resource; returns the socket, now passing
    frames to `on_frame`, and its full JID."""
    frames: asyncio.Queue[bytes] = asyncio.Queue()
    sock = await WireSocket.connect(url, frames.put_nowait, protocols=SUBPROTOCOLS)
    try:
        async with asyncio.timeout(30):
            sock.send(OPEN)
            await _expect(frames, b"<mechanism>ANONYMOUS<")
            sock.send(AUTH)
            await _expect(frames, b"<success")
            sock.send(OPEN)  # SASL success restarts the stream
            await _expect(frames, b"<bind")
            sock.send(BIND)
            jid = parse_jid(await _expect(frames, b"<jid>"))
    except BaseException:
        sock.close()
        raise
    sock.on_frame = on_frame
    return sock, jid


async def _expect(frames: asyncio.Queue[bytes], wanted: bytes) -> bytes:
    """The next frame containing `wanted`, skipping others (`<open/>`); a failure raises."""
    while True:
        frame = await frames.get()
        if wanted in frame:
            return frame
        if any(failed in frame for failed in _FAILED):
            raise RuntimeError(f"ejabberd refused the login: {frame!r}")


@contextlib.asynccontextmanager
async def running(cpu: int | None, timeout: float = 30.0) -> AsyncIterator[tuple[str, Node]]:
    """A fresh ejabberd pinned to `cpu`, until it takes a WebSocket login; yields its
    WebSocket URL and its process. Stopped (killed after 5 s) and its dir removed after."""
    libs = erl_libs()
    if libs is None:
        raise RuntimeError(NOT_INSTALLED)
    with tempfile.TemporaryDirectory(prefix="pigeon-ejabberd-") as tmp:
        root = Path(tmp)
        port = free_port()
        (root / "ejabberd.yml").write_text(CONFIG.format(port=port))
        proc = _spawn(root, libs, cpu)
        try:
            node = Node(f"http://127.0.0.1:{port}", proc.pid)
            url = f"ws://127.0.0.1:{port}/ws"
            await _wait_ready(url, proc, root, timeout)
            yield url, node
        finally:
            stop(proc, grace=5.0)


def _spawn(root: Path, libs: Path, cpu: int | None) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "EJABBERD_CONFIG_PATH": str(root / "ejabberd.yml"),
        "ERL_LIBS": str(libs),
    }
    cmd = ["erl", "-noinput", "+S", "1:1", "+sbwt", "none", "+sbwtdcpu", "none"]
    cmd += ["+sbwtdio", "none", "+K", "true", "+P", "250000"]
    cmd += ["-mnesia", "dir", f'"{root / "db"}"']
    cmd += ["-ejabberd", "log_path", f'"{root / "log" / "ejabberd.log"}"', "-s", "ejabberd"]
    with (root / "erl.out").open("wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _preexec(cpu),
        )


def _preexec(cpu: int | None) -> None:
    """Pinned, and killed with the benchmark even when it dies without stopping it."""
    pin(cpu)
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], root: Path, timeout: float) -> None:
    """Until a WebSocket upgrade on `url` succeeds (it takes ejabberd a few seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, TimeoutError):
            probe = await WireSocket.connect(url, _ignore, timeout=2.0, protocols=SUBPROTOCOLS)
            probe.close()
            return
        await asyncio.sleep(0.05)  # polling an external process: there is no event to await
    raise RuntimeError(f"ejabberd did not start (exit {proc.poll()}):\n{_log_tail(root)}")


def _ignore(frame: bytes) -> None:
    pass


def _log_tail(root: Path) -> str:
    tails = []
    for path in (root / "erl.out", root / "log" / "error.log"):
        if path.exists():
            tails.append(f"{path.name}: {path.read_text(errors='replace')[-2000:]}")
    return "\n".join(tails)
