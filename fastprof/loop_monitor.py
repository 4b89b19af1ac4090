"""Event-loop health: which request and which line blocked the loop; loop lag; thread pool.

Usage::

    import fastprof

    fastprof.instrument(app, loop_monitor=fastprof.LoopMonitor(threshold_s=0.1))

:class:`LoopMonitor` is a :class:`~fastprof.middleware.RequestHooks`: the
middleware tells it which asyncio task serves which request. It starts a
:class:`~fastprof._watchdog.LoopWatchdog` (a heartbeat on the loop plus a
daemon thread) in the serving process, lazily: at lifespan startup when
``instrument()`` installed it, else at the first request. It never patches
asyncio, so it behaves the same on asyncio and uvloop.

When the loop is blocked longer than ``threshold_s`` it reports, once per block:

* a span event ``fastprof.loop.blocked`` on the request's span with the
  duration, the blocking frame (``code.file.path``, ``code.line.number``,
  ``code.function.name``), the operation (dependency or endpoint) and a
  bounded stack (``code.stacktrace``);
* ``RequestState.blocked_s`` accumulated (the slow-request log shows it);
* a structlog warning ``event loop blocked`` with route, request id and trace
  id (rate-limited);
* metrics ``fastprof.loop.blocks`` and ``fastprof.loop.blocked.duration``.

A block with no request task on the loop (startup, background tasks, plain
callbacks) is reported with ``in_request=False`` and the task's name.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final

import structlog
from opentelemetry.metrics import MeterProvider
from starlette.types import Scope

from fastprof import _internal_errors
from fastprof._context import RequestState, current_request
from fastprof._frames import is_library
from fastprof._options import check_int, check_seconds
from fastprof._otel import hex_ids
from fastprof._watchdog import Block, Frame, LoopWatchdog, Sample
from fastprof.metrics import LoopMetrics, ThreadpoolSnapshot
from fastprof.middleware import RequestHooks

__all__ = ["BLOCKED_EVENT", "LoopMonitor"]

BLOCKED_EVENT: Final = "fastprof.loop.blocked"
MAX_EVENTS_PER_REQUEST: Final = 16
_MAX_REGISTERED: Final = 100_000
_LIMITER_REFRESH_S: Final = 1.0
_LOG_STACK_FRAMES: Final = 8

logger = structlog.get_logger("fastprof.loop")


def _blocking_frame(stack: tuple[Frame, ...]) -> Frame | None:
    """The innermost application frame (not stdlib, site-packages or fastprof)."""
    for frame in reversed(stack):
        if not is_library(frame[0]):
            return frame
    return stack[-1] if stack else None


def _format_stack(stack: tuple[Frame, ...], limit: int) -> str:
    lines = [f'File "{path}", line {line}, in {func}' for path, line, func in stack]
    text = "\n".join(lines)
    if len(text) > limit:
        text = "...\n" + text[-(limit - 4) :]
    return text


class _Entry:
    """A request registered for its task."""

    __slots__ = ("events", "state")

    def __init__(self, state: RequestState) -> None:
        self.state = state
        self.events = 0

    def route(self) -> str | None:
        return self.state.route


def _span_ids(state: RequestState) -> tuple[str | None, str | None]:
    return hex_ids(state.span.get_span_context()) or (None, None)


class _RateLimit:
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


class LoopMonitor(RequestHooks):
    """Detect event-loop blocking and attribute it; record loop lag and thread-pool use.

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
        self._log_limit = _RateLimit(max_reports_per_minute) if max_reports_per_minute else None
        self._lock = threading.Lock()
        self._watchdog: LoopWatchdog | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[asyncio.Task[Any], _Entry] = {}
        self._limiter: Any = None
        self._limiter_checked = 0.0
        self._last_saturation_log: float | None = None
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
            self._limiter = None
        if watchdog is not None:
            watchdog.stop()
        self._tasks.clear()

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
            self._tasks.clear()
            self._limiter = None
            self._limiter_checked = 0.0
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
            self._refresh_limiter()

    # -- request hooks (loop thread) --------------------------------------------

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._ensure_started(loop)
        task = asyncio.current_task(loop)
        if task is not None:
            if state.task is None:
                state.task = task
            if len(self._tasks) < _MAX_REGISTERED:
                self._tasks[task] = _Entry(state)
        if self._threadpool and time.monotonic() - self._limiter_checked > _LIMITER_REFRESH_S:
            self._refresh_limiter()

    def on_request_end(self, state: RequestState) -> None:
        task = state.task
        entry = self._tasks.get(task) if task is not None else None
        if entry is not None and entry.state is state:
            watchdog = self._watchdog
            block = watchdog.current_block if watchdog is not None else None
            if block is not None and not block.reported and block.samples:
                # The request finishes inside the blocking callback: report now,
                # while its span is still open, with the duration so far.
                owner, _ = _dominant_owner(block.samples)
                if owner is entry:
                    block.reported = True
                    self._report(block, time.perf_counter() - block.due)
            self._tasks.pop(task, None)
        if self._threadpool:
            record = self._metrics.threadpool_wait.record
            for timing in state.timings:
                wait = timing.threadpool_wait_s
                if wait > 0.0:
                    record(wait, {"fastprof.operation.kind": timing.kind})

    # -- watchdog callbacks -------------------------------------------------------

    def _resolve_owner(self, task: asyncio.Task[Any]) -> tuple[Any, str | None]:
        """Watchdog thread: the request entry of ``task`` and its current operation."""
        entry = self._tasks.get(task)
        if entry is None:
            get_context = getattr(task, "get_context", None)  # Python 3.12+
            if get_context is not None:
                # A task the request started (a streaming response's sender, a task
                # group): charge the request's own entry, so that its samples group
                # together, and only while the request is in flight (a background
                # task running after the response keeps the context, not the request).
                state = get_context().get(current_request)
                if state is not None and state.task is not None:
                    owner = self._tasks.get(state.task)
                    if owner is not None and owner.state is state:
                        entry = owner
        if entry is None:
            return None, None
        return entry, entry.state.current_operation

    def _on_beat(self, lag: float, block: Block | None) -> None:
        """Loop thread, every heartbeat."""
        self._metrics.lag.record(lag)
        self.lag_s = lag
        for listener in self._beat_listeners:
            try:
                listener(lag)
            except Exception as exc:
                _internal_errors.report("loop.beat_listener", exc)
        if block is not None and not block.reported:
            block.reported = True
            self._report(block, lag)
        if self._threadpool and self._limiter is not None:
            self._check_saturation()

    def _report(self, block: Block, duration: float) -> None:
        samples = block.samples
        if not samples:  # resumed before the first sample: count it, nothing to attribute
            bare = {"fastprof.loop.in_request": False}
            self._metrics.blocks.add(1, bare)
            self._metrics.blocked_duration.record(duration, bare)
            return
        owner, dominant = _dominant_owner(samples)
        entry: _Entry | None = owner if isinstance(owner, _Entry) else None
        locations = Counter(_blocking_frame(s.stack) for s in dominant)
        location, _ = locations.most_common(1)[0]
        stack = next(s.stack for s in reversed(dominant) if _blocking_frame(s.stack) == location)
        operations = Counter(s.operation for s in dominant if s.operation is not None)
        operation = operations.most_common(1)[0][0] if operations else None
        task_name = dominant[-1].task_name
        route = entry.route() if entry is not None else None

        metric_attrs: dict[str, Any] = {"fastprof.loop.in_request": entry is not None}
        if route is not None:
            metric_attrs["http.route"] = route
        self._metrics.blocks.add(1, metric_attrs)
        self._metrics.blocked_duration.record(duration, metric_attrs)

        stack_text = _format_stack(stack, self.max_stack_chars)
        share = len(dominant) / len(samples)
        trace_id = span_id = None
        if entry is not None:
            state = entry.state
            state.blocked_s += duration
            trace_id, span_id = _span_ids(state)
            span = state.span
            if span.is_recording() and entry.events < MAX_EVENTS_PER_REQUEST:
                entry.events += 1
                attrs: dict[str, Any] = {
                    "fastprof.loop.blocked_s": duration,
                    "fastprof.loop.threshold_s": self.threshold_s,
                    "fastprof.loop.samples": len(samples),
                    "fastprof.loop.sample_share": share,
                    "code.stacktrace": stack_text,
                }
                if location is not None:
                    attrs["code.file.path"] = location[0]
                    attrs["code.line.number"] = location[1]
                    attrs["code.function.name"] = location[2]
                if operation is not None:
                    attrs["fastprof.operation"] = operation
                start_ns = time.time_ns() - int((time.perf_counter() - block.due) * 1e9)
                span.add_event(BLOCKED_EVENT, attrs, timestamp=max(start_ns, 0))

        limit = self._log_limit
        if limit is None or not limit.allow():
            return
        fields: dict[str, Any] = {
            "blocked_s": round(duration, 4),
            "threshold_s": self.threshold_s,
            "in_request": entry is not None,
            "task": task_name,
            "samples": len(samples),
            # The innermost frames; the span event carries the full bounded stack.
            "stack": _format_stack(stack[-_LOG_STACK_FRAMES:], self.max_stack_chars),
        }
        if location is not None:
            fields["location"] = f"{location[0]}:{location[1]}"
            fields["function"] = location[2]
        if operation is not None:
            fields["operation"] = operation
        if entry is not None:
            fields["route"] = route
            fields["method"] = entry.state.method
            fields["request_id"] = entry.state.request_id
            fields["trace_id"] = trace_id
            fields["span_id"] = span_id
        if limit.suppressed:
            fields["suppressed"] = limit.suppressed
            limit.suppressed = 0
        logger.warning("event loop blocked", **fields)

    # -- thread pool -------------------------------------------------------------

    def _refresh_limiter(self) -> None:
        """Loop thread: cache anyio's default thread limiter of this loop."""
        self._limiter_checked = time.monotonic()
        try:
            from anyio.to_thread import current_default_thread_limiter

            self._limiter = current_default_thread_limiter()
        except Exception:
            self._limiter = None

    def threadpool_snapshot(self) -> ThreadpoolSnapshot | None:
        """``(tokens used, tokens total, tasks waiting)`` of anyio's default limiter.

        Safe from any thread (the metric reader's): it reads a limiter object
        cached on the loop thread. ``None`` before the first request.
        """
        limiter = self._limiter
        if limiter is None:
            return None
        stats = limiter.statistics()
        return stats.borrowed_tokens, int(stats.total_tokens), stats.tasks_waiting

    def _check_saturation(self) -> None:
        snapshot = self.threadpool_snapshot()
        if snapshot is None:
            return
        used, total, waiting = snapshot
        if used < total or waiting == 0:
            return
        now = time.monotonic()
        last = self._last_saturation_log
        if last is not None and now - last < self.saturation_log_interval_s:
            return
        self._last_saturation_log = now
        logger.warning(
            "thread pool saturated",
            tokens_used=used,
            tokens_limit=total,
            waiting=waiting,
            hint="sync dependencies/endpoints are queuing for a worker thread",
        )


def _dominant_owner(samples: Iterable[Sample]) -> tuple[Any, list[Sample]]:
    """The owner (request entry or ``None``) seen in most samples, and its samples."""
    by_owner: dict[int, list[Sample]] = {}
    for sample in samples:
        by_owner.setdefault(id(sample.owner), []).append(sample)
    dominant = max(by_owner.values(), key=len)
    return dominant[0].owner, dominant
