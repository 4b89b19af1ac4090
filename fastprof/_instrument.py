"""``fastprof.instrument(app)``: one call that sets fastprof up on an application."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette

from fastprof._http import QueryPolicy
from fastprof.loop_monitor import LoopMonitor, LoopMonitorLifespan
from fastprof.middleware import ExcludeOption, FastprofMiddleware, RequestHooks
from fastprof.profiling import Profiling
from fastprof.slow_requests import SlowRequestLog

__all__ = ["instrument"]

AppT = TypeVar("AppT", bound=Starlette)

_MARKER = "_fastprof_instrumented"


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
    profiling: Profiling | None = None,
    loop_monitor: LoopMonitor | None = None,
    slow_requests: SlowRequestLog | None = None,
) -> AppT:
    """Instrument a Starlette or FastAPI application in place and return it.

    Adds :class:`~fastprof.middleware.FastprofMiddleware` as the outermost user
    middleware. Calling it twice on the same app is a no-op. Options are
    validated now: a bad value raises ``ValueError`` naming the option.
    """
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
    # Order matters at request end: the profiler sets the profile id and the loop
    # monitor the blocked time before the slow-request log reads them.
    extra_hooks = tuple(h for h in (profiling, loop_monitor, slow_requests) if h is not None)
    options = {
        "tracer_provider": tracer_provider,
        "exclude": exclude,
        "request_id_header": request_id_header,
        "response_request_id_header": response_request_id_header,
        "query": query,
        "max_attribute_length": max_attribute_length,
        "hooks": tuple(hooks) + extra_hooks,
    }
    # Validate now, at start-up, rather than when Starlette builds the stack.
    FastprofMiddleware(app, **options)  # type: ignore[arg-type]
    app.add_middleware(FastprofMiddleware, **options)  # type: ignore[arg-type]
    if loop_monitor is not None:
        # Starts the monitor at lifespan startup (else the first request starts it).
        app.add_middleware(LoopMonitorLifespan, monitor=loop_monitor)
    setattr(app, _MARKER, True)
    return app
