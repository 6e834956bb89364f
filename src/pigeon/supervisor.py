"""`pigeon serve --workers N`: N server processes on one port, one per core.

Python runs one core's worth of work per process, so a node uses its cores by running several
processes that share the listening port (SO_REUSEPORT: the kernel spreads new connections over
them). They are complete, independent nodes that share nothing in memory: routing and presence
go through Redis and the state lives in PostgreSQL, exactly as between machines. The supervisor
only starts them, restarts one that dies, and passes SIGTERM/SIGINT on for a graceful stop.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from pigeon.config import PostgresSettings, Settings

log = logging.getLogger(__name__)

#: A worker that dies sooner than this after starting is restarted only after a pause
#: (doubling up to `_MAX_BACKOFF`), so a worker that cannot start does not spin.
_HEALTHY_AFTER = 10.0
_MAX_BACKOFF = 30.0
#: More unasked exits than this within `_CRASH_WINDOW` seconds (all workers together), and the
#: supervisor stops every worker and exits 1: a worker that cannot run (a database gone, a
#: broken deployment) must not be restarted forever.
_MAX_CRASHES = 5
_CRASH_WINDOW = 60.0


class WorkersNeedSharedState(ValueError):
    """Several processes can only form one server through a shared store, bus and registry."""


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse configurations in which N processes would not act as one server."""
    if workers <= 1:
        return
    missing = []
    if not isinstance(settings.store, PostgresSettings):
        missing.append("PIGEON_STORE__TYPE=postgres")
    if settings.bus.type != "redis":
        missing.append("PIGEON_BUS__TYPE=redis")
    if settings.presence.type != "redis":
        missing.append("PIGEON_PRESENCE__TYPE=redis")
    if settings.port == 0:
        missing.append("a fixed --port")
    if missing:
        raise WorkersNeedSharedState(
            f"--workers {workers} needs shared state between processes: set {', '.join(missing)}"
        )


class Supervisor:
    """Starts `workers` copies of `pigeon serve <args>` and keeps them running until a signal."""

    def __init__(self, args: list[str], workers: int) -> None:
        self._args = args
        self._workers = workers
        self._procs: dict[int, tuple[int, subprocess.Popen[bytes], float]] = {}  # pid -> ...
        self._stopping = False

    def run(self) -> int:
        """Run until SIGTERM/SIGINT and every worker has exited; returns the exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        share_metrics()
        for index in range(self._workers):
            if not self._stopping:  # a signal during start-up: start no more
                self._start(index)
        backoff = {index: 1.0 for index in range(self._workers)}
        crashes: list[float] = []  # when workers exited unasked, within the last window
        failed = False
        while self._procs:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            entry = self._procs.pop(pid, None)
            if entry is None:
                continue
            forget_worker_metrics(pid)
            index, _, started = entry
            if self._stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < _CRASH_WINDOW] + [now]
            if len(crashes) > _MAX_CRASHES:  # it will not get better by itself: stop, say why
                log.error(
                    "giving up: workers exited %d times within %.0f s (worker %d, pid %d, "
                    "exit %d last); see the lines above for the cause",
                    len(crashes),
                    _CRASH_WINDOW,
                    index,
                    pid,
                    code,
                )
                self._on_signal(signal.SIGTERM, None)
                failed = True
                continue
            log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
            if time.monotonic() - started < _HEALTHY_AFTER:
                time.sleep(backoff[index])  # a pause between restarts, not synchronisation
                backoff[index] = min(backoff[index] * 2, _MAX_BACKOFF)
            else:
                backoff[index] = 1.0
            if not self._stopping:
                self._start(index)
        return 1 if failed else 0

    def _start(self, index: int) -> None:
        env = {**os.environ, "PIGEON_GATEWAY__REUSE_PORT": "true", "PIGEON_WORKER": str(index)}
        cmd = [sys.executable, "-m", "pigeon.cli", "serve", *self._args]
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        self._procs[proc.pid] = (index, proc, time.monotonic())
        if self._stopping:  # the signal came while it was starting: pass it on too
            proc.send_signal(signal.SIGTERM)
        log.info("worker %d started (pid %d)", index, proc.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Pass the stop on to every worker started so far (later ones are never started)."""
        self._stopping = True
        for _, proc, _ in list(self._procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)


def share_metrics() -> str:
    """Give the workers one fresh directory for their metrics (prometheus-client's
    multiprocess mode: a scrape answered by any worker sums them all), removed when the
    supervisor exits. Fresh: a directory of an earlier run would count its workers again."""
    path = tempfile.mkdtemp(prefix="pigeon-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # inherited by every worker started
    atexit.register(shutil.rmtree, path, True)
    return path


def forget_worker_metrics(pid: int) -> None:
    """A worker exited: its gauges (live connections) no longer count; its counters and
    histograms stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _die_with_parent() -> None:
    """In a worker, before exec: get SIGTERM if the supervisor dies (even by SIGKILL), so no
    worker outlives it holding the port (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # libc, already loaded
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(0)


_PR_SET_PDEATHSIG = 1
