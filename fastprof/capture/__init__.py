"""Slow-request capture: the span tree of a slow request that head sampling dropped.

Usage::

    fastprof.instrument(app, slow_capture=fastprof.SlowRequestCapture(threshold_s=0.5))

For each request whose SERVER span is not sampled, fastprof's dependency
instrumentation keeps cheap records (``fastprof._records``) of what its spans
would have held: phases, dependencies, teardowns, thread-pool waits, errors,
blocked-loop events. When the request took at least the threshold (global, or
per route), the records are turned into spans and handed to the tracer
provider's span processors (``_sdk``), with the trace id and span id the
request had and propagated, and ``fastprof.capture = "slow"`` on the SERVER
span. Faster requests drop their records. At most ``max_per_minute`` requests
are exported per process.

See ``docs/slow-capture.md`` for what is and is not recovered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import SpanContext, TracerProvider
from starlette.types import Scope

from fastprof import _internal_errors
from fastprof._context import RequestState
from fastprof._http import SPAN_METHODS, extract_context
from fastprof._options import check_int, check_seconds
from fastprof._records import CaptureBuffer
from fastprof.attributes import CAPTURE, DEPENDENCY_SPANS_DROPPED
from fastprof.capture._sdk import Exporter, exporter_for, sdk_supported
from fastprof.hooks import RequestHooks

__all__ = ["SlowRequestCapture"]

logger = logging.getLogger("fastprof")

#: Spans (records) kept per captured request, the SERVER span not counted.
DEFAULT_MAX_SPANS: Final = 256
_MAX_ROUTES: Final = 10_000


class _Bucket:
    """Token bucket: ``per_minute`` exports, bursts up to that many (any thread)."""

    __slots__ = ("_last", "_lock", "_per_minute", "_tokens", "suppressed")

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._tokens = float(per_minute)
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.suppressed = 0

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(
                float(self._per_minute),
                self._tokens + (now - self._last) * self._per_minute / 60.0,
            )
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            self.suppressed += 1
            return False


class SlowRequestCapture(RequestHooks):
    """Export the span tree of slow requests that head sampling did not record.

    Its hooks run after profiling's and your own, before dependency spans'
    (:attr:`~fastprof.hooks.RequestHooks.order` 50): they record into the
    records it sets up. Sampled requests are not touched.

    Args:
        threshold_s: Export an unsampled request that took at least this long
            (from its start to its response's last message).
        routes: Per-route thresholds, by route template (``{"/search": 2.0}``);
            other routes use ``threshold_s``.
        max_per_minute: Most requests exported per minute by this process
            (bursts up to that number); the rest are dropped and counted.
        max_spans: Most dependency, teardown and phase spans kept per request
            (the SERVER span not counted); more are counted, not kept.
        teardown_wait_s: How long after the response the export waits for
            ``yield``-dependency teardowns and background tasks to finish
            (the app's return); past it, the tree is exported as it is.
        tracer_provider: The SDK ``TracerProvider`` whose span processors get the
            spans; defaults to ``instrument()``'s, else the global one (what
            ``fastprof.exporters.setup_tracing`` installs).
        span_processor: Hand the spans to this span processor instead (for a
            provider fastprof cannot use: see ``docs/slow-capture.md``).
    """

    order = 50

    def __init__(
        self,
        threshold_s: float = 1.0,
        *,
        routes: Mapping[str, float] | None = None,
        max_per_minute: int = 10,
        max_spans: int = DEFAULT_MAX_SPANS,
        teardown_wait_s: float = 5.0,
        tracer_provider: TracerProvider | None = None,
        span_processor: Any = None,
    ) -> None:
        self.threshold_s = check_seconds("threshold_s", threshold_s, 0.0, 86_400.0)
        if routes is None:
            routes = {}
        if not isinstance(routes, Mapping) or len(routes) > _MAX_ROUTES:
            raise ValueError("routes: expected a mapping of route template to seconds")
        self.routes: dict[str, float] = {}
        for route, seconds in routes.items():
            if not isinstance(route, str) or not route.startswith("/"):
                raise ValueError(f"routes: {route!r} is not a route template starting with '/'")
            self.routes[route] = check_seconds(f"routes[{route!r}]", seconds, 0.0, 86_400.0)
        #: No request faster than this is exported (the route is resolved only past it).
        self._min_threshold = min([self.threshold_s, *self.routes.values()])
        self.max_per_minute = check_int("max_per_minute", max_per_minute, 1, 100_000)
        self.max_spans = check_int("max_spans", max_spans, 0, 10_000)
        self.teardown_wait_s = check_seconds("teardown_wait_s", teardown_wait_s, 0.0, 3600.0)
        if tracer_provider is not None and not hasattr(tracer_provider, "get_tracer"):
            raise ValueError(
                "tracer_provider: expected an opentelemetry TracerProvider, "
                f"got {type(tracer_provider).__name__}"
            )
        if span_processor is not None and not callable(getattr(span_processor, "on_end", None)):
            raise ValueError("span_processor: expected an OpenTelemetry SDK SpanProcessor")
        self.tracer_provider = tracer_provider
        self.span_processor = span_processor
        self._limit = _Bucket(self.max_per_minute)
        self._exporter: Exporter | None = None
        self._resolved = False
        #: Requests exported, and dropped by the rate limit.
        self.exported = 0
        self.enabled = sdk_supported()
        if not self.enabled:
            logger.warning(
                "fastprof: slow-request capture is disabled: the installed OpenTelemetry SDK "
                "is not one it supports (see docs/slow-capture.md)"
            )

    @property
    def suppressed(self) -> int:
        """Slow requests not exported because of ``max_per_minute``."""
        return self._limit.suppressed

    def _configured(self, tracer_provider: TracerProvider | None) -> SlowRequestCapture:
        """This component as ``instrument()`` runs it (its own provider wins)."""
        if self.tracer_provider is None and tracer_provider is not None:
            self.tracer_provider = tracer_provider
        return self

    def _resolve(self) -> Exporter | None:
        """The exporter, decided at the first request (the global provider may be
        installed after ``instrument()``)."""
        if not self._resolved:
            self._resolved = True
            provider = self.tracer_provider or trace.get_tracer_provider()
            self._exporter = exporter_for(provider, self.span_processor)
            if self._exporter is None:
                self.enabled = False
                logger.warning(
                    "fastprof: slow-request capture is disabled: %s is not an OpenTelemetry "
                    "SDK TracerProvider; pass SlowRequestCapture(span_processor=...) "
                    "(see docs/slow-capture.md)",
                    type(provider).__name__,
                )
        return self._exporter

    def threshold_for(self, route: str | None) -> float:
        """The threshold of ``route`` (its own, else the global one)."""
        if route is not None and self.routes:
            return self.routes.get(route, self.threshold_s)
        return self.threshold_s

    # -- request hooks ---------------------------------------------------------------

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        span = state.span
        if span.is_recording() or not self.enabled:
            return  # sampled: exported the usual way
        if self._exporter is None and self._resolve() is None:
            return
        if not span.get_span_context().is_valid:
            return
        name = SPAN_METHODS.get(state.method, "HTTP")
        buffer = CaptureBuffer(name, state.start_ns, self.max_spans)
        buffer.headers = scope.get("headers")
        state._capture = buffer
        state._wants_timings = True

    def on_response_complete(self, state: RequestState) -> None:
        buffer: CaptureBuffer | None = state._capture
        if buffer is None:
            return
        elapsed = state.elapsed_s()
        if (
            elapsed >= self._min_threshold
            and elapsed >= self.threshold_for(state.route if self.routes else None)
            and self._limit.allow()
        ):
            buffer.wanted = True  # the middleware now annotates its root like a span
        else:
            state._capture = None  # fast: its records go with the request

    def on_request_end(self, state: RequestState) -> None:
        buffer: CaptureBuffer | None = state._capture
        if buffer is None or not buffer.wanted:
            return
        buffer.root.end(time.perf_counter_ns() + buffer.epoch_offset)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - not on a loop
            return
        # Teardowns and background tasks run before the app returns: wait for it
        # (on_app_exit), at most teardown_wait_s.
        buffer.handle = loop.call_later(self.teardown_wait_s, self._export, state)

    def on_app_exit(self, state: RequestState) -> None:
        buffer: CaptureBuffer | None = state._capture
        if buffer is not None and buffer.wanted:
            self._export(state)

    def _export(self, state: RequestState) -> None:
        buffer: CaptureBuffer | None = state._capture
        if buffer is None:
            return
        state._capture = None
        handle = buffer.handle
        if handle is not None:
            buffer.handle = None
            handle.cancel()
        exporter = self._exporter
        if exporter is None:
            return
        try:
            server = state.span.get_span_context()
            root_attributes: dict[str, Any] = {CAPTURE: "slow"}
            if buffer.dropped:
                root_attributes[DEPENDENCY_SPANS_DROPPED] = buffer.dropped
            exporter.export(server, _remote_parent(buffer.headers, server), buffer, root_attributes)
            self.exported += 1
        except Exception as exc:
            _internal_errors.report("capture.export", exc)


def _remote_parent(headers: Any, server: SpanContext) -> SpanContext | None:
    """The propagated parent of the request, when it is in the same trace."""
    if not headers:
        return None
    parent = trace.get_current_span(extract_context(headers)).get_span_context()
    if parent.is_valid and parent.trace_id == server.trace_id:
        return parent
    return None
