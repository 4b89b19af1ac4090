"""One call to set up a tracer provider for fastprof's spans."""

from __future__ import annotations

from typing import TextIO

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from fastprof.exporters.console import SpanTreePrinter
from fastprof.exporters.otlp import _register, otlp_span_processor

__all__ = ["setup_tracing"]


def span_limits(max_attribute_length: int = 4096) -> SpanLimits:
    """fastprof's bounded span limits (OpenTelemetry's default attribute length is unlimited)."""
    return SpanLimits(
        max_attribute_length=max_attribute_length,
        max_span_attributes=128,
        max_events=128,
        max_event_attributes=32,
    )


def setup_tracing(
    service_name: str,
    *,
    otlp_endpoint: str | None = None,
    console: bool = False,
    console_stream: TextIO | None = None,
    set_global: bool = True,
    max_attribute_length: int = 4096,
) -> TracerProvider:
    """Create an SDK :class:`TracerProvider` with bounded limits and the chosen exporters.

    Args:
        service_name: ``service.name`` resource attribute shown by Jaeger.
        otlp_endpoint: OTLP/HTTP traces URL, e.g. ``http://127.0.0.1:4318/v1/traces``
            for a local Jaeger; exported through a bounded batch processor
            (``fastprof.exporters.export_stats(provider)`` counts lost spans).
        console: Also print each trace as a tree (development only).
        set_global: Install it as the global tracer provider (FastAPI's native
            telemetry then turns itself on, and fastprof nests under it).
        max_attribute_length: Cap on any attribute value (OTel's default is unlimited).
    """
    if not service_name or not isinstance(service_name, str):
        raise ValueError("service_name: expected a non-empty string")
    if not otlp_endpoint and not console:
        raise ValueError("setup_tracing: enable at least one of otlp_endpoint or console")
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        span_limits=span_limits(max_attribute_length),
    )
    if otlp_endpoint:
        processor = otlp_span_processor(otlp_endpoint)
        _register(provider, processor)  # for export_stats(provider)
        provider.add_span_processor(processor)
    if console:
        provider.add_span_processor(SimpleSpanProcessor(SpanTreePrinter(console_stream)))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider
