"""Where fastprof's telemetry goes: OTLP (Jaeger, collectors), the console, and helpers."""

from fastprof.exporters._setup import setup_tracing
from fastprof.exporters.console import SpanTreePrinter
from fastprof.exporters.otlp import ExportStats, export_stats, otlp_span_processor

__all__ = ["ExportStats", "SpanTreePrinter", "export_stats", "otlp_span_processor", "setup_tracing"]
