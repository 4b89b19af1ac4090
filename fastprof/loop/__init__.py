"""Event-loop health: which request and which line blocked the loop; loop lag; thread pool.

Usage::

    import fastprof

    fastprof.instrument(app, loop_monitor=fastprof.LoopMonitor(threshold_s=0.1))

:class:`LoopMonitor` is a :class:`~fastprof.hooks.RequestHooks`. It starts a
:class:`~fastprof.loop._watchdog.LoopWatchdog` (a heartbeat on the loop plus a
daemon thread) in the serving process, lazily: at lifespan startup when
``instrument()`` installed it, else at the first request. It never patches
asyncio, so it behaves the same on asyncio and uvloop.

Requests cost it nothing: it finds the request that blocks the loop only when
the loop is blocked, from the loop thread's stack (the frame of
:class:`~fastprof.FastprofMiddleware` serving it), so an unsampled request
takes the middleware's lean path with the monitor on. Its hooks run only for
requests that are traced anyway (a recording span, or another hook that wants
them): they report a block still in progress while the request's span is open.

When the loop is blocked longer than ``threshold_s`` it reports, once per block
and per request that blocked it (two requests blocking one after the other get
a report each):

* a span event ``fastprof.loop.blocked`` on the request's span (or on the span
  of the dependency it happened in) with the duration, the blocking frame
  (``code.file.path``, ``code.line.number``, ``code.function.name``), the
  operation (dependency or endpoint), a bounded stack (``code.stacktrace``),
  and why: the loop thread's CPU and garbage-collection time during the block
  and a cause, ``cpu``, ``wait`` or ``gc``;
* ``RequestState.blocked_s`` accumulated (the slow-request log shows it);
* a structlog warning ``event loop blocked`` with route, request id and trace
  id (rate-limited);
* metrics ``fastprof.loop.blocks`` and ``fastprof.loop.blocked.duration``.

A block with no request task on the loop (startup, background tasks, plain
callbacks) is reported with ``in_request=False`` and the task's name.

The package: ``_watchdog`` (heartbeat and sampling thread) finds blocks,
``_report`` analyses one into a :class:`~fastprof.loop._report.BlockReport`
(a pure function), ``_emit`` sends it to the metric, the span event and the
log, ``_threadpool`` polls anyio's thread limiter, and :class:`LoopMonitor`
ties them to requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, Final

from opentelemetry.metrics import MeterProvider
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.types import Scope

from fastprof import _internal_errors
from fastprof._context import RequestState, current_request
from fastprof._options import check_int, check_seconds
from fastprof.attributes import OPERATION_KIND
from fastprof.hooks import RequestHooks
from fastprof.loop._emit import (
    MAX_EVENTS_PER_REQUEST,
    RateLimit,
    add_span_event,
    log_block,
    record_metrics,
)
from fastprof.loop._metrics import LoopMetrics
from fastprof.loop._report import analyse
from fastprof.loop._threadpool import ThreadpoolWatch
from fastprof.loop._watchdog import Block, LoopWatchdog
from fastprof.metrics import ThreadpoolSnapshot
from fastprof.middleware import FastprofMiddleware

__all__ = ["LoopMonitor"]

#: Frames walked outward from the blocking line to find the request serving it.
_MAX_WALK: Final = 2000

#: Code objects whose frame holds the request (the local that holds it).
_REQUEST_FRAMES: Final[dict[CodeType, str]] = {
    FastprofMiddleware.__call__.__code__: "request",
    FastprofMiddleware._websocket.__code__: "session",
}

#: Code objects of Starlette's background tasks: they run inside the middleware's
#: call, after the response; a block in one is not charged to the request.
_BACKGROUND_FRAMES: Final[frozenset[CodeType]] = frozenset(
    {BackgroundTask.__call__.__code__, BackgroundTasks.__call__.__code__}
)

_OUTSIDE: Final = object()


class LoopMonitor(RequestHooks):
    """Detect event-loop blocking and attribute it; record loop lag and thread-pool use.

    Its hooks run after dependency spans' and before the slow-request log's
    (:attr:`~fastprof.hooks.RequestHooks.order` 200), so the log sees the
    request's ``blocked_s``.

    Args:
        threshold_s: Report blocks of the loop longer than this (default 100 ms).
        interval_s: Heartbeat period; defaults to ``threshold_s / 2`` (5 ms to 0.5 s).
            Also the period of the ``fastprof.loop.lag`` samples.
        sample_interval_s: Stack-sampling period during a block; defaults to
            ``threshold_s / 5`` (1 ms to 50 ms).
        max_samples: Stack samples kept per block.
        max_stack_depth: Innermost frames kept per sample.
        max_stack_chars: Longest stack text put in an event or a log line.
        max_reports_per_minute: Log lines for blocks (bursts allowed up to this
            number); span events and metrics are not rate-limited (span events
            are capped at 16 per request).
        threadpool: Observe anyio's default thread limiter (gauges, saturation
            warning) and record per-call thread-pool waits at request end.
        saturation_log_interval_s: At most one "thread pool saturated" warning per interval.
        meter_provider: Provider of the metrics; defaults to the global one.
    """

    order = 200

    def __init__(
        self,
        threshold_s: float = 0.1,
        *,
        interval_s: float | None = None,
        sample_interval_s: float | None = None,
        max_samples: int = 50,
        max_stack_depth: int = 32,
        max_stack_chars: int = 4096,
        max_reports_per_minute: int = 10,
        threadpool: bool = True,
        saturation_log_interval_s: float = 60.0,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.threshold_s = check_seconds("threshold_s", threshold_s, 0.001, 600.0)
        self.interval_s = (
            min(max(self.threshold_s / 2, 0.005), 0.5)
            if interval_s is None
            else check_seconds("interval_s", interval_s, 0.001, 60.0)
        )
        self.sample_interval_s = (
            min(max(self.threshold_s / 5, 0.001), 0.05)
            if sample_interval_s is None
            else check_seconds("sample_interval_s", sample_interval_s, 0.0005, 60.0)
        )
        self.max_samples = check_int("max_samples", max_samples, 1, 10_000)
        self.max_stack_depth = check_int("max_stack_depth", max_stack_depth, 1, 1000)
        self.max_stack_chars = check_int("max_stack_chars", max_stack_chars, 64, 1_000_000)
        check_int("max_reports_per_minute", max_reports_per_minute, 0, 100_000)
        if not isinstance(threadpool, bool):
            raise ValueError(f"threadpool: expected a bool, got {threadpool!r}")
        self.saturation_log_interval_s = check_seconds(
            "saturation_log_interval_s", saturation_log_interval_s, 0.0, 86_400.0
        )
        if meter_provider is not None and not hasattr(meter_provider, "get_meter"):
            raise ValueError(
                "meter_provider: expected an opentelemetry MeterProvider, "
                f"got {type(meter_provider).__name__}"
            )
        self._threadpool = threadpool
        self._metrics = LoopMetrics(
            meter_provider, self.threadpool_snapshot if threadpool else None
        )
        self._log_limit = RateLimit(max_reports_per_minute) if max_reports_per_minute else None
        self._lock = threading.Lock()
        self._watchdog: LoopWatchdog | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threadpool_watch = ThreadpoolWatch(self.saturation_log_interval_s)
        #: Lag of the last heartbeat in seconds (read by the health check and metrics).
        self.lag_s = 0.0
        self._beat_listeners: tuple[Callable[[float], None], ...] = ()

    def add_beat_listener(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(lag_s)`` on the loop thread at every heartbeat (keep it cheap).

        Used by :mod:`fastprof.prometheus` and :mod:`fastprof.health`.
        """
        self._beat_listeners += (listener,)

    # -- lifecycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the watchdog thread is running."""
        watchdog = self._watchdog
        return watchdog is not None and watchdog.running

    def start(self) -> None:
        """Start monitoring the running event loop (call it on the loop's thread).

        Idempotent. ``instrument(app, loop_monitor=...)`` calls it at lifespan
        startup; without a lifespan it is called by the first request.
        """
        self._ensure_started(asyncio.get_running_loop())

    def stop(self) -> None:
        """Stop the heartbeat and the watchdog thread. Idempotent; any thread."""
        with self._lock:
            watchdog, self._watchdog = self._watchdog, None
            self._loop = None
            self._threadpool_watch.reset()
        if watchdog is not None:
            watchdog.stop()

    def _ensure_started(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            watchdog = self._watchdog
            if watchdog is not None and watchdog.running:
                if watchdog.loop is loop:
                    self._loop = loop
                    return
                old = watchdog.loop
                if old is not None and not old.is_closed() and old.is_running():
                    return  # another live loop is monitored; one loop per monitor
                watchdog.stop()
            self._threadpool_watch.reset()
            watchdog = LoopWatchdog(
                threshold_s=self.threshold_s,
                interval_s=self.interval_s,
                sample_interval_s=self.sample_interval_s,
                max_samples=self.max_samples,
                max_stack_depth=self.max_stack_depth,
                on_beat=self._on_beat,
                resolve_owner=self._resolve_owner,
            )
            watchdog.start()
            self._watchdog = watchdog
            self._loop = loop
        if self._threadpool:
            self._threadpool_watch.refresh()

    # -- request hooks (loop thread) --------------------------------------------

    def wants_unsampled(self, scope: Scope) -> bool:
        # Only to start monitoring a loop without a lifespan: the watchdog finds
        # the requests it needs on the stack.
        return asyncio.get_running_loop() is not self._loop

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._ensure_started(loop)
        if self._threadpool:
            self._threadpool_watch.maybe_refresh()

    def on_request_end(self, state: RequestState) -> None:
        watchdog = self._watchdog
        if watchdog is not None and watchdog.current_blocks:
            # The request finishes inside a blocking callback: report its block
            # now, while its span is still open, with the duration so far.
            self._report_open(state, None)
        # Later blocks of its task (what runs after the response) are not its own.
        state._ended = True
        if self._threadpool:
            record = self._metrics.threadpool_wait.record
            for timing in state.timings:
                wait = timing.threadpool_wait_s
                if wait > 0.0:
                    record(wait, {OPERATION_KIND: timing.kind})

    # -- watchdog callbacks -------------------------------------------------------

    def _resolve_owner(
        self, task: asyncio.Task[Any] | None, frame: FrameType | None
    ) -> tuple[Any, str | None, Any]:
        """Watchdog thread: the request blocking the loop (its state), its current
        operation and the span of the dependency running (if any)."""
        state = _request_on_stack(frame)
        if state is None and task is not None:
            get_context = getattr(task, "get_context", None)  # Python 3.12+
            if get_context is not None:
                # A task the request started (a streaming response's sender, a task
                # group): charged to the request while it is in flight (a background
                # task running after the response keeps the context, not the request).
                state = get_context().get(current_request)
        if not isinstance(state, RequestState) or state._ended:
            return None, None, None
        return state, state.current_operation, state._operation_span

    def on_operation_end(self, state: RequestState, span: Any) -> None:
        """Loop thread: a dependency of ``state`` that ran on the loop is ending.

        A block in progress that happened in it is reported now, while its span
        is open (the heartbeat comes after the span ended).
        """
        watchdog = self._watchdog
        if watchdog is None or not watchdog.current_blocks or span is None:
            return
        self._report_open(state, span)

    def _report_open(self, state: RequestState, span: Any) -> None:
        """Report the unreported blocks of ``state`` seen so far (only those that
        happened in ``span``, when given), ending the one in progress now."""
        watchdog = self._watchdog
        if watchdog is None:
            return
        for block in watchdog.current_blocks:
            if block.reported or block.owner is not state or not block.samples:
                continue
            if span is not None:
                report = analyse(block, 0.0)
                if report is None or report.span is not span:
                    continue
                if block.end is None and time.perf_counter() - block.due < self.threshold_s:
                    continue  # not a block yet: the heartbeat will account for it
            block.reported = True
            block.close(watchdog.reading())
            self._report(block)

    def _on_beat(self, lag: float, blocks: list[Block]) -> None:
        """Loop thread, every heartbeat."""
        self._metrics.lag.record(lag)
        self.lag_s = lag
        for listener in self._beat_listeners:
            try:
                listener(lag)
            except Exception as exc:
                _internal_errors.report("loop.beat_listener", exc)
        for block in blocks:
            if not block.reported:
                block.reported = True
                self._report(block)
        if self._threadpool:
            self._threadpool_watch.check_saturation()

    def _report(self, block: Block) -> None:
        end = block.end if block.end is not None else time.perf_counter()
        duration = max(end - block.due, 0.0)
        report = analyse(block, duration)
        if report is None:  # resumed before the first sample: count it, nothing to attribute
            if duration >= self.threshold_s:
                record_metrics(self._metrics, duration, False, None)
            return
        state: RequestState | None = (
            report.owner if isinstance(report.owner, RequestState) else None
        )
        if duration < self.threshold_s:
            # The short rest of a split block: counted for its request, not reported.
            if state is not None:
                state.blocked_s += duration
            return
        route = state.route if state is not None else None
        record_metrics(self._metrics, duration, state is not None, route, report.cause)
        if state is not None:
            state.blocked_s += duration
            target = _event_target(state, report.span)
            if target is not None and state._loop_events < MAX_EVENTS_PER_REQUEST:
                state._loop_events += 1
                add_span_event(target, report, self.threshold_s, self.max_stack_chars)
        limit = self._log_limit
        if limit is not None and limit.allow():
            log_block(report, state, route, self.threshold_s, self.max_stack_chars, limit)

    # -- thread pool -------------------------------------------------------------

    def threadpool_snapshot(self) -> ThreadpoolSnapshot | None:
        """``(tokens used, tokens total, tasks waiting)`` of anyio's default limiter.

        Safe from any thread (the metric reader's): it reads a limiter object
        cached on the loop thread. ``None`` before the first request.
        """
        return self._threadpool_watch.snapshot()


def _event_target(state: RequestState, span: Any) -> Any:
    """Where a block's event goes: the open span of the dependency it happened in,
    else the request's span if it records, else the slow-request capture's record
    of it (an unsampled request), else nowhere."""
    if span is not None:
        if not hasattr(span, "get_span_context"):
            return span  # a capture record (takes events after its end too)
        if span.is_recording():
            return span  # an open span (an SDK span stops recording when it ends)
    if state.span.is_recording():
        return state.span
    capture = state._capture
    return capture.root if capture is not None else None


def _request_on_stack(frame: FrameType | None) -> Any:
    """The :class:`RequestState` of the innermost request on the loop thread's stack
    from ``frame`` outward (watchdog thread, the loop thread stopped in a callback):
    ``None`` when no request is, :data:`_OUTSIDE` in a background task run after
    its response."""
    walked = 0
    while frame is not None and walked < _MAX_WALK:
        code = frame.f_code
        if code in _BACKGROUND_FRAMES:
            return _OUTSIDE
        name = _REQUEST_FRAMES.get(code)
        if name is not None:
            # The middleware's frame, read only here (a copy of its locals, made
            # under the GIL while the loop thread waits for it).
            state = getattr(frame.f_locals.get(name), "state", None)
            if isinstance(state, RequestState):
                return state
            # Not started (or passed through): an outer request may be on the stack.
        frame = frame.f_back
        walked += 1
    return None
