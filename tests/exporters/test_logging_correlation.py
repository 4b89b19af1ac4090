"""Log correlation: request id, trace id and span id on log lines of a request."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import structlog
from fastapi import Depends, FastAPI
from structlog.testing import LogCapture

import fastprof
from fastprof.logging import RequestContextFilter, add_request_context
from tests._client import client


@pytest.fixture
def structlog_capture() -> Any:
    capture = LogCapture()
    structlog.configure(processors=[add_request_context, capture])
    yield capture
    structlog.reset_defaults()


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def stdlib_capture() -> Any:
    handler = ListHandler()
    handler.addFilter(RequestContextFilter())
    log = logging.getLogger("app.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield handler
    log.removeHandler(handler)
    log.propagate = True


def _app(spans: Any) -> FastAPI:
    slog = structlog.get_logger("app")
    stdlog = logging.getLogger("app.test")
    app = FastAPI()

    def sync_dependency() -> int:  # FastAPI runs it in a worker thread
        slog.info("in sync dependency", thread=threading.get_ident())
        stdlog.info("stdlib in sync dependency")
        return 1

    async def async_dependency() -> int:
        slog.info("in async dependency")
        return 2

    @app.get("/items/{item_id}")
    async def item(
        item_id: int, a: int = Depends(sync_dependency), b: int = Depends(async_dependency)
    ) -> dict[str, int]:
        slog.info("in endpoint")
        stdlog.info("stdlib in endpoint")
        return {"item_id": item_id}

    fastprof.instrument(app, tracer_provider=spans.provider)
    return app


@pytest.mark.anyio
async def test_log_lines_carry_request_and_trace_ids(
    spans: Any, structlog_capture: Any, stdlib_capture: Any
) -> None:
    app = _app(spans)
    async with client(app) as c:
        response = await c.get("/items/1", headers={"x-request-id": "req-abc"})
        assert response.status_code == 200
    structlog.get_logger("app").info("outside any request")

    [server] = spans.server()
    trace_id = format(server.context.trace_id, "032x")
    # The current span: the SERVER span, or a dependency span under it when
    # dependency instrumentation is on.
    span_ids = {format(s.context.span_id, "016x") for s in spans.all()}
    by_event = {e["event"]: e for e in structlog_capture.entries}
    for event in ("in sync dependency", "in async dependency", "in endpoint"):
        entry = by_event[event]
        assert entry["request_id"] == "req-abc", event
        assert entry["trace_id"] == trace_id, event
        assert entry["span_id"] in span_ids, event
    assert by_event["in sync dependency"]["thread"] != threading.get_ident()
    outside = by_event["outside any request"]
    assert "request_id" not in outside and "trace_id" not in outside

    records = {r.getMessage(): r for r in stdlib_capture.records}
    for message in ("stdlib in sync dependency", "stdlib in endpoint"):
        record: Any = records[message]
        assert record.request_id == "req-abc"
        assert record.trace_id == trace_id
        assert record.span_id in span_ids
    assert records["stdlib in sync dependency"].thread != threading.get_ident()


def test_filter_defaults_outside_a_request_and_keeps_explicit_values() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert RequestContextFilter(default="none").filter(record)
    assert (record.request_id, record.trace_id, record.span_id) == ("none", "none", "none")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.request_id = "mine"
    RequestContextFilter().filter(record)
    assert record.request_id == "mine" and record.trace_id == "-"
    assert add_request_context(None, "info", {"event": "e"}) == {"event": "e"}
