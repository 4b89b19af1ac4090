"""Where a block report goes: a metric, a span event on the request, a log line."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import structlog

from fastprof._otel import hex_ids
from fastprof.attributes import (
    BLOCKED_EVENT,
    LOOP_BLOCKED_S,
    LOOP_CAUSE,
    LOOP_CPU_S,
    LOOP_GC_S,
    LOOP_IN_REQUEST,
    LOOP_SAMPLE_SHARE,
    LOOP_SAMPLES,
    LOOP_THRESHOLD_S,
    OPERATION,
)
from fastprof.loop._report import BlockReport, format_stack

if TYPE_CHECKING:
    from fastprof._context import RequestState
    from fastprof.loop._metrics import LoopMetrics

__all__ = ["MAX_EVENTS_PER_REQUEST", "RateLimit", "add_span_event", "log_block", "record_metrics"]

MAX_EVENTS_PER_REQUEST: Final = 16
_LOG_STACK_FRAMES: Final = 8

logger = structlog.get_logger("fastprof.loop")


class RateLimit:
    """Token bucket: ``burst`` reports, refilled at ``per_minute`` per minute."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens", "suppressed")

    def __init__(self, per_minute: int) -> None:
        self._burst = float(max(per_minute, 1))
        self._rate = per_minute / 60.0
        self._tokens = self._burst
        self._last = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False


def record_metrics(
    metrics: LoopMetrics,
    duration_s: float,
    in_request: bool,
    route: str | None,
    cause: str | None = None,
) -> None:
    """Count the block and record its duration (by route when in a request, and cause)."""
    attrs: dict[str, Any] = {LOOP_IN_REQUEST: in_request}
    if route is not None:
        attrs["http.route"] = route
    if cause is not None:
        attrs[LOOP_CAUSE] = cause
    metrics.blocks.add(1, attrs)
    metrics.blocked_duration.record(duration_s, attrs)


def add_span_event(
    span: Any, report: BlockReport, threshold_s: float, max_stack_chars: int
) -> None:
    """The ``fastprof.loop.blocked`` event on ``span`` (the request's, or the
    dependency's it happened in), timed at the block's start."""
    attrs: dict[str, Any] = {
        LOOP_BLOCKED_S: report.duration_s,
        LOOP_THRESHOLD_S: threshold_s,
        LOOP_SAMPLES: report.samples,
        LOOP_SAMPLE_SHARE: report.share,
        "code.stacktrace": format_stack(report.stack, max_stack_chars),
    }
    location = report.location
    if location is not None:
        attrs["code.file.path"] = location[0]
        attrs["code.line.number"] = location[1]
        attrs["code.function.name"] = location[2]
    if report.operation is not None:
        attrs[OPERATION] = report.operation
    if report.cpu_s is not None:
        attrs[LOOP_CPU_S] = report.cpu_s
    if report.gc_s is not None:
        attrs[LOOP_GC_S] = report.gc_s
    if report.cause is not None:
        attrs[LOOP_CAUSE] = report.cause
    start_ns = time.time_ns() - int((time.perf_counter() - report.due) * 1e9)
    span.add_event(BLOCKED_EVENT, attrs, timestamp=max(start_ns, 0))


def log_block(
    report: BlockReport,
    state: RequestState | None,
    route: str | None,
    threshold_s: float,
    max_stack_chars: int,
    limit: RateLimit,
) -> None:
    """The ``event loop blocked`` warning, with the request's ids when in a request."""
    fields: dict[str, Any] = {
        "blocked_s": round(report.duration_s, 4),
        "threshold_s": threshold_s,
        "in_request": state is not None,
        "task": report.task_name,
        "samples": report.samples,
        # The innermost frames; the span event carries the full bounded stack.
        "stack": format_stack(report.stack[-_LOG_STACK_FRAMES:], max_stack_chars),
    }
    location = report.location
    if location is not None:
        fields["location"] = f"{location[0]}:{location[1]}"
        fields["function"] = location[2]
    if report.operation is not None:
        fields["operation"] = report.operation
    if report.cause is not None:
        fields["cause"] = report.cause
    if report.cpu_s is not None:
        fields["cpu_s"] = round(report.cpu_s, 4)
    if report.gc_s is not None:
        fields["gc_s"] = round(report.gc_s, 4)
    if state is not None:
        trace_id, span_id = hex_ids(state.span.get_span_context()) or (None, None)
        fields["route"] = route
        fields["method"] = state.method
        fields["request_id"] = state.request_id
        fields["trace_id"] = trace_id
        fields["span_id"] = span_id
    if limit.suppressed:
        fields["suppressed"] = limit.suppressed
        limit.suppressed = 0
    logger.warning("event loop blocked", **fields)
