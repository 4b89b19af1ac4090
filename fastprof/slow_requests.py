"""One structured log line per slow request, explaining where the time went.

Usage::

    fastprof.instrument(app, slow_requests=fastprof.SlowRequestLog(threshold_s=1.0))

A request that took ``threshold_s`` or longer produces one structlog event
``slow request`` (level ``warning`` by default) with:

``route``, ``method``, ``status``, ``duration_s``, ``request_id``, ``trace_id``,
``span_id``
    what the request was;
``dependencies``
    the slowest timed pieces (dependencies, teardowns, phases), slowest first,
    at most ``top`` of them, each ``{"name", "kind", "duration_s"}`` plus
    ``threadpool_wait_s`` when it waited for a worker thread;
``endpoint_s``, ``serialization_s``
    time in the endpoint function and in response serialization, when timed;
``threadpool_wait_s``
    total time sync work of this request waited for a worker thread;
``loop_blocked_s``
    time the event loop was blocked by this request (needs a
    :class:`~fastprof.LoopMonitor`, whose hooks run before this one's);
``profile_id``
    the id of the profile taken for this request, if any.

The timings come from ``RequestState.timings`` (filled by dependency
instrumentation); without them the line still has the totals.

``dependencies`` says which requests have timings. ``"traced"`` (the
default): the requests traced anyway (sampled, profiled, or recorded by the
slow-request capture) are; another slow request gets the totals (route,
status, duration, ids, loop time). That costs one ``send`` wrapper per
unsampled request, which keeps the middleware's lean path: this hook is called
only for a request that took ``threshold_s`` or longer. ``"all"``: the
dependencies of every request are timed, sampled or not, so any slow request
gets the breakdown; that makes every unsampled request run the dependency
hooks (see docs/performance.md for both prices).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import structlog

from fastprof._context import RequestState, Timing
from fastprof._options import check_int, check_seconds
from fastprof._otel import hex_ids
from fastprof.hooks import RequestHooks

__all__ = ["SlowRequestLog"]

ENDPOINT_KINDS: Final = frozenset({"endpoint"})
SERIALIZATION_KINDS: Final = frozenset({"serialization"})

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
Coverage = Literal["all", "traced"]

logger = structlog.get_logger("fastprof.slow_requests")


def _r(seconds: float) -> float:
    return round(seconds, 6)


class SlowRequestLog(RequestHooks):
    """Log one line for each request slower than ``threshold_s``.

    Its hooks run last (:attr:`~fastprof.hooks.RequestHooks.order` 300), after
    every other component has recorded what it knows of the request.

    Args:
        threshold_s: Requests taking at least this long are logged (default 1 s).
        top: How many of the slowest timings to list.
        level: structlog level of the line.
        event: The event (message) of the line.
        dependencies: Which requests get the per-dependency breakdown: ``"traced"``
            (the default: only requests traced anyway; the others get the totals)
            or ``"all"`` (every request's dependencies are timed, sampled or not).
    """

    order = 300

    def __init__(
        self,
        threshold_s: float = 1.0,
        *,
        top: int = 5,
        level: LogLevel = "warning",
        event: str = "slow request",
        dependencies: Coverage = "traced",
    ) -> None:
        threshold_s = check_seconds("threshold_s", threshold_s, 0, 86_400)
        check_int("top", top, 0, 64)
        if level not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"level: expected a structlog level name, got {level!r}")
        if not isinstance(event, str) or not event:
            raise ValueError("event: expected a non-empty string")
        if dependencies not in ("all", "traced"):
            raise ValueError(f"dependencies: expected 'all' or 'traced', got {dependencies!r}")
        self.threshold_s = float(threshold_s)
        self.top = top
        self.level: LogLevel = level
        self.event = event
        self.dependencies: Coverage = dependencies
        if dependencies == "traced":
            # An unsampled request stays lean: fastprof notes its status and end
            # and calls on_request_end only if it took threshold_s or longer.
            self.unsampled_end_threshold_s = self.threshold_s

    def on_request_end(self, state: RequestState) -> None:
        if state.websocket:
            return  # a session's length says nothing about slowness
        duration = state.elapsed_s()
        if duration < self.threshold_s:
            return
        getattr(logger, self.level)(self.event, **self.breakdown(state, duration))

    def breakdown(self, state: RequestState, duration: float) -> dict[str, Any]:
        """The fields of the log line for ``state`` (also useful in tests and hooks)."""
        endpoint = serialization = 0.0
        has_endpoint = has_serialization = False
        others: list[Timing] = []
        for timing in state.timings:
            if timing.kind in ENDPOINT_KINDS:
                endpoint += timing.duration_s
                has_endpoint = True
            elif timing.kind in SERIALIZATION_KINDS:
                serialization += timing.duration_s
                has_serialization = True
            else:
                others.append(timing)
        others.sort(key=lambda t: t.duration_s, reverse=True)
        dependencies = []
        for timing in others[: self.top]:
            item: dict[str, Any] = {
                "name": timing.name,
                "kind": timing.kind,
                "duration_s": _r(timing.duration_s),
            }
            if timing.threadpool_wait_s > 0.0:
                item["threadpool_wait_s"] = _r(timing.threadpool_wait_s)
            dependencies.append(item)
        trace_id, span_id = hex_ids(state.span.get_span_context()) or (None, None)
        fields: dict[str, Any] = {
            "route": state.route,
            "path": state.path if state.route is None else None,
            "method": state.method,
            "status": state.status_code,
            "duration_s": _r(duration),
            "request_id": state.request_id,
            "trace_id": trace_id,
            "span_id": span_id,
            "dependencies": dependencies,
            "endpoint_s": _r(endpoint) if has_endpoint else None,
            "serialization_s": _r(serialization) if has_serialization else None,
            "threadpool_wait_s": _r(state.threadpool_wait_s),
            "loop_blocked_s": _r(state.blocked_s),
            "profile_id": state.profile_id,
        }
        if state.timings_dropped:
            fields["timings_dropped"] = state.timings_dropped
        if fields["path"] is None:
            del fields["path"]
        return fields
