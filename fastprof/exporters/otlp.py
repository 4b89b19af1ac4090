"""OTLP span export with production-safe settings (Jaeger ingests OTLP on 4317/4318).

Requires the ``otlp`` extra: ``pip install 'fastprof-asgi[otlp]'`` (``grpc`` for
``protocol="grpc"``: ``pip install 'fastprof-asgi[grpc]'``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["ExportStats", "OtlpProtocol", "export_stats", "otlp_span_processor"]

logger = logging.getLogger("fastprof.exporters")

OtlpProtocol = Literal["http/protobuf", "grpc"]

_COMPRESSIONS: Final = ("gzip", "deflate", "none")


def _bounded(call: Callable[[], object], timeout_s: float) -> bool:
    """Run ``call`` in a daemon thread and wait at most ``timeout_s`` for it.

    The OpenTelemetry SDK bounds neither ``force_flush`` (its timeout is ignored)
    nor, before 1.33, ``shutdown``: with a collector that accepts connections and
    never answers, every queued batch waits out the export timeout in turn. A
    thread still exporting after the deadline is a daemon: it cannot hold the
    process up.
    """
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the SDK's own failure: report, don't raise at shutdown
            logger.warning("fastprof: span export flush failed: %r", exc)
            outcome.append(False)

    thread = threading.Thread(target=run, name="fastprof-span-flush", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(outcome and outcome[0] is not False)


class _BoundedBatchSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` whose ``force_flush`` and ``shutdown`` return in bounded time.

    ``shutdown`` runs within ``shutdown_timeout_s``; after the deadline the exporter is
    shut down too (which stops its retries) and the spans still queued are dropped.
    """

    def __init__(self, exporter: SpanExporter, *, shutdown_timeout_s: float, **kw: Any) -> None:
        super().__init__(exporter, **kw)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._closed = False

    def force_flush(self, timeout_millis: int | None = None) -> bool:
        timeout_s = self._shutdown_timeout_s if timeout_millis is None else timeout_millis / 1000
        return _bounded(lambda: super(_BoundedBatchSpanProcessor, self).force_flush(
            int(timeout_s * 1000)
        ), timeout_s)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not _bounded(super().shutdown, self._shutdown_timeout_s):
            logger.warning(
                "fastprof: spans not exported within %gs at shutdown were dropped",
                self._shutdown_timeout_s,
            )
            _bounded(self.span_exporter.shutdown, 0.5)


def _exporter_class(protocol: OtlpProtocol) -> Any:
    """The exporter class for ``protocol``; ImportError naming the extra if missing."""
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            return GrpcSpanExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter
    except ImportError as exc:
        extra = "grpc" if protocol == "grpc" else "otlp"
        raise ImportError(
            f"OTLP export over {protocol} needs the {extra} extra: "
            f"pip install 'fastprof-asgi[{extra}]'"
        ) from exc


def _exporter(
    protocol: OtlpProtocol,
    endpoint: str,
    headers: dict[str, str] | None,
    timeout_s: float,
    compression: str | None,
) -> SpanExporter:
    cls = _exporter_class(protocol)
    if protocol == "grpc":
        from grpc import Compression as GrpcCompression

        grpc_compression = {
            None: None,
            "none": GrpcCompression.NoCompression,
            "gzip": GrpcCompression.Gzip,
            "deflate": GrpcCompression.Deflate,
        }[compression]
        exporter: SpanExporter = cls(
            endpoint=endpoint,
            insecure=endpoint.startswith("http://"),
            headers=headers,
            timeout=timeout_s,
            compression=grpc_compression,
        )
        return exporter
    from opentelemetry.exporter.otlp.proto.http import Compression

    http_compression = None if compression is None else Compression(compression)
    exporter = cls(
        endpoint=endpoint, headers=headers, timeout=timeout_s, compression=http_compression
    )
    return exporter


def otlp_span_processor(
    endpoint: str = "http://127.0.0.1:4318/v1/traces",
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
    max_queue_size: int = 8192,
    max_export_batch_size: int = 512,
    schedule_delay_s: float = 1.0,
    protocol: OtlpProtocol = "http/protobuf",
    compression: Literal["gzip", "deflate", "none"] | None = None,
    shutdown_timeout_s: float = 3.0,
) -> BatchSpanProcessor:
    """A bounded, non-blocking OTLP span processor.

    Spans are queued (at most ``max_queue_size``; beyond that they are dropped,
    never blocking the request) and exported from a background thread with an
    explicit ``timeout_s``. Never use a ``SimpleSpanProcessor`` with a network
    exporter in production: with the collector down it blocks every span end
    for seconds.

    ``force_flush()`` and ``shutdown()`` return within ``shutdown_timeout_s``
    (``force_flush`` within its ``timeout_millis`` if given) even when the
    collector accepts connections and never answers: spans not exported by then
    are dropped. The SDK's own processor can take 30 s there, longer than many
    orchestrators' grace period.

    Args:
        endpoint: The traces URL: ``http(s)://host:4318/v1/traces`` for
            ``http/protobuf``, ``http(s)://host:4317`` for ``grpc``.
        protocol: ``"http/protobuf"`` or ``"grpc"`` (the ``grpc`` extra).
        compression: ``"gzip"``, ``"deflate"`` (HTTP only) or ``"none"``;
            ``None`` lets the exporter read ``OTEL_EXPORTER_OTLP_*COMPRESSION``.

    Raises:
        ValueError: ``endpoint`` is not an ``http(s)://host[:port]/...`` URL or a
            bound is out of range.
        ImportError: the ``otlp`` (or ``grpc``) extra is not installed.
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
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"protocol: expected 'http/protobuf' or 'grpc', got {protocol!r}")
    if compression is not None and compression not in _COMPRESSIONS:
        raise ValueError(f"compression: expected one of {_COMPRESSIONS}, got {compression!r}")
    if not 0 < shutdown_timeout_s <= 60:
        raise ValueError("shutdown_timeout_s: expected a number of seconds in (0, 60]")
    exporter = _CountingExporter(_exporter(protocol, endpoint, headers, timeout_s, compression))
    return _BoundedBatchSpanProcessor(
        exporter,
        shutdown_timeout_s=shutdown_timeout_s,
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
