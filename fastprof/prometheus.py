"""Prometheus metrics for fastprof: an optional ``/metrics`` endpoint.

Requires the ``prometheus`` extra (``pip install 'fastprof-asgi[prometheus]'``,
which installs ``prometheus_client``). Usage::

    metrics = fastprof.prometheus.PrometheusMetrics()
    fastprof.instrument(app, metrics=metrics, loop_monitor=..., profiling=...,
                        exclude=["/metrics"])
    app.add_route("/metrics", metrics.app(), include_in_schema=False)

:class:`PrometheusMetrics` is a :class:`~fastprof.RequestHooks`: it reads each
request's :class:`~fastprof.RequestState` at its end (route template, status,
dependency timings, thread-pool waits, event-loop time blocked) and needs no
middleware of its own. The event-loop lag and thread-pool gauges come from the
:class:`~fastprof.LoopMonitor`'s heartbeat; profile and internal-error counts
from :meth:`fastprof.Profiling.stats` and fastprof's error counter, copied at
most once per ``sync_interval_s``.

Several worker processes: ``prometheus_client``'s multi-process mode is used when
``PROMETHEUS_MULTIPROC_DIR`` is set in the environment *before*
``prometheus_client`` is first imported (set it for the server, not in the app).
Every worker then writes its values to files in that directory and the endpoint,
whichever worker serves it, answers for all of them (see ``docs/deployment.md``).

Label values are bounded: routes are templates (``"_unmatched"`` when no route
matched), methods outside the standard set are ``"_OTHER"``, and past
``max_routes`` routes or ``max_dependencies`` dependencies new values are
``"_other"``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from starlette.types import Receive, Scope, Send

from fastprof import RequestHooks, RequestState, _internal_errors
from fastprof._http import KNOWN_METHODS, find_header
from fastprof._options import check_int, check_seconds
from fastprof.metrics import DURATION_BUCKETS_S

if TYPE_CHECKING:
    from fastprof import LoopMonitor, Profiling

__all__ = ["OTHER", "UNMATCHED", "PrometheusMetrics"]

#: Label value for a route or dependency past the cardinality cap.
OTHER: Final = "_other"
#: Route label of a request that matched no route (404s, ...).
UNMATCHED: Final = "_unmatched"
_MAX_LABEL_CHARS: Final = 200
_MAX_CACHED: Final = 4096


def _multiprocess_dir() -> str | None:
    """The directory of ``prometheus_client``'s multi-process mode, if it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Bounded:
    """Label values: the first ``limit`` distinct ones as they are, the rest ``OTHER``."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        value = value[:_MAX_LABEL_CHARS]
        self._seen.add(value)
        return value


class PrometheusMetrics(RequestHooks):
    """Request, dependency, event-loop, thread-pool and profiling metrics for Prometheus.

    Metrics (``namespace`` defaults to ``fastprof``; durations in seconds):

    ==============================================  =========  ==================================
    name                                            type       labels
    ==============================================  =========  ==================================
    ``fastprof_http_request_duration_seconds``      histogram  ``method``, ``route``, ``status``
    ``fastprof_dependency_duration_seconds``        histogram  ``dependency``, ``kind``
    ``fastprof_threadpool_wait_seconds``            histogram  ``kind``
    ``fastprof_loop_blocked_seconds_total``         counter    ``route``
    ``fastprof_loop_lag_seconds``                   histogram
    ``fastprof_threadpool_tokens_used``             gauge
    ``fastprof_threadpool_tokens_limit``            gauge
    ``fastprof_threadpool_waiting``                 gauge
    ``fastprof_profiles_total``                     counter    ``outcome``
    ``fastprof_profiles_refused_total``             counter    ``reason``
    ``fastprof_spans_dropped_total``                counter    ``what``
    ``fastprof_internal_errors_total``              counter    ``phase``
    ==============================================  =========  ==================================

    ``kind`` of a timing: ``dependency``, ``teardown`` (code after ``yield``),
    ``endpoint``, ``serialization``. ``status`` is the response status code, or
    ``none`` when no response was started (an unhandled exception, which
    Starlette then answers with a 500, or a client that left).

    Args:
        loop_monitor: Record its heartbeat lag and thread-pool gauges
            (``instrument(metrics=..., loop_monitor=...)`` attaches it for you).
        profiling: Count its profiles (attached by ``instrument`` the same way).
        registry: The ``prometheus_client`` registry the metrics are registered
            in and that :meth:`app` serves (default: a registry of their own; pass
            ``prometheus_client.REGISTRY`` to serve them with your own metrics).
            Ignored by :meth:`app` in multi-process mode, which serves every metric
            written to the multi-process directory.
        namespace: Prefix of the metric names.
        buckets: Histogram bucket bounds in seconds.
        max_routes: Distinct ``route`` label values; beyond, ``"_other"``.
        max_dependencies: Distinct ``dependency`` label values; beyond, ``"_other"``.
        sync_interval_s: How often the profile and internal-error counters are copied.
        auth: ``auth(scope) -> bool`` for the endpoint (e.g.
            ``fastprof.profiling.bearer_auth(token)``); ``None`` (the default)
            serves anyone who can reach it, as Prometheus scrapers expect: expose
            it on an internal port or path only.
    """

    #: Every request is counted, sampled (traced) or not.
    unsampled_requests = True

    order = 400  # after every other component: it reads what they recorded

    def __init__(
        self,
        *,
        loop_monitor: LoopMonitor | None = None,
        profiling: Profiling | None = None,
        registry: Any = None,
        namespace: str = "fastprof",
        buckets: tuple[float, ...] = DURATION_BUCKETS_S,
        max_routes: int = 256,
        max_dependencies: int = 512,
        sync_interval_s: float = 1.0,
        auth: Callable[[Scope], bool] | None = None,
    ) -> None:
        try:
            import prometheus_client
        except ImportError as exc:
            raise ImportError(
                "fastprof.prometheus needs the prometheus extra: "
                "pip install 'fastprof-asgi[prometheus]'"
            ) from exc
        if not isinstance(namespace, str) or not namespace.isidentifier():
            raise ValueError(f"namespace: expected a metric name prefix, got {namespace!r}")
        bounds = tuple(buckets)
        if not bounds or any(
            isinstance(b, bool) or not isinstance(b, int | float) or not b > 0 for b in bounds
        ) or list(bounds) != sorted(set(bounds)):
            raise ValueError("buckets: expected increasing positive numbers of seconds")
        check_int("max_routes", max_routes, 1, 100_000)
        check_int("max_dependencies", max_dependencies, 1, 100_000)
        self._sync_interval_s = check_seconds("sync_interval_s", sync_interval_s, 0.0, 3600.0)
        if auth is not None and not callable(auth):
            raise ValueError("auth: expected a callable taking the ASGI scope")
        self._auth = auth
        self.multiprocess = _multiprocess_dir() is not None
        if registry is None:
            registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.registry = registry
        self._routes = _Bounded(max_routes)
        self._dependencies = _Bounded(max_dependencies)
        self._phases = _Bounded(256)
        self._refusals = _Bounded(64)
        self._outcomes = _Bounded(16)

        def name(text: str) -> str:
            return f"{namespace}_{text}"

        p = prometheus_client
        r = registry
        self._request_duration = p.Histogram(
            name("http_request_duration_seconds"),
            "Duration of HTTP requests, to the last response byte, by route template.",
            ["method", "route", "status"],
            registry=r,
            buckets=bounds,
        )
        self._dependency_duration = p.Histogram(
            name("dependency_duration_seconds"),
            "Duration of FastAPI dependencies (and endpoint, serialization), by dependency.",
            ["dependency", "kind"],
            registry=r,
            buckets=bounds,
        )
        self._threadpool_wait = p.Histogram(
            name("threadpool_wait_seconds"),
            "Time a sync dependency or endpoint waited for a worker thread.",
            ["kind"],
            registry=r,
            buckets=bounds,
        )
        self._blocked = p.Counter(
            name("loop_blocked_seconds"),
            "Time requests spent with the event loop blocked longer than the threshold.",
            ["route"],
            registry=r,
        )
        self._lag = p.Histogram(
            name("loop_lag_seconds"),
            "Event-loop scheduling lag, sampled at every LoopMonitor heartbeat.",
            registry=r,
            buckets=bounds,
        )
        # Summed over live worker processes in multi-process mode.
        self._tokens_used = p.Gauge(
            name("threadpool_tokens_used"),
            "Tokens of anyio's default thread limiter in use (busy worker threads).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._tokens_limit = p.Gauge(
            name("threadpool_tokens_limit"),
            "Total tokens of anyio's default thread limiter.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._waiting = p.Gauge(
            name("threadpool_waiting"),
            "Tasks waiting for a worker thread.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._profiles = p.Counter(
            name("profiles"),
            "On-demand profiles: started, stored, store_failed, writer_dropped.",
            ["outcome"],
            registry=r,
        )
        self._refused = p.Counter(
            name("profiles_refused"),
            "Profile triggers not honoured, by reason (token checks, budget).",
            ["reason"],
            registry=r,
        )
        self._dropped = p.Counter(
            name("spans_dropped"),
            "Dependency spans over the per-request cap, and timings over their cap.",
            ["what"],
            registry=r,
        )
        self._errors = p.Counter(
            name("internal_errors"),
            "fastprof's own failures, contained (the request was unaffected), by phase.",
            ["phase"],
            registry=r,
        )
        # Label children by raw key (``labels()`` costs microseconds); bounded like the labels.
        self._children: dict[tuple[str, str, str], Any] = {}
        self._timing_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._loop_monitor: LoopMonitor | None = None
        self._profiling: Profiling | None = None
        self._sync_lock = threading.Lock()
        self._synced_at = 0.0
        self._last_profile_stats: dict[str, int] = {}
        self._last_errors: dict[str, int] = {}
        self.attach(loop_monitor=loop_monitor, profiling=profiling)

    def attach(
        self, *, loop_monitor: LoopMonitor | None = None, profiling: Profiling | None = None
    ) -> None:
        """Also record this loop monitor's and this profiling's data (once each)."""
        if loop_monitor is not None and self._loop_monitor is None:
            self._loop_monitor = loop_monitor
            loop_monitor.add_beat_listener(self._on_beat)
        if profiling is not None and self._profiling is None:
            self._profiling = profiling

    # -- per request (hooks) ---------------------------------------------------

    def on_request_end(self, state: RequestState) -> None:
        route = state.route
        route_label = self._routes(route) if route is not None else UNMATCHED
        method = state.method if state.method in KNOWN_METHODS else "_OTHER"
        status = state.status_code
        key = (method, route_label, str(status) if status is not None else "none")
        child = self._children.get(key)
        if child is None:
            child = self._request_duration.labels(*key)
            if len(self._children) < _MAX_CACHED:
                self._children[key] = child
        child.observe(state.elapsed_s())
        if state.blocked_s > 0.0:
            self._blocked.labels(route_label).inc(state.blocked_s)
        self._maybe_sync()

    def on_app_exit(self, state: RequestState) -> None:
        # After yield-dependency teardown (FastAPI >= 0.118 runs it after the response).
        children = self._timing_children
        for timing in state.timings:
            key = (timing.name, timing.kind)
            pair = children.get(key)
            if pair is None:
                kind = self._phases(timing.kind)
                pair = (
                    self._dependency_duration.labels(self._dependencies(timing.name), kind),
                    self._threadpool_wait.labels(kind),
                )
                if len(children) < _MAX_CACHED:
                    children[key] = pair
            pair[0].observe(timing.duration_s)
            if timing.threadpool_wait_s > 0.0:
                pair[1].observe(timing.threadpool_wait_s)
        if state.dependency_spans_dropped:
            self._dropped.labels("dependency_span").inc(state.dependency_spans_dropped)
        if state.timings_dropped:
            self._dropped.labels("timing").inc(state.timings_dropped)

    # -- loop heartbeat (loop thread) --------------------------------------------

    def _on_beat(self, lag: float) -> None:
        self._lag.observe(lag)
        monitor = self._loop_monitor
        snapshot = monitor.threadpool_snapshot() if monitor is not None else None
        if snapshot is not None:
            used, total, waiting = snapshot
            self._tokens_used.set(used)
            self._tokens_limit.set(total)
            self._waiting.set(waiting)
        self._maybe_sync()

    # -- counters kept elsewhere ----------------------------------------------------

    def _maybe_sync(self) -> None:
        if time.monotonic() - self._synced_at >= self._sync_interval_s:
            self.sync()

    def sync(self) -> None:
        """Copy the profile and internal-error counts into the Prometheus counters now."""
        with self._sync_lock:
            self._synced_at = time.monotonic()
            profiling = self._profiling
            if profiling is not None:
                stats = profiling.stats()
                for key, value in stats.items():
                    delta = _delta(self._last_profile_stats, key, value)
                    if not delta or key == "active":
                        continue
                    if key.startswith(("refused.", "skipped.")):
                        self._refused.labels(self._refusals(key.partition(".")[2])).inc(delta)
                    else:
                        self._profiles.labels(self._outcomes(key)).inc(delta)
            for phase, count in _internal_errors.counts().items():
                delta = _delta(self._last_errors, phase, count)
                if delta:
                    self._errors.labels(self._phases(phase)).inc(delta)

    # -- the endpoint ---------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text and its content type (not on the event loop: it may read files)."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        self.sync()
        registry = self.registry
        directory = _multiprocess_dir()
        if directory is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    def app(self) -> Callable[[Scope, Receive, Send], Any]:
        """An ASGI app serving the metrics (``GET``/``HEAD``), for ``app.add_route``.

        The exposition is built in a thread of the loop's default executor, never
        on the event loop, and never in anyio's thread pool (a saturated pool must
        not hide its own metrics).
        """

        async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            status = 200
            headers: list[tuple[bytes, bytes]] = []
            body = b""
            if self._auth is not None and not self._auth(scope):
                status, body = 401, b"unauthorized\n"
            elif scope.get("method") not in ("GET", "HEAD"):
                status, body = 405, b"method not allowed\n"
                headers.append((b"allow", b"GET, HEAD"))
            else:
                accept = find_header(scope.get("headers") or (), b"accept")
                try:
                    body, content_type = await asyncio.get_running_loop().run_in_executor(
                        None, self.render, accept.decode("latin-1") if accept else None
                    )
                except Exception as exc:
                    _internal_errors.report("prometheus.render", exc)
                    status, body = 500, b"metrics unavailable\n"
                else:
                    headers.append((b"content-type", content_type.encode("latin-1")))
            if status != 200:
                headers.append((b"content-type", b"text/plain; charset=utf-8"))
            headers.append((b"content-length", str(len(body)).encode("ascii")))
            headers.append((b"cache-control", b"no-store"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send(
                {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
            )

        return _AsgiApp(metrics_app)


def _delta(last: dict[str, int], key: str, value: int) -> int:
    """How much ``value`` grew since last seen (all of it after a reset)."""
    previous = last.get(key, 0)
    last[key] = value
    return value - previous if value >= previous else value


class _AsgiApp:
    """An ASGI callable that routers mount as an app (a plain function would be
    taken for a request handler by ``Route``)."""

    __slots__ = ("_call",)

    def __init__(self, call: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._call(scope, receive, send)
