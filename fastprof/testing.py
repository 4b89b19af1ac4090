"""Helpers for testing an application instrumented with fastprof.

:class:`SpanRecorder` is a tracer provider that keeps every finished span in
memory, with a few look-ups for assertions::

    import httpx
    from fastapi import FastAPI

    import fastprof
    from fastprof.testing import SpanRecorder

    async def test_orders_span() -> None:
        app = FastAPI()

        @app.get("/orders/{order_id}")
        async def order(order_id: int) -> dict[str, int]:
            return {"id": order_id}

        spans = SpanRecorder()
        fastprof.instrument(app, tracer_provider=spans.provider)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/orders/1")
        (server,) = spans.server()
        assert server.name == "GET /orders/{order_id}"

It uses the OpenTelemetry SDK's in-memory exporter with a simple (synchronous)
span processor: spans are there as soon as they end. Not for production.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

__all__ = ["SpanRecorder"]


class _OpenSpans(SpanProcessor):
    """Names of the spans started and not (yet) ended."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.names[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None:
            self.names.pop(span.context.span_id, None)


class SpanRecorder:
    """A tracer provider whose finished spans are kept in memory for assertions.

    Pass :attr:`provider` as ``tracer_provider=`` to :func:`fastprof.instrument`
    (and to FastAPI's or OpenTelemetry's instrumentation when you test them
    together). Call :meth:`shutdown` when done.
    """

    def __init__(self, **provider_options: Any) -> None:
        """``provider_options`` go to the SDK's ``TracerProvider`` (``sampler``, ``resource``)."""
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(**provider_options)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self._open = _OpenSpans()
        self.provider.add_span_processor(self._open)

    def all(self) -> list[ReadableSpan]:
        """Every finished span, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def server(self) -> list[ReadableSpan]:
        """The finished SERVER spans (one per traced request)."""
        return [s for s in self.all() if s.kind == SpanKind.SERVER]

    def named(self, name: str) -> list[ReadableSpan]:
        """The finished spans called ``name`` (``"dependency get_db"``, ``"GET /items"``...)."""
        return [s for s in self.all() if s.name == name]

    def children_of(self, span: ReadableSpan) -> list[ReadableSpan]:
        """The finished spans whose parent is ``span``."""
        assert span.context is not None
        parent_id = span.context.span_id
        return [s for s in self.all() if s.parent is not None and s.parent.span_id == parent_id]

    def open(self) -> list[str]:
        """Names of the spans started through :attr:`provider` and never ended (sorted)."""
        return sorted(self._open.names.values())

    def clear(self) -> None:
        """Forget the finished spans."""
        self.exporter.clear()

    def shutdown(self) -> None:
        """Shut the provider down."""
        self.provider.shutdown()
