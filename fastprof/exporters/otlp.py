"""OTLP span export with production-safe settings (Jaeger ingests OTLP on 4317/4318).

Requires the ``otlp`` extra: ``pip install 'fastprof-asgi[otlp]'``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["ExportStats", "export_stats", "otlp_span_processor"]


def otlp_span_processor(
    endpoint: str = "http://127.0.0.1:4318/v1/traces",
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
    max_queue_size: int = 8192,
    max_export_batch_size: int = 512,
    schedule_delay_s: float = 1.0,
) -> BatchSpanProcessor:
    """A bounded, non-blocking OTLP/HTTP span processor.

    Spans are queued (at most ``max_queue_size``; beyond that they are dropped,
    never blocking the request) and exported from a background thread with an
    explicit ``timeout_s``. Never use a ``SimpleSpanProcessor`` with a network
    exporter in production: with the collector down it blocks every span end
    for seconds.

    Raises:
        ValueError: ``endpoint`` is not an ``http(s)://host[:port]/...`` URL or a
            bound is out of range.
        ImportError: the ``otlp`` extra is not installed.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"endpoint: expected an http(s) URL such as http://127.0.0.1:4318/v1/traces, "
            f"got {endpoint!r}"
        )
    if not 0 < timeout_s <= 60:
        raise ValueError("timeout_s: expected a number of seconds in (0, 60]")
    if not 1 <= max_export_batch_size <= max_queue_size <= 1_000_000:
        raise ValueError(
            "max_queue_size/max_export_batch_size: expected 1 <= batch <= queue <= 1000000"
        )
    if not 0 < schedule_delay_s <= 60:
        raise ValueError("schedule_delay_s: expected a number of seconds in (0, 60]")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ImportError(
            "OTLP export needs the otlp extra: pip install 'fastprof-asgi[otlp]'"
        ) from exc
    exporter = _CountingExporter(
        OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout_s)
    )
    return BatchSpanProcessor(
        exporter,
        max_queue_size=max_queue_size,
        max_export_batch_size=max_export_batch_size,
        schedule_delay_millis=schedule_delay_s * 1000,
        export_timeout_millis=timeout_s * 1000,
    )


@dataclass(frozen=True, slots=True)
class ExportStats:
    """Spans handed to one fastprof OTLP exporter since it was created.

    Attributes:
        exported: spans the collector accepted.
        failed: spans lost because their export failed after the exporter's
            retries (collector down or unreachable, export timed out, request
            refused). The batch processor does not retry them.
    """

    exported: int
    failed: int


class _CountingExporter(SpanExporter):
    """Counts what the wrapped exporter delivered and what it lost; otherwise delegates.

    Called from the batch processor's worker thread (and ``force_flush`` callers),
    never from a request. Two integers: bounded whatever the traffic.
    """

    __slots__ = ("_exported", "_exporter", "_failed", "_lock")

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter
        self._lock = threading.Lock()
        self._exported = 0
        self._failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._exporter.export(spans)
        except BaseException:
            self._add(0, len(spans))
            raise
        if result is SpanExportResult.SUCCESS:
            self._add(len(spans), 0)
        else:
            self._add(0, len(spans))
        return result

    def _add(self, exported: int, failed: int) -> None:
        with self._lock:
            self._exported += exported
            self._failed += failed

    def stats(self) -> ExportStats:
        with self._lock:
            return ExportStats(exported=self._exported, failed=self._failed)

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


# Providers made by setup_tracing() -> their OTLP processor (weak: gone with the provider).
_by_provider: weakref.WeakKeyDictionary[TracerProvider, BatchSpanProcessor] = (
    weakref.WeakKeyDictionary()
)


def _register(provider: TracerProvider, processor: BatchSpanProcessor) -> None:
    _by_provider[provider] = processor


def export_stats(target: BatchSpanProcessor | TracerProvider) -> ExportStats:
    """How many spans were exported and lost by a processor from :func:`otlp_span_processor`.

    ``target`` is that processor, or the provider ``setup_tracing(otlp_endpoint=...)``
    returned.

    Spans the processor dropped because its queue was full never reach the
    exporter: the OpenTelemetry SDK logs those (``Queue full, dropping span``)
    and counts them in its own ``otel.sdk.processor.span.processed`` metric
    (``error.type=queue_full``) when ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true``.

    Raises:
        ValueError: ``target`` is neither (the provider has no OTLP endpoint, or the
            processor was made otherwise).
    """
    processor = _by_provider.get(target) if isinstance(target, TracerProvider) else target
    exporter = getattr(processor, "span_exporter", None)
    if not isinstance(exporter, _CountingExporter):
        raise ValueError(
            "target: expected a processor made by otlp_span_processor() or a provider made by"
            " setup_tracing(otlp_endpoint=...)"
        )
    return exporter.stats()
