"""``fastprof.instrument(app)``: one call that sets fastprof up on an application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

from starlette.applications import Starlette

from fastprof import _internal_errors
from fastprof.capture import SlowRequestCapture
from fastprof.dependencies import DependencySpans
from fastprof.hooks import RequestHooks
from fastprof.loop import LoopMonitor
from fastprof.middleware import FastprofMiddleware, MiddlewareOptions
from fastprof.profiling import Profiling
from fastprof.server_timing import ServerTiming
from fastprof.slow_requests import SlowRequestLog

if TYPE_CHECKING:
    from fastprof.prometheus import PrometheusMetrics

__all__ = ["instrument"]

AppT = TypeVar("AppT", bound=Starlette)

_MARKER = "_fastprof_instrumented"


def _run_during_lifespan(app: Starlette, monitor: LoopMonitor) -> None:
    """Wrap the app's lifespan so ``monitor`` runs from startup to shutdown."""
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(inner: Any) -> AsyncIterator[Any]:
        try:
            monitor.start()
        except Exception as exc:
            _internal_errors.report("loop.start", exc)
        try:
            async with original(inner) as state:
                yield state
        finally:
            try:
                monitor.stop()
            except Exception as exc:  # pragma: no cover - defensive
                _internal_errors.report("loop.stop", exc)

    app.router.lifespan_context = lifespan


def _is_fastapi(app: Starlette) -> bool:
    return any(
        cls.__module__ == "fastapi.applications" and cls.__name__ == "FastAPI"
        for cls in type(app).__mro__
    )


def instrument(
    app: AppT,
    *,
    dependencies: DependencySpans | bool = True,
    profiling: Profiling | None = None,
    loop_monitor: LoopMonitor | None = None,
    slow_requests: SlowRequestLog | None = None,
    metrics: PrometheusMetrics | None = None,
    slow_capture: SlowRequestCapture | None = None,
    server_timing: ServerTiming | None = None,
    **options: Unpack[MiddlewareOptions],
) -> AppT:
    """Instrument a Starlette or FastAPI application in place and return it.

    Adds :class:`~fastprof.FastprofMiddleware` as the outermost user middleware,
    with the components given here as its hooks. Calling it twice on the same
    app is a no-op. Options are validated now: a bad value raises
    ``ValueError`` naming the option.

    Args:
        app: The Starlette or FastAPI application.
        dependencies: Per-dependency spans on FastAPI apps (see
            ``docs/dependencies.md``): ``True`` (the default) for
            :class:`~fastprof.DependencySpans` with its defaults, an instance for
            other options (``mode="marked"``, ``max_spans``), ``False`` for none.
        profiling: On-demand profiles (:class:`~fastprof.Profiling`).
        loop_monitor: Event-loop health (:class:`~fastprof.LoopMonitor`).
        slow_requests: One log line per slow request (:class:`~fastprof.SlowRequestLog`).
        metrics: Prometheus metrics (a :class:`fastprof.prometheus.PrometheusMetrics`):
            every request, and the loop monitor's and profiling's data given here
            too; serve them with ``app.add_route("/metrics", metrics.app())`` (see
            ``docs/deployment.md``).
        slow_capture: The span tree of slow requests head sampling dropped
            (:class:`~fastprof.SlowRequestCapture`).
        server_timing: ``Server-Timing`` headers for the requests you allow
            (:class:`~fastprof.ServerTiming`).
        **options: The middleware's options (:class:`~fastprof.FastprofMiddleware`):
            ``tracer_provider``, ``exclude``, ``request_id_header``,
            ``response_request_id_header``, ``query``, ``redact_query_keys``,
            ``max_attribute_length`` and ``hooks`` (your own
            :class:`~fastprof.RequestHooks`).
    """
    if not isinstance(app, Starlette):
        raise ValueError(
            "instrument() takes a Starlette or FastAPI application; for any other ASGI app "
            "wrap it instead: app = fastprof.FastprofMiddleware(app)"
        )
    if not isinstance(dependencies, (bool, DependencySpans)):
        raise ValueError(
            "dependencies: expected True, False or a fastprof.DependencySpans, "
            f"got {dependencies!r}"
        )
    if profiling is not None and not isinstance(profiling, Profiling):
        raise ValueError(f"profiling: expected a fastprof.Profiling, got {profiling!r}")
    if loop_monitor is not None and not isinstance(loop_monitor, LoopMonitor):
        raise ValueError(f"loop_monitor: expected a fastprof.LoopMonitor, got {loop_monitor!r}")
    if slow_requests is not None and not isinstance(slow_requests, SlowRequestLog):
        raise ValueError(
            f"slow_requests: expected a fastprof.SlowRequestLog, got {slow_requests!r}"
        )
    if metrics is not None:
        from fastprof.prometheus import PrometheusMetrics

        if not isinstance(metrics, PrometheusMetrics):
            raise ValueError(
                f"metrics: expected a fastprof.prometheus.PrometheusMetrics, got {metrics!r}"
            )
    if slow_capture is not None and not isinstance(slow_capture, SlowRequestCapture):
        raise ValueError(
            f"slow_capture: expected a fastprof.SlowRequestCapture, got {slow_capture!r}"
        )
    if server_timing is not None and not isinstance(server_timing, ServerTiming):
        raise ValueError(f"server_timing: expected a fastprof.ServerTiming, got {server_timing!r}")
    if getattr(app, _MARKER, False):
        return app
    if metrics is not None:
        metrics.attach(loop_monitor=loop_monitor, profiling=profiling)
    if (
        server_timing is not None
        and server_timing.allow is None
        and (profiling is None or not profiling.enabled)
    ):
        server_timing = None  # profiled requests only, and nothing is profiled
    user_hooks: tuple[RequestHooks, ...] = tuple(options.get("hooks", ()))
    tracer_provider = options.get("tracer_provider")
    dependency_spans: DependencySpans | None = None
    if (
        dependencies is not False
        and _is_fastapi(app)
        and not any(isinstance(h, DependencySpans) for h in user_hooks)
    ):
        chosen = dependencies if isinstance(dependencies, DependencySpans) else DependencySpans()
        dependency_spans = chosen._configured(
            tracer_provider,
            # The slow-request log explains unsampled requests too.
            timings_when_unsampled=(
                slow_requests is not None and slow_requests.dependencies == "all"
            )
            or metrics is not None,
            profiled_requests=profiling is not None and profiling.enabled,
            on_demand=slow_capture is not None or server_timing is not None,
        )
    if slow_capture is not None:
        slow_capture = slow_capture._configured(tracer_provider)
    # The middleware runs them in their declared order (RequestHooks.order).
    components = (
        profiling,
        slow_capture,
        server_timing,
        dependency_spans,
        loop_monitor,
        slow_requests,
        metrics,
    )
    options["hooks"] = user_hooks + tuple(h for h in components if h is not None)
    if profiling is not None:
        # A profiling token in the query string is a credential.
        options["redact_query_keys"] = (
            *options.get("redact_query_keys", ()),
            profiling.query_param,
        )
    # Validate now, at start-up, rather than when Starlette builds the stack.
    FastprofMiddleware(app, **options)
    app.add_middleware(FastprofMiddleware, **options)
    if loop_monitor is not None:
        # Start the monitor at lifespan startup (else the first request starts it),
        # without an extra middleware layer on every request.
        _run_during_lifespan(app, loop_monitor)
    setattr(app, _MARKER, True)
    return app
