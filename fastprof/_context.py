"""Per-request state shared by fastprof's components.

The middleware creates one :class:`RequestState` per HTTP request and publishes
it in the :data:`current_request` ContextVar (set with a token and reset in
``finally``) and in ``scope["fastprof.request"]``. The object is mutable so
that writes made in worker threads (sync dependencies) and in later phases
(yield-dependency teardown) are seen by the request's owner.

Everything stored here is bounded: timings are kept up to
:data:`MAX_TIMINGS` entries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["MAX_TIMINGS", "SCOPE_KEY", "RequestState", "Timing", "current_request"]

SCOPE_KEY = "fastprof.request"
MAX_TIMINGS = 64


class Timing:
    """One timed piece of a request (a dependency, its teardown, a phase)."""

    __slots__ = ("duration_s", "kind", "name", "threadpool_wait_s")

    def __init__(
        self, name: str, kind: str, duration_s: float, threadpool_wait_s: float = 0.0
    ) -> None:
        self.name = name
        self.kind = kind
        self.duration_s = duration_s
        self.threadpool_wait_s = threadpool_wait_s

    def __repr__(self) -> str:
        return f"Timing({self.name!r}, {self.kind!r}, {self.duration_s:.6f})"


class RequestState:
    """What fastprof knows about one in-flight request."""

    __slots__ = (
        "blocked_s",
        "dependency_spans",
        "dependency_spans_dropped",
        "method",
        "path",
        "profile_id",
        "_request_id",
        "route",
        "span",
        "start_ns",
        "status_code",
        "task",
        "threadpool_wait_s",
        "timings",
        "timings_dropped",
        "extra",
        "current_operation",
        "worker_hook",
    )

    def __init__(self, *, request_id: str | None, span: Span, method: str, path: str) -> None:
        self._request_id = request_id
        self.span = span
        self.method = method
        self.path = path
        self.start_ns = time.perf_counter_ns()
        self.route: str | None = None
        self.status_code: int | None = None
        self.dependency_spans = 0
        self.dependency_spans_dropped = 0
        self.timings: list[Timing] = []
        self.timings_dropped = 0
        self.threadpool_wait_s = 0.0
        self.blocked_s = 0.0
        self.profile_id: str | None = None
        self.task: Any = None
        self.extra: dict[str, Any] | None = None
        #: Name of the dependency/phase currently running on the event loop for
        #: this request (set by dependency instrumentation; read by the loop
        #: watchdog from another thread to attribute a block).
        self.current_operation: str | None = None
        #: When set (by an active profile), sync work that fastprof runs in a
        #: worker thread for this request is called as ``worker_hook(fn)``
        #: instead of ``fn()``, so the profile can cover the worker thread.
        self.worker_hook: Callable[[Callable[[], Any]], Any] | None = None

    @property
    def request_id(self) -> str:
        """The request id: a validated incoming one, else 16 random hex characters
        (generated on first use, so requests nobody asks about don't pay for it)."""
        request_id = self._request_id
        if request_id is None:
            request_id = self._request_id = os.urandom(8).hex()
        return request_id

    def add_timing(self, timing: Timing) -> None:
        """Record a timing, bounded by :data:`MAX_TIMINGS`."""
        if len(self.timings) < MAX_TIMINGS:
            self.timings.append(timing)
        else:
            self.timings_dropped += 1
        self.threadpool_wait_s += timing.threadpool_wait_s

    def elapsed_s(self) -> float:
        """Seconds since the request started."""
        return (time.perf_counter_ns() - self.start_ns) / 1e9


current_request: ContextVar[RequestState | None] = ContextVar(
    "fastprof_current_request", default=None
)
