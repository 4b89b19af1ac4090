"""Print finished traces as indented trees: the zero-setup exporter for development."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TextIO

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from fastprof import attributes as names

__all__ = ["SpanTreePrinter", "format_trace"]

_SHOWN_ATTRIBUTES = (
    "http.route",
    "http.response.status_code",
    "code.function.name",
    names.DEPENDENCY_KIND,
    names.CACHE_HIT,
    names.THREADPOOL_WAIT_S,
    names.REQUEST_ID,
    names.PROFILE_ID,
    "error.type",
)

_SHOWN_EVENT_ATTRIBUTES = (
    names.LOOP_BLOCKED_S,
    "code.file.path",
    "code.line.number",
    "code.function.name",
    names.OPERATION,
    names.PROFILE_TOP_FUNCTION,
    names.PROFILE_TOP_LOCATION,
    names.PROFILE_TOP_SECONDS,
    names.PROFILE_WAITING_SECONDS,
)


class SpanTreePrinter(SpanExporter):
    """A span exporter that writes each trace as a tree once its local root ends.

    Use with a ``SimpleSpanProcessor`` in development only. Pending traces are
    bounded (``max_pending_traces``); the oldest is printed as-is when exceeded.
    """

    def __init__(self, stream: TextIO | None = None, *, max_pending_traces: int = 256) -> None:
        self._stream = stream
        self._pending: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        # Traces already printed: spans that end later (a yield dependency's teardown
        # after the response was sent) are printed as late lines of their trace.
        self._printed: OrderedDict[int, None] = OrderedDict()
        self._max_pending = max_pending_traces
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        ready: list[list[ReadableSpan]] = []
        late: list[ReadableSpan] = []
        with self._lock:
            for span in spans:
                if span.context is None:
                    continue
                trace_id = span.context.trace_id
                if trace_id in self._printed:
                    late.append(span)
                    continue
                self._pending.setdefault(trace_id, []).append(span)
                if span.parent is None or span.parent.is_remote:
                    ready.append(self._pending.pop(trace_id))
                    self._printed[trace_id] = None
                    while len(self._printed) > self._max_pending:
                        self._printed.popitem(last=False)
            while len(self._pending) > self._max_pending:
                ready.append(self._pending.popitem(last=False)[1])
        stream = self._stream or sys.stdout
        for group in ready:
            stream.write(format_trace(group))
        for span in late:
            stream.write("  (ended after the request span) " + format_trace([span]).lstrip())
        stream.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            groups = list(self._pending.values())
            self._pending.clear()
        for group in groups:
            (self._stream or sys.stdout).write(format_trace(group))


def format_trace(spans: Sequence[ReadableSpan]) -> str:
    """Render spans of one trace as an indented tree with durations in ms."""
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        key = parent if parent in by_id else None
        children.setdefault(key, []).append(span)
    for group in children.values():
        group.sort(key=lambda s: s.start_time or 0)
    lines: list[str] = []

    def walk(span: ReadableSpan, depth: int) -> None:
        duration_ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        attrs = span.attributes or {}
        shown = " ".join(f"{k}={attrs[k]!s}" for k in _SHOWN_ATTRIBUTES if k in attrs)
        status = " ERROR" if span.status.status_code.name == "ERROR" else ""
        lines.append(f"{'  ' * depth}{span.name}  {duration_ms:.2f} ms{status}  {shown}".rstrip())
        for event in span.events:
            if event.name.startswith("fastprof."):
                details = " ".join(
                    f"{k}={v!s}"
                    for k, v in (event.attributes or {}).items()
                    if k in _SHOWN_EVENT_ATTRIBUTES
                )
                lines.append(f"{'  ' * (depth + 1)}* {event.name}  {details}".rstrip())
        if span.context is not None:
            for child in children.get(span.context.span_id, []):
                walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return "\n".join(lines) + "\n\n"
