"""OpenTelemetry helpers shared by fastprof's components."""

from __future__ import annotations

from typing import Final

from opentelemetry import trace
from opentelemetry.trace import Tracer, TracerProvider

from fastprof.__about__ import __version__

__all__ = ["TRACER_NAME", "error_type", "fastprof_tracer"]

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


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of an exception: its qualified class name (builtins unqualified)."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
