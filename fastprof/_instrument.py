"""``fastprof.instrument(app)``: one call that sets fastprof up on an application."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette

from fastprof import _internal_errors
from fastprof._http import QueryPolicy
from fastprof._options import check_int
from fastprof.loop_monitor import LoopMonitor
from fastprof.middleware import ExcludeOption, FastprofMiddleware, RequestHooks
from fastprof.profiling import Profiling
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
    tracer_provider: TracerProvider | None = None,
    exclude: ExcludeOption = None,
    request_id_header: str | None = "x-request-id",
    response_request_id_header: str | None = None,
    query: QueryPolicy = "redact_sensitive",
    max_attribute_length: int = 2048,
    hooks: Iterable[RequestHooks] = (),
    dependencies: Literal["all", "marked", "off"] = "all",
    max_dependency_spans: int = 256,
    profiling: Profiling | None = None,
    loop_monitor: LoopMonitor | None = None,
    slow_requests: SlowRequestLog | None = None,
    metrics: PrometheusMetrics | None = None,
) -> AppT:
    """Instrument a Starlette or FastAPI application in place and return it.

    Adds :class:`~fastprof.middleware.FastprofMiddleware` as the outermost user
    middleware. Calling it twice on the same app is a no-op. Options are
    validated now: a bad value raises ``ValueError`` naming the option.

    ``dependencies`` selects per-dependency spans on FastAPI apps (see
    ``docs/dependencies.md``): ``"all"`` (every ``Depends``/``Security``),
    ``"marked"`` (only those declared with :func:`fastprof.Depends` /
    :func:`fastprof.Security`) or ``"off"``; ``max_dependency_spans`` caps them
    per request (0-10000).

    ``metrics`` (a :class:`fastprof.prometheus.PrometheusMetrics`) counts every
    request, and the loop monitor's and profiling's data given here too; serve it
    with ``app.add_route("/metrics", metrics.app())`` (see ``docs/deployment.md``).
    """
    if dependencies not in ("all", "marked", "off"):
        raise ValueError(f"dependencies: expected 'all', 'marked' or 'off', got {dependencies!r}")
    check_int("max_dependency_spans", max_dependency_spans, 0, 10_000)
    if not isinstance(app, Starlette):
        raise ValueError(
            "instrument() takes a Starlette or FastAPI application; for any other ASGI app "
            "wrap it instead: app = fastprof.FastprofMiddleware(app)"
        )
    if getattr(app, _MARKER, False):
        return app
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
        metrics.attach(loop_monitor=loop_monitor, profiling=profiling)
    from fastprof._dependencies import DependencySpans

    user_hooks = tuple(hooks)
    dependency_spans: DependencySpans | None = None
    if (
        dependencies != "off"
        and _is_fastapi(app)
        and not any(isinstance(h, DependencySpans) for h in user_hooks)
    ):
        dependency_spans = DependencySpans(
            tracer_provider=tracer_provider,
            max_spans=max_dependency_spans,
            mode=dependencies,
            # The slow-request log explains unsampled requests too.
            timings_when_unsampled=slow_requests is not None or metrics is not None,
            profiled_requests=profiling is not None and profiling.enabled,
        )
    # Order matters. At request start, profiling decides first (before your hooks
    # too), so dependency spans, yours included, know whether an unsampled request
    # is profiled. At request end, dependency timings, the profile id and the
    # loop-blocked time are all set before the slow-request log reads them.
    first_hooks = (profiling,) if profiling is not None else ()
    extra_hooks = tuple(
        h for h in (dependency_spans, loop_monitor, slow_requests, metrics) if h is not None
    )
    options = {
        "tracer_provider": tracer_provider,
        "exclude": exclude,
        "request_id_header": request_id_header,
        "response_request_id_header": response_request_id_header,
        "query": query,
        # A profiling token in the query string is a credential.
        "redact_query_keys": (profiling.query_param,) if profiling is not None else (),
        "max_attribute_length": max_attribute_length,
        "hooks": first_hooks + user_hooks + extra_hooks,
    }
    # Validate now, at start-up, rather than when Starlette builds the stack.
    FastprofMiddleware(app, **options)  # type: ignore[arg-type]
    app.add_middleware(FastprofMiddleware, **options)  # type: ignore[arg-type]
    if loop_monitor is not None:
        # Start the monitor at lifespan startup (else the first request starts it),
        # without an extra middleware layer on every request.
        _run_during_lifespan(app, loop_monitor)
    setattr(app, _MARKER, True)
    return app
