"""OpenTelemetry helpers shared by fastprof's components."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any, Final

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Tracer, TracerProvider
from starlette.types import Scope

from fastprof.__about__ import __version__

__all__ = [
    "TRACER_NAME",
    "attach_context",
    "context_with_span",
    "current_context",
    "detach_context",
    "error_type",
    "fastprof_tracer",
    "foreign_server_span",
    "hex_ids",
    "is_sdk_span",
    "with_ambient",
]

#: Instrumentation scope of every span fastprof creates.
TRACER_NAME: Final = "fastprof"


def fastprof_tracer(tracer_provider: TracerProvider | None) -> Tracer:
    """fastprof's tracer from ``tracer_provider`` (validated), else from the global provider."""
    if tracer_provider is None:
        return trace.get_tracer(TRACER_NAME, __version__)
    if not hasattr(tracer_provider, "get_tracer"):
        raise ValueError(
            "tracer_provider: expected an opentelemetry TracerProvider, "
            f"got {type(tracer_provider).__name__}"
        )
    return tracer_provider.get_tracer(TRACER_NAME, __version__)


def hex_ids(span_context: trace.SpanContext) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` as the 32/16 hex digits logs and links use, or ``None``."""
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of an exception: its qualified class name (builtins unqualified)."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _runtime_context_var() -> ContextVar[Context] | None:
    """The ContextVar behind OpenTelemetry's default runtime context, if that is in use.

    ``opentelemetry.context.attach/detach/get_current`` are two Python calls each
    around one ContextVar operation; on the request path fastprof uses the
    ContextVar directly when the runtime context is the default
    ``ContextVarsRuntimeContext`` (selected by ``OTEL_PYTHON_CONTEXT``), and the
    public functions otherwise.
    """
    try:
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

        runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
        if type(runtime) is not ContextVarsRuntimeContext:
            return None
        var = getattr(runtime, "_current_context", None)
        return var if isinstance(var, ContextVar) else None
    except Exception:  # pragma: no cover - an API version without these names
        return None


_CONTEXT_VAR: Final = _runtime_context_var()

current_context: Callable[[], Context]
attach_context: Callable[[Context], Token[Any]]
detach_context: Callable[[Token[Any]], None]
if _CONTEXT_VAR is not None:
    current_context = _CONTEXT_VAR.get
    attach_context = _CONTEXT_VAR.set
    detach_context = _CONTEXT_VAR.reset
else:  # pragma: no cover - a non-default OTEL_PYTHON_CONTEXT
    current_context = otel_context.get_current
    attach_context = otel_context.attach
    detach_context = otel_context.detach


def _span_key() -> str:
    """The key under which ``trace.set_span_in_context`` stores the current span."""
    keys = list(trace.set_span_in_context(trace.INVALID_SPAN, Context()))
    if len(keys) != 1:  # pragma: no cover - an API that stores more than the span
        raise RuntimeError("unexpected OpenTelemetry context layout")
    return keys[0]


try:
    _SPAN_KEY: str | None = _span_key()
except Exception:  # pragma: no cover
    _SPAN_KEY = None


def context_with_span(span: trace.Span, parent: Context) -> Context:
    """``trace.set_span_in_context(span, parent)``, one dict when ``parent`` is empty."""
    if not parent and _SPAN_KEY is not None:
        return Context({_SPAN_KEY: span})
    return trace.set_span_in_context(span, parent)


# -- who owns the request's SERVER span ---------------------------------------------------


def with_ambient(extracted: Context, ambient: Context) -> Context:
    """The ambient context with what was extracted from the headers added."""
    if not extracted:
        return ambient
    if not ambient:
        return extracted
    merged = Context({**ambient, **extracted})
    outer = baggage.get_all(ambient)
    if outer:
        # Header entries are added to (not replacing) the ambient baggage, as
        # propagate.extract() onto the current context would do.
        for name, value in {**outer, **baggage.get_all(extracted)}.items():
            merged = baggage.set_baggage(name, value, merged)
    return merged


def foreign_server_span(scope: Scope, ambient: Context) -> trace.Span | None:
    """The SERVER span another layer opened for this request, if any.

    FastAPI's native telemetry publishes its request in ``scope["fastapi.telemetry"]``;
    other instrumentations (OpenTelemetry contrib) make their SERVER span current.
    A recording SERVER span created by fastprof itself in the ambient context can
    only be a leak from another request, so it is ignored.
    """
    native = scope.get("fastapi.telemetry")
    native_span = getattr(native, "span", None)
    if native_span is not None:
        return native_span  # type: ignore[no-any-return]
    if not ambient:
        return None  # the usual case: the server starts each request in an empty context
    current = trace.get_current_span(ambient)
    if current.is_recording():
        if getattr(current, "kind", None) == SpanKind.SERVER:
            scope_info = getattr(current, "instrumentation_scope", None)
            if getattr(scope_info, "name", None) != TRACER_NAME:
                return current
        return None
    span_context = current.get_span_context()
    if span_context.is_valid and not span_context.is_remote and not is_sdk_span(current):
        # An unsampled span opened by an outer layer in this request.
        return current
    return None


def is_sdk_span(span: trace.Span) -> bool:
    return hasattr(span, "end_time")
