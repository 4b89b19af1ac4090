"""Shared fixtures: the span sink (``fastprof.testing.SpanRecorder``), and checks every test gets.

Tests are grouped by capability (``route_spans/``, ``dependencies/``, ``profiling/``,
``loop/``, ``exporters/``, ``transparency/``); helpers shared across groups live in
``tests/_*.py`` modules, fixtures of one group in its ``conftest.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from fastprof import _internal_errors
from fastprof.testing import SpanRecorder

Spans = SpanRecorder  # the name the tests use


@pytest.fixture
def spans() -> Iterator[Spans]:
    sink = SpanRecorder()
    yield sink
    sink.shutdown()


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
