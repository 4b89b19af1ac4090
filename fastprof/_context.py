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

import random
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from fastprof._http import find_header, valid_request_id
from fastprof.hooks import run_in_worker

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from fastprof.hooks import RequestHooks

__all__ = ["MAX_TIMINGS", "SCOPE_KEY", "RequestState", "Timing", "current_request"]

T = TypeVar("T")

SCOPE_KEY = "fastprof.request"
_random_bits = random.getrandbits
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

    # Defaults live on the class, so a request sets only what it knows at start
    # (no __slots__: per-request construction stays a handful of stores).
    _route: str | None = None
    _route_resolver: Callable[[], str | None] | None = None
    _route_final: bool = False
    _id_headers: Any = None
    _id_header_name: bytes | None = None
    status_code: int | None = None
    #: ``time.perf_counter_ns()`` when the response's last message left, when noted
    #: (``0`` until then): :meth:`elapsed_s` stops there.
    end_ns: int = 0
    #: ``True`` for a websocket session (its state lives until the session ends).
    websocket: bool = False
    #: Bounded by :data:`MAX_TIMINGS`; append with :meth:`add_timing`.
    timings: Sequence[Timing] = ()
    timings_dropped: int = 0
    #: Total time sync work of this request waited for a worker thread.
    threadpool_wait_s: float = 0.0
    #: Time this request blocked the event loop (set by the loop monitor).
    blocked_s: float = 0.0
    #: The id of the profile being taken of this request, if any (set at request
    #: start by profiling, before any other component's hook runs).
    profile_id: str | None = None
    #: Name of the dependency/phase currently running on the event loop for
    #: this request (set by dependency instrumentation; read by the loop
    #: watchdog from another thread to attribute a block).
    current_operation: str | None = None

    # fastprof's own per-request records, one slot per component (not API).
    #: The hooks whose ``run_in_worker`` this request's sync code goes through
    #: (set by the middleware; see :func:`fastprof.hooks.run_in_worker`).
    _worker_hooks: tuple[RequestHooks, ...] = ()
    #: The profile capture of this request (profiling).
    _profile: Any = None
    #: The dependency span tree of this request (dependency spans).
    _dependencies: Any = None
    #: Span events the loop monitor put on this request's spans (it caps them).
    _loop_events: int = 0
    #: The request is over for the loop monitor: its response completed, or the
    #: application returned (a block seen afterwards is not charged to it).
    _ended: bool = False
    #: The span (or capture record) of the innermost dependency running on the
    #: loop for this request, set with :attr:`current_operation` (dependency
    #: spans); read by the loop watchdog's thread to put a block's event on it.
    _operation_span: Any = None
    #: Called by dependency spans as a dependency that ran on the loop ends,
    #: before its span ends: ``(state, span)`` (the loop monitor reports a block
    #: in progress in it while the span is open).
    #: The hooks told when a dependency that ran on the loop ends (set by the middleware).
    _operation_hooks: tuple[RequestHooks, ...] = ()
    #: The slow-request capture's records of this unsampled request (slow capture).
    _capture: Any = None
    #: Record timings (no spans) for this request even if unsampled (set at
    #: request start by a component that reads them: capture, Server-Timing).
    _wants_timings: bool = False
    #: This request's response gets a ``Server-Timing`` header (Server-Timing).
    _server_timing: bool = False

    def __init__(
        self,
        span: Span,
        method: str,
        path: str,
        headers: Any = None,
        id_header: bytes | None = None,
        route_resolver: Callable[[], str | None] | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        """``request_id`` is used as given; else, when ``id_header`` (a lower-case
        header name) is given, taken from that header of the ASGI ``headers`` if
        valid, on first use of :attr:`request_id`; else generated. ``route_resolver``
        computes :attr:`route` on demand (fastprof's middleware sets one per request)."""
        self._request_id = request_id
        self.span = span
        self.method = method
        self.path = path
        if id_header is not None:
            self._id_headers = headers
            self._id_header_name = id_header
        if route_resolver is not None:
            self._route_resolver = route_resolver
        self.start_ns = time.perf_counter_ns()

    @property
    def request_id(self) -> str:
        """The request id: a validated incoming one, else 16 random hex characters.

        Read or generated on first use, so requests nobody asks about don't pay for it.
        """
        request_id = self._request_id
        if request_id is None:
            name = self._id_header_name
            if name is not None:
                request_id = valid_request_id(find_header(self._id_headers, name))
                self._id_headers = self._id_header_name = None
            if request_id is None:
                # Not a secret: the same non-cryptographic generator as OTel's span ids.
                request_id = f"{_random_bits(64):016x}"
            self._request_id = request_id
        return request_id

    @property
    def route(self) -> str | None:
        """The route template (``http.route``), or ``None`` when no route matches.

        Resolved on first use, so requests nobody asks about don't pay for it.
        Final (and cached) once the response completed; before that it is the
        route the request matches (what the watchdog or a profile trigger needs).
        """
        resolver = self._route_resolver
        if resolver is None:
            return self._route
        if not self._route_final:
            return resolver()
        self._route_resolver = None
        self._route = resolver()
        return self._route

    @route.setter
    def route(self, value: str | None) -> None:
        self._route_resolver = None
        self._route = value

    def finalize_route(self) -> None:
        """The response completed: the next read of :attr:`route` resolves and caches it."""
        self._route_final = True

    def add_timing(self, timing: Timing) -> None:
        """Record a timing, bounded by :data:`MAX_TIMINGS`."""
        timings = self.timings
        if not isinstance(timings, list):
            timings = self.timings = []
        if len(timings) < MAX_TIMINGS:
            timings.append(timing)
        else:
            self.timings_dropped += 1
        self.threadpool_wait_s += timing.threadpool_wait_s

    def run_in_worker(self, call: Callable[[], T]) -> T:
        """Run ``call`` (sync code of this request, in a worker thread) through the
        hooks' :meth:`~fastprof.RequestHooks.run_in_worker`: an active profile samples it.

        ``await anyio.to_thread.run_sync(state.run_in_worker, crunch)``
        """
        return run_in_worker(self, call)

    @property
    def dependency_spans_dropped(self) -> int:
        """Dependency spans left out of this request by ``DependencySpans(max_spans=...)``
        (while the request runs; 0 without dependency spans)."""
        tracker = self._dependencies
        return int(tracker.spans_dropped) if tracker is not None else 0

    def _release(self) -> None:
        """The request is over: drop what would keep its objects alive.

        uvicorn arms its keep-alive timer from inside the request's last ``send``,
        so the timer holds a copy of the request's context (and through it this
        state) until the connection's next request: without this, the scope, its
        headers and every component's records would outlive the request and be
        promoted by the garbage collector, whose full collections then pause the
        server. A route already final is resolved and kept; the request id stays.
        (A lean request, with no hook, keeps its state as it is: it holds little.)
        """
        resolver = self._route_resolver
        if resolver is not None:
            if self._route_final:
                self._route = resolver()
            self._route_resolver = None
        self._id_headers = None
        self._profile = self._dependencies = None
        self._capture = None

    def elapsed_s(self) -> float:
        """Seconds since the request started (until :attr:`end_ns`, once set)."""
        return ((self.end_ns or time.perf_counter_ns()) - self.start_ns) / 1e9


current_request: ContextVar[RequestState | None] = ContextVar(
    "fastprof_current_request", default=None
)
