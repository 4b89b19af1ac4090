"""Shared fixtures: an SDK tracer provider with an in-memory exporter."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fastprof import _internal_errors


class _OpenSpans(SpanProcessor):
    """Names of the spans started and not (yet) ended."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.names[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.names.pop(span.context.span_id, None)


class Spans:
    """An in-memory span sink with a few helpers for assertions."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self._open = _OpenSpans()
        self.provider.add_span_processor(self._open)

    def open(self) -> list[str]:
        """Names of the spans started through ``provider`` and never ended."""
        return sorted(self._open.names.values())

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def server(self) -> list[ReadableSpan]:
        return [s for s in self.all() if s.kind == SpanKind.SERVER]

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name]

    def children_of(self, span: ReadableSpan) -> list[ReadableSpan]:
        assert span.context is not None
        return [
            s
            for s in self.all()
            if s.parent is not None and s.parent.span_id == span.context.span_id
        ]

    def clear(self) -> None:
        self.exporter.clear()


@pytest.fixture
def spans() -> Iterator[Spans]:
    sink = Spans()
    yield sink
    sink.provider.shutdown()


class _EndedTwice(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "ended span" in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def _no_span_ended_twice() -> Iterator[None]:
    """Every test: no span is ended twice or changed after it ended.

    The SDK ignores both with only a warning ("Calling end() on an ended span",
    "Setting attribute on ended span", ...), so span-count assertions alone
    cannot see them.
    """
    handler = _EndedTwice()
    sdk_logger = logging.getLogger("opentelemetry.sdk.trace")
    sdk_logger.addHandler(handler)
    try:
        yield
    finally:
        sdk_logger.removeHandler(handler)
    assert handler.messages == []


@pytest.fixture(autouse=True)
def _reset_internal_errors() -> Iterator[None]:
    _internal_errors.reset()
    yield
    _internal_errors.reset()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
