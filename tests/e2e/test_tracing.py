"""OpenTelemetry traces: a WebSocket command's span holds its store calls and its publishes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pigeon.app import create_app, runner_options
from pigeon.client import PigeonClient, login, register
from tests import conftest
from tests.conftest import _RUN, PASSWORD, Server, shared_stack, stop_server


class Spans(InMemorySpanExporter):
    """Finished spans, and a way to wait for one (spans end on the event loop's thread)."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        self._changed.set()
        return result

    async def until(self, found: Callable[[tuple[ReadableSpan, ...]], bool]) -> None:
        async with asyncio.timeout(10):
            while not found(self.get_finished_spans()):
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def traced(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Server, Spans]]:
    exporter = Spans()
    settings = conftest.test_settings(tmp_path, shared_stack(request), tracing={"enabled": True})
    runner = web.AppRunner(
        create_app(settings, span_exporter=exporter),
        handle_signals=False,
        **runner_options(settings),
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server = Server(runner, f"http://127.0.0.1:{runner.addresses[0][1]}")
    yield server, exporter
    await stop_server(server)


async def test_a_send_is_one_trace_from_command_to_store_and_bus(
    traced: tuple[Server, Spans],
) -> None:
    server, exporter = traced
    await register(server.url, f"tra_{_RUN}", PASSWORD)
    bob_id = await register(server.url, f"trb_{_RUN}", PASSWORD)
    alice = await login(server.url, f"tra_{_RUN}", PASSWORD)
    await login(server.url, f"trb_{_RUN}", PASSWORD)  # bob has a device: the send fans out
    async with PigeonClient(server.url, alice.token) as client:
        chat = (await client.create_chat([bob_id]))["id"]
        exporter.clear()
        sent = await client.send(chat, "traced")
    spans = exporter.get_finished_spans()
    (command,) = [s for s in spans if s.name == "ws send"]
    assert command.attributes is not None and command.attributes["device"] == alice.device
    trace_id = command.context.trace_id

    def in_trace(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
        return [s for s in spans if s.context.trace_id == trace_id]

    # the delivery is published after the reply, in a task started by the command
    await exporter.until(lambda spans: any(s.name == "bus publish" for s in in_trace(spans)))
    trace = in_trace(exporter.get_finished_spans())
    names = {s.name for s in trace}
    assert "store send" in names and "bus publish" in names, names
    store_send = next(s for s in trace if s.name == "store send")
    assert store_send.parent is not None
    assert store_send.parent.span_id == command.context.span_id
    assert sent.seq == 1
