"""Generator processes: the load comes from processes of its own, never from the server's.

A scenario's generator is an async function `fn(spec, gate)`. `Generators` runs one per spec,
each in a spawned process (pinned to the client core, with a raised fd limit, on uvloop), or as
tasks of the caller's loop (`inline`, for tests). Every generator prepares (connects, creates
chats...), calls `await gate.ready(info)` and waits there until the parent says go: so all start
together, and the parent can measure the server in between. A generator that runs until told
(e.g. an observer) may then `await gate.stopped()`, which returns once the parent called
`Generators.stop()`. Their results return by pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any, Generic, Protocol, TypeVar

from pigeon.bench.server import pin, raise_nofile

S = TypeVar("S")
R = TypeVar("R")
T = TypeVar("T")


class Gate(Protocol):
    """Where a generator reports it is prepared and waits for the start signal."""

    async def ready(self, info: dict[str, Any]) -> None: ...

    async def stopped(self) -> None: ...


class _PipeGate:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def ready(self, info: dict[str, Any]) -> None:
        self._conn.send(("ready", info))
        if await asyncio.to_thread(self._conn.recv) != "go":
            raise RuntimeError("generator: expected 'go' from the parent")

    async def stopped(self) -> None:
        if await asyncio.to_thread(self._conn.recv) != "stop":
            raise RuntimeError("generator: expected 'stop' from the parent")


class _LocalGate:
    def __init__(
        self, ready: asyncio.Queue[dict[str, Any]], go: asyncio.Event, stop: asyncio.Event
    ) -> None:
        self._ready = ready
        self._go = go
        self._stop = stop

    async def ready(self, info: dict[str, Any]) -> None:
        self._ready.put_nowait(info)
        await self._go.wait()

    async def stopped(self) -> None:
        await self._stop.wait()


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on uvloop (asyncio's loop when uvloop is missing)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def dump_tasks() -> None:
    """Print every asyncio task's stack to stderr (`kill -USR1` a stuck generator)."""
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} tasks in generator pid {os.getpid()}", file=sys.stderr)
    where: Counter[str] = Counter()
    for task in tasks:
        chain: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(chain) < 12:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is None:
                chain.append(type(coro).__name__)
                break
            chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        where[" > ".join(chain)] += 1
    for stack, count in where.most_common(30):
        print(f"{count:6d}  {stack}", file=sys.stderr)


def _child(
    fn: Callable[[Any, Gate], Awaitable[Any]],
    spec: Any,
    conn: Connection,
    cpu: int | None,
    nofile: int,
) -> None:
    """Entry point of a generator process."""
    try:
        if cpu is not None:
            pin(cpu)
        raise_nofile(nofile)
        # Same garbage-collector tuning as `pigeon serve`: a generator that pauses for a gen-2
        # collection would add its own pause to every latency it measures.
        gc.set_threshold(50_000, *gc.get_threshold()[1:])
        gc.freeze()

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
            return await fn(spec, _PipeGate(conn))

        conn.send(("result", run_loop(main())))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def split(items: list[Any], parts: int) -> list[list[Any]]:
    """`items` in `parts` contiguous slices of near-equal size (no empty slice)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class Generators(Generic[S, R]):
    """Runs one generator per spec and collects their results (in spec order)."""

    def __init__(
        self,
        fn: Callable[[S, Gate], Awaitable[R]],
        specs: list[S],
        *,
        inline: bool = False,
        cpu: int | None = None,
        nofile: int = 65536,
    ) -> None:
        self._fn = fn
        self._specs = specs
        self._inline = inline
        self._cpu = cpu
        self._nofile = nofile
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[Connection] = []
        self._tasks: list[asyncio.Task[R]] = []
        self._ready: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._go = asyncio.Event()
        self._stop = asyncio.Event()
        self.pids: list[int] = []

    async def start(self) -> None:
        if self._inline:
            for spec in self._specs:
                gate = _LocalGate(self._ready, self._go, self._stop)
                self._tasks.append(asyncio.create_task(self._inline_run(spec, gate)))
            return
        ctx = multiprocessing.get_context("spawn")
        for spec in self._specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_child,
                args=(self._fn, spec, child, self._cpu, self._nofile),
                name="pigeon-bench-generator",
                daemon=True,
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
            self.pids.append(proc.pid or 0)

    async def _inline_run(self, spec: S, gate: Gate) -> R:
        return await self._fn(spec, gate)

    async def wait_ready(self, timeout: float) -> list[dict[str, Any]]:
        """Wait until every generator is prepared; returns their `info`s."""
        async with asyncio.timeout(timeout):
            if self._inline:
                infos = []
                for _ in self._specs:
                    getter = asyncio.ensure_future(self._ready.get())
                    done, _pending = await asyncio.wait(
                        [getter, *self._tasks], return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter not in done:
                        getter.cancel()
                        for task in done:
                            task.result()  # a generator ended early: raise its error
                        raise RuntimeError("generator ended before it was ready")
                    infos.append(getter.result())
                return infos
            return [self._expect(await asyncio.to_thread(c.recv), "ready") for c in self._conns]

    def go(self) -> None:
        """Start every generator's measured phase."""
        self._go.set()
        for conn in self._conns:
            conn.send("go")

    def stop(self) -> None:
        """Tell every generator waiting in `gate.stopped()` to finish."""
        self._stop.set()
        for conn in self._conns:
            conn.send("stop")

    async def results(self, timeout: float) -> list[R]:
        """Each generator's result, in spec order (raises if one failed)."""
        async with asyncio.timeout(timeout):
            if self._inline:
                return list(await asyncio.gather(*self._tasks))
            out: list[R] = []
            for conn in self._conns:
                out.append(self._expect(await asyncio.to_thread(conn.recv), "result"))
            return out

    @staticmethod
    def _expect(msg: Any, kind: str) -> Any:
        tag, payload = msg
        if tag == "error":
            raise RuntimeError(f"generator process failed:\n{payload}")
        if tag != kind:
            raise RuntimeError(f"generator sent {tag!r}, expected {kind!r}")
        return payload

    async def aclose(self) -> None:
        """Stop whatever still runs (after an error or a timeout)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
            await asyncio.to_thread(proc.join, 10)
        for conn in self._conns:
            conn.close()
