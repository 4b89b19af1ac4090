"""fastprof.exporters.export_stats: spans delivered and spans lost to failed exports."""

from __future__ import annotations

import socket

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fastprof.exporters import ExportStats, export_stats, otlp_span_processor, setup_tracing
from tests._otlp_receiver import otlp_receiver


def _spans(provider: TracerProvider, n: int) -> None:
    tracer = provider.get_tracer("t")
    for i in range(n):
        tracer.start_span(f"s{i}").end()


def test_delivered_spans_are_counted_as_exported() -> None:
    with otlp_receiver() as (endpoint, received):
        provider = setup_tracing("svc", otlp_endpoint=endpoint, set_global=False)
        assert export_stats(provider) == ExportStats(exported=0, failed=0)
        _spans(provider, 5)
        assert provider.force_flush(10_000)
        assert export_stats(provider) == ExportStats(exported=5, failed=0)
        provider.shutdown()
    assert len(received.spans()) == 5


def test_spans_of_failed_exports_are_counted_as_lost() -> None:
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processor = otlp_span_processor(f"http://127.0.0.1:{port}/v1/traces", timeout_s=0.5)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    _spans(provider, 3)
    provider.force_flush(10_000)
    assert export_stats(processor) == ExportStats(exported=0, failed=3)
    provider.shutdown()


def test_export_stats_needs_a_fastprof_processor_or_provider() -> None:
    with pytest.raises(ValueError, match="target"):
        export_stats(BatchSpanProcessor(InMemorySpanExporter()))
    with pytest.raises(ValueError, match="target"):
        export_stats(TracerProvider())
    console_only = setup_tracing("svc", console=True, set_global=False)
    with pytest.raises(ValueError, match="target"):
        export_stats(console_only)
