"""OpenTelemetry tracing, off by default: one trace per WebSocket command, down to the store and
the bus.

Why optional: metrics say that sends got slow; a trace says which store call or publish of which
command it was. But the SDK costs each span a few microseconds and its exporter a thread, so it
is off unless `tracing.enabled`, and then the wrappers below are put in front of the store and the
bus (the composition root does it): a node without tracing pays nothing, not even a branch per
store call. The SDK is an optional extra (`pip install 'pigeon[tracing]'`).

Spans: `ws <command>` (attributes: rid, user, device, result code), its children `store <op>`
for each store call and `bus publish` for each publish it causes (the delivery that follows a
commit runs in a task started inside the command, so it stays in the command's trace).
Exported over OTLP/HTTP to `tracing.endpoint` (a collector, Jaeger, Tempo...).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pigeon.ports import (
    AccountStore,
    AttachmentStore,
    Bus,
    ChatStore,
    KeyStore,
    MessageStore,
    Store,
    port_operations,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from pigeon.config import TracingSettings

T = TypeVar("T")


class TracingUnavailable(RuntimeError):
    """Tracing is enabled in the settings but the OpenTelemetry SDK is not installed."""


def make_tracer(settings: TracingSettings, exporter: Any = None) -> Tracer:
    """A tracer exporting in batches to `settings.endpoint` (or to `exporter`, for tests)."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    except ImportError:
        raise TracingUnavailable(
            "tracing.enabled needs the OpenTelemetry SDK: pip install 'pigeon[tracing]'"
        ) from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=TraceIdRatioBased(settings.sample_ratio),
    )
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(settings.endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("pigeon")


class CommandTracer:
    """Runs a WebSocket command's handler inside its span (the gateway calls `run`)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def run(self, name: str, handler: Awaitable[T], attributes: dict[str, Any]) -> T:
        with self._tracer.start_as_current_span(
            f"ws {name}", attributes=attributes, record_exception=True
        ) as span:
            try:
                return await handler
            except Exception as exc:
                span.set_attribute("pigeon.code", getattr(exc, "code", "internal"))
                raise


def _spanned(tracer: Tracer, name: str, call: Callable[..., Awaitable[Any]]) -> Any:
    async def traced(*args: Any, **kwargs: Any) -> Any:
        with tracer.start_as_current_span(name):
            return await call(*args, **kwargs)

    return traced


class _Traced:
    """A port adapter whose coroutine methods run in spans of their own (instance attributes,
    as metrics' timing wrappers: no `__getattr__` on the traced calls)."""

    def __init__(self, inner: object, port: type[Any], prefix: str, tracer: Tracer) -> None:
        self._inner = inner
        for name in port_operations(port):
            setattr(self, name, _spanned(tracer, f"{prefix}{name}", getattr(inner, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class TracedStore:
    """The Store with each sub-store call in a `store <op>` span."""

    def __init__(self, inner: Store, tracer: Tracer) -> None:
        self._inner = inner
        self.accounts: AccountStore = _traced(inner.accounts, AccountStore, tracer)
        self.chats: ChatStore = _traced(inner.chats, ChatStore, tracer)
        self.messages: MessageStore = _traced(inner.messages, MessageStore, tracer)
        self.attachments: AttachmentStore = _traced(inner.attachments, AttachmentStore, tracer)
        self.push = inner.push
        self.keys: KeyStore = _traced(inner.keys, KeyStore, tracer)

    def __getattr__(self, name: str) -> Any:  # open, aclose, ping and what else the port has
        return getattr(self._inner, name)


def _traced(inner: T, port: type[Any], tracer: Tracer) -> T:
    wrapped: Any = _Traced(inner, port, "store ", tracer)
    return wrapped  # type: ignore[no-any-return]


class TracedBus:
    """The Bus with each publish in a `bus publish` span (subscriptions are the adapter's)."""

    def __init__(self, inner: Bus, tracer: Tracer) -> None:
        self._inner = inner
        self.publish = _spanned(tracer, "bus publish", inner.publish)
        self.publish_many = _spanned(tracer, "bus publish", inner.publish_many)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
