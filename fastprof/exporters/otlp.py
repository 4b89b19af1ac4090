"""OTLP span export with production-safe settings (Jaeger ingests OTLP on 4317/4318).

Requires the ``otlp`` extra: ``pip install 'fastprof-asgi[otlp]'``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = ["otlp_span_processor"]


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
    exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout_s)
    return BatchSpanProcessor(
        exporter,
        max_queue_size=max_queue_size,
        max_export_batch_size=max_export_batch_size,
        schedule_delay_millis=schedule_delay_s * 1000,
        export_timeout_millis=timeout_s * 1000,
    )
