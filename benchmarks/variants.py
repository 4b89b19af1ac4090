"""The benchmark variants: one entry in :data:`VARIANTS` per configuration measured.

To add a variant, write a setup function taking a :class:`SetupContext` and returning the ASGI
application to drive, and register it with :func:`variant`. Setup runs in the variant's own
worker process, before warm-up, so import costs and one-off construction are not measured.

A variant that needs something the installed versions lack declares a ``requires`` check
returning the reason to skip (or ``None``); a setup function may also raise :class:`Skip`.
fastprof options are passed only when ``fastprof.instrument`` has them
(:func:`instrument_options`), so the harness keeps working as the API grows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from benchmarks.app import create_app

__all__ = [
    "VARIANTS",
    "SetupContext",
    "Skip",
    "Variant",
    "instrument_options",
    "variant",
]


class Skip(Exception):
    """Raised by a setup function when the variant cannot run here; the message says why."""


@dataclass
class SetupContext:
    """What a setup function gets: the span processing shared by every sampled variant."""

    processor: str = "simple"
    """``"simple"`` (SimpleSpanProcessor) or ``"batch"`` (BatchSpanProcessor), both exporting
    to an exporter that discards the spans."""
    providers: list[Any] = field(default_factory=list)

    def tracer_provider(self, *, sampled: bool) -> Any:
        """An SDK TracerProvider (ALWAYS_ON or ALWAYS_OFF) whose spans go nowhere.

        Never installed as the global provider: FastAPI's native telemetry turns itself on
        when a global provider exists, which must only happen in the ``native-*`` variants.
        """
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

        class DiscardExporter(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
        if self.processor == "batch":
            provider.add_span_processor(BatchSpanProcessor(DiscardExporter()))
        else:
            provider.add_span_processor(SimpleSpanProcessor(DiscardExporter()))
        self.providers.append(provider)
        return provider


SetupFn = Callable[[SetupContext], ASGIApp]


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    setup: SetupFn
    requires: Callable[[], str | None] = lambda: None
    """Returns why the variant cannot run with the installed versions, or ``None``."""
    default: bool = True
    """Part of a run when no ``--variants`` are given."""


VARIANTS: dict[str, Variant] = {}


def variant(
    name: str,
    description: str,
    *,
    requires: Callable[[], str | None] | None = None,
    default: bool = True,
) -> Callable[[SetupFn], SetupFn]:
    """Register the decorated setup function as variant ``name``."""

    def register(setup: SetupFn) -> SetupFn:
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} registered twice")
        VARIANTS[name] = Variant(name, description, setup, requires or (lambda: None), default)
        return setup

    return register


# --- feature detection -------------------------------------------------------------------


def _instrument_parameters() -> frozenset[str]:
    import fastprof

    return frozenset(inspect.signature(fastprof.instrument).parameters)


def instrument_options(**wanted: Any) -> dict[str, Any]:
    """The subset of ``wanted`` that ``fastprof.instrument`` accepts as keyword arguments."""
    params = _instrument_parameters()
    return {k: v for k, v in wanted.items() if k in params}


def _needs_instrument_option(option: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if option in _instrument_parameters():
            return None
        return f"fastprof.instrument() has no {option}= option"

    return check


def _needs_native_telemetry() -> str | None:
    from fastapi import FastAPI

    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return None
    import fastapi

    return f"FastAPI {fastapi.__version__} has no native telemetry (needs >= 0.142)"


def _needs_contrib() -> str | None:
    try:
        import opentelemetry.instrumentation.fastapi  # noqa: F401
    except ImportError:
        return "opentelemetry-instrumentation-fastapi is not installed"
    return None


def _fastprof_app(
    ctx: SetupContext,
    *,
    sampled: bool,
    option: str | None = None,
    candidates: Sequence[Callable[[], Any]] = (),
) -> ASGIApp:
    """A benchmark app instrumented by fastprof: the route span only, plus ``option``.

    ``dependencies`` is turned off when that option exists, so ``fastprof-sampled`` keeps
    measuring the route span alone as the API grows. For ``option``, each factory in
    ``candidates`` makes a value to try; the first that ``fastprof.instrument`` accepts is
    used (options are validated when ``instrument`` is called).
    """
    import fastprof

    tp = ctx.tracer_provider(sampled=sampled)
    base: dict[str, Any] = {"tracer_provider": tp}
    params = _instrument_parameters()
    if option != "dependencies" and "dependencies" in params:
        base["dependencies"] = False
    if option is None:
        return fastprof.instrument(create_app(), **base)
    if option not in params:
        raise Skip(f"fastprof.instrument() has no {option}= option")
    rejected = []
    for make in candidates:
        try:
            value = make()
            return fastprof.instrument(create_app(), **base, **{option: value})
        except (AttributeError, TypeError, ValueError) as exc:
            rejected.append(f"{type(exc).__name__}: {exc}")
    raise Skip(f"fastprof.instrument() rejected every {option}= value tried: {rejected}")


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


def _fastprof_object(class_name: str, **kwargs: Any) -> Callable[[], Any]:
    """A factory for ``fastprof.<class_name>(**kwargs)`` (AttributeError if it does not exist)."""

    def make() -> Any:
        import fastprof

        return getattr(fastprof, class_name)(**kwargs)

    return make


_PROFILING_SECRET = "benchmark-secret-" + "x" * 32


# --- the variants ------------------------------------------------------------------------


@variant("bare", "FastAPI app, no instrumentation")
def _bare(ctx: SetupContext) -> ASGIApp:
    return create_app()


@variant("bare-AA", "a second, identical bare app: the A/A control (shows the noise)")
def _bare_aa(ctx: SetupContext) -> ASGIApp:
    return create_app()


class TimingMiddleware:
    """The floor: the least a pure-ASGI middleware can do (time the request, keep a sum)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests = 0
        self.total_ns = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter_ns()
        try:
            await self.app(scope, receive, send)
        finally:
            self.requests += 1
            self.total_ns += perf_counter_ns() - start


@variant("floor", "minimal pure-ASGI timing middleware (the floor)")
def _floor(ctx: SetupContext) -> ASGIApp:
    app = create_app()
    app.add_middleware(TimingMiddleware)
    return app


@variant(
    "native-sampled",
    "FastAPI native telemetry (defaults, incl. operation spans), ALWAYS_ON",
    requires=_needs_native_telemetry,
)
def _native_sampled(ctx: SetupContext) -> ASGIApp:
    return create_app(telemetry={"tracer_provider": ctx.tracer_provider(sampled=True)})


@variant(
    "native-unsampled",
    "FastAPI native telemetry (defaults), ALWAYS_OFF",
    requires=_needs_native_telemetry,
)
def _native_unsampled(ctx: SetupContext) -> ASGIApp:
    return create_app(telemetry={"tracer_provider": ctx.tracer_provider(sampled=False)})


@variant(
    "native-route-sampled",
    "FastAPI native telemetry, operation_spans off (route span only), ALWAYS_ON",
    requires=_needs_native_telemetry,
    default=False,
)
def _native_route_sampled(ctx: SetupContext) -> ASGIApp:
    tp = ctx.tracer_provider(sampled=True)
    return create_app(telemetry={"tracer_provider": tp, "operation_spans": False})


@variant(
    "contrib-sampled",
    "opentelemetry-instrumentation-fastapi instrument_app, ALWAYS_ON",
    requires=_needs_contrib,
)
def _contrib_sampled(ctx: SetupContext) -> ASGIApp:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # No global tracer provider is set, so FastAPI's native telemetry stays off.
    app = create_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=ctx.tracer_provider(sampled=True))
    return app


@variant(
    "basehttp-floor",
    "a timing middleware written with Starlette's BaseHTTPMiddleware (for scale)",
    default=False,
)
def _basehttp(ctx: SetupContext) -> ASGIApp:
    from starlette.middleware.base import BaseHTTPMiddleware

    async def timing(request: Any, call_next: Any) -> Any:
        start = perf_counter_ns()
        response = await call_next(request)
        response.headers["x-elapsed-ns"] = str(perf_counter_ns() - start)
        return response

    app = create_app()
    app.add_middleware(BaseHTTPMiddleware, dispatch=timing)
    return app


@variant("fastprof-sampled", "fastprof.instrument, route span only, ALWAYS_ON")
def _fastprof_sampled(ctx: SetupContext) -> ASGIApp:
    return _fastprof_app(ctx, sampled=True)


@variant("fastprof-unsampled", "fastprof.instrument, route span only, ALWAYS_OFF")
def _fastprof_unsampled(ctx: SetupContext) -> ASGIApp:
    return _fastprof_app(ctx, sampled=False)


@variant(
    "fastprof-deps-sampled",
    "fastprof.instrument(dependencies=True), ALWAYS_ON",
    requires=_needs_instrument_option("dependencies"),
)
def _fastprof_deps_sampled(ctx: SetupContext) -> ASGIApp:
    return _fastprof_app(
        ctx, sampled=True, option="dependencies", candidates=(_const(True),)
    )


@variant(
    "fastprof-deps-unsampled",
    "fastprof.instrument(dependencies=True), ALWAYS_OFF",
    requires=_needs_instrument_option("dependencies"),
)
def _fastprof_deps_unsampled(ctx: SetupContext) -> ASGIApp:
    return _fastprof_app(
        ctx, sampled=False, option="dependencies", candidates=(_const(True),)
    )


@variant(
    "fastprof-profiling-idle",
    "fastprof with on-demand profiling configured (token header), never triggered, ALWAYS_ON",
    requires=_needs_instrument_option("profiling"),
)
def _fastprof_profiling_idle(ctx: SetupContext) -> ASGIApp:
    # Header/token trigger configured, sample_rate 0, no request carries a token.
    return _fastprof_app(
        ctx,
        sampled=True,
        option="profiling",
        candidates=(_fastprof_object("Profiling", secret=_PROFILING_SECRET), _const(True)),
    )


@variant(
    "fastprof-loop",
    "fastprof with the event-loop watchdog on, ALWAYS_ON",
    requires=_needs_instrument_option("loop_monitor"),
)
def _fastprof_loop(ctx: SetupContext) -> ASGIApp:
    # Started at lifespan startup, which the driver runs.
    return _fastprof_app(
        ctx,
        sampled=True,
        option="loop_monitor",
        candidates=(_fastprof_object("LoopMonitor"), _const(True)),
    )


@variant(
    "fastprof-slowlog",
    "fastprof with the slow-request log (1 s threshold: never logs here), ALWAYS_ON",
    requires=_needs_instrument_option("slow_requests"),
    default=False,
)
def _fastprof_slowlog(ctx: SetupContext) -> ASGIApp:
    return _fastprof_app(
        ctx,
        sampled=True,
        option="slow_requests",
        candidates=(_fastprof_object("SlowRequestLog"), _const(True)),
    )


@variant(
    "fastprof-capture-unsampled",
    "fastprof.instrument(slow_capture=SlowRequestCapture(1 s): never exports here), ALWAYS_OFF",
    requires=_needs_instrument_option("slow_capture"),
    default=False,
)
def _fastprof_capture_unsampled(ctx: SetupContext) -> ASGIApp:
    # Dependency spans on (the default), as fastprof-deps-unsampled: the difference
    # between the two is what the capture's records cost a request under the threshold.
    import fastprof

    return fastprof.instrument(
        create_app(),
        tracer_provider=ctx.tracer_provider(sampled=False),
        slow_capture=fastprof.SlowRequestCapture(threshold_s=1.0),
    )


def _needs_slowlog_dependencies() -> str | None:
    import fastprof

    if "dependencies" not in inspect.signature(fastprof.SlowRequestLog).parameters:
        return "SlowRequestLog has no dependencies= option in this fastprof"
    return None


def _production_unsampled(ctx: SetupContext, **features: Any) -> ASGIApp:
    """``instrument(app)`` (dependency spans on) plus ``features``, nothing head-sampled:
    what production pays per request; compare with ``fastprof-deps-unsampled``."""
    import fastprof

    return fastprof.instrument(
        create_app(), tracer_provider=ctx.tracer_provider(sampled=False), **features
    )


@variant(
    "fastprof-loop-unsampled",
    "instrument(app) + LoopMonitor(threshold_s=0.1), ALWAYS_OFF",
    requires=_needs_instrument_option("loop_monitor"),
    default=False,
)
def _fastprof_loop_unsampled(ctx: SetupContext) -> ASGIApp:
    import fastprof

    return _production_unsampled(ctx, loop_monitor=fastprof.LoopMonitor(threshold_s=0.1))


@variant(
    "fastprof-slowlog-unsampled",
    "instrument(app) + SlowRequestLog(threshold_s=1.0), ALWAYS_OFF",
    requires=_needs_instrument_option("slow_requests"),
    default=False,
)
def _fastprof_slowlog_unsampled(ctx: SetupContext) -> ASGIApp:
    import fastprof

    return _production_unsampled(ctx, slow_requests=fastprof.SlowRequestLog(threshold_s=1.0))


@variant(
    "fastprof-slowlog-alldeps-unsampled",
    "instrument(app) + SlowRequestLog(threshold_s=1.0, dependencies='all'), ALWAYS_OFF",
    requires=_needs_slowlog_dependencies,
    default=False,
)
def _fastprof_slowlog_alldeps_unsampled(ctx: SetupContext) -> ASGIApp:
    import fastprof

    return _production_unsampled(
        ctx, slow_requests=fastprof.SlowRequestLog(threshold_s=1.0, dependencies="all")
    )


@variant(
    "fastprof-all-alldeps-unsampled",
    "all three, the slow-request log with dependencies='all', ALWAYS_OFF",
    requires=_needs_slowlog_dependencies,
    default=False,
)
def _fastprof_all_alldeps_unsampled(ctx: SetupContext) -> ASGIApp:
    import fastprof

    return _production_unsampled(
        ctx,
        loop_monitor=fastprof.LoopMonitor(threshold_s=0.1),
        slow_requests=fastprof.SlowRequestLog(threshold_s=1.0, dependencies="all"),
        profiling=fastprof.Profiling(secret=_PROFILING_SECRET),
    )


@variant(
    "fastprof-profiling-idle-unsampled",
    "instrument(app) + Profiling(secret=...), never triggered, ALWAYS_OFF",
    requires=_needs_instrument_option("profiling"),
    default=False,
)
def _fastprof_profiling_idle_unsampled(ctx: SetupContext) -> ASGIApp:
    import fastprof

    return _production_unsampled(ctx, profiling=fastprof.Profiling(secret=_PROFILING_SECRET))


@variant(
    "fastprof-all-unsampled",
    "instrument(app) + loop monitor + slow-request log + idle profiling, ALWAYS_OFF",
    requires=_needs_instrument_option("slow_requests"),
    default=False,
)
def _fastprof_all_unsampled(ctx: SetupContext) -> ASGIApp:
    import fastprof

    return _production_unsampled(
        ctx,
        loop_monitor=fastprof.LoopMonitor(threshold_s=0.1),
        slow_requests=fastprof.SlowRequestLog(threshold_s=1.0),
        profiling=fastprof.Profiling(secret=_PROFILING_SECRET),
    )
