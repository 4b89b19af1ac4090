"""The ONLY module that goes below the OpenTelemetry SDK's public API: exporting
spans the sampler dropped.

A request head sampling dropped has no SDK span, only a ``NonRecordingSpan``
context. To export its tree anyway, fastprof builds ``ReadableSpan`` objects
itself, with the dropped span's trace id and span id (the sampled flag set, so
span processors accept them) and fresh span ids for its children, and hands
them to the span processors of the tracer provider, as the SDK does when a
span ends (``on_end``; ``on_start`` is not called: the spans start and end at
once).

That uses SDK details that are not public API: ``ReadableSpan``'s constructor,
the provider's ``_active_span_processor``, ``_span_limits`` and
``id_generator``. :func:`sdk_supported` checks them against the installed SDK
once, at start-up, with a probe span that is built and read back but exported
nowhere; :func:`exporter_for` checks the provider. When either does not match,
the capture is disabled with one warning.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping
from typing import Any, Final

from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from fastprof.__about__ import __version__
from fastprof._otel import TRACER_NAME
from fastprof._records import CaptureBuffer, Record

__all__ = ["Exporter", "exporter_for", "sdk_supported"]

_CONSTRUCTOR_ARGS: Final = frozenset(
    {
        "name",
        "context",
        "parent",
        "resource",
        "attributes",
        "events",
        "links",
        "kind",
        "instrumentation_scope",
        "status",
        "start_time",
        "end_time",
    }
)

_supported: bool | None = None


def sdk_supported() -> bool:
    """Whether the installed SDK's ``ReadableSpan`` is built and read the way
    this module does it (checked once per process)."""
    global _supported
    if _supported is None:
        try:
            _supported = _probe()
        except Exception:
            _supported = False
    return _supported


def _probe() -> bool:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    params = inspect.signature(ReadableSpan.__init__).parameters
    if not set(params) >= _CONSTRUCTOR_ARGS:
        return False
    flags = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=flags)
    parent = SpanContext(0x1234, 0x9ABC, is_remote=True, trace_flags=flags)
    linked = SpanContext(0x1234, 0xDEF0, is_remote=False, trace_flags=flags)
    resource = Resource.create({"service.name": "fastprof-probe"})
    scope = InstrumentationScope(TRACER_NAME, __version__)
    span = ReadableSpan(
        name="probe",
        context=context,
        parent=parent,
        resource=resource,
        attributes={"a": 1},
        events=(Event("e", {"b": 2}, timestamp=15),),
        links=(Link(linked),),
        kind=SpanKind.INTERNAL,
        instrumentation_scope=scope,
        status=Status(StatusCode.ERROR, "x"),
        start_time=10,
        end_time=20,
    )
    return (
        span.name == "probe"
        and span.context == context
        and span.parent == parent
        and span.resource is resource
        and dict(span.attributes or {}) == {"a": 1}
        and [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events]
        == [("e", {"b": 2}, 15)]
        and [link.context for link in span.links] == [linked]
        and span.kind is SpanKind.INTERNAL
        and span.instrumentation_scope == scope
        and span.status.status_code is StatusCode.ERROR
        and (span.start_time, span.end_time) == (10, 20)
    )


class Exporter:
    """Turns one request's records into ``ReadableSpan`` objects for span processors."""

    def __init__(
        self,
        on_end: Callable[[Any], None],
        resource: Any,
        generate_span_id: Callable[[], int],
        max_attributes: int | None,
        max_attribute_length: int | None,
        max_events: int | None,
    ) -> None:
        from opentelemetry.attributes import BoundedAttributes
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._on_end = on_end
        self._resource = resource
        self._span_id = generate_span_id
        self._max_attributes = max_attributes
        self._max_length = max_attribute_length
        self._max_events = max_events
        self._scope = InstrumentationScope(TRACER_NAME, __version__)
        self._readable = ReadableSpan
        self._event = Event
        self._bounded = BoundedAttributes

    def export(
        self,
        server: SpanContext,
        remote_parent: SpanContext | None,
        buffer: CaptureBuffer,
        root_attributes: Mapping[str, Any],
    ) -> int:
        """Hand the request's spans to the processors, children first; how many."""
        flags = TraceFlags(server.trace_flags | TraceFlags.SAMPLED)
        trace_id = server.trace_id
        state = server.trace_state
        root_context = SpanContext(
            trace_id, server.span_id, is_remote=False, trace_flags=flags, trace_state=state
        )
        contexts: dict[int, SpanContext] = {}
        finished = []
        for record in buffer.records:
            contexts[id(record)] = SpanContext(
                trace_id, self._span_id(), is_remote=False, trace_flags=flags, trace_state=state
            )
        end_fallback = buffer.root.end_time
        for record in buffer.records:
            parent = record.parent
            parent_context = contexts.get(id(parent)) if parent is not None else None
            link = record.link
            links: tuple[Link, ...] = ()
            if link is not None and id(link) in contexts:
                links = (Link(contexts[id(link)]),)
            finished.append(
                self._span(
                    record,
                    contexts[id(record)],
                    parent_context or root_context,
                    SpanKind.INTERNAL,
                    record.all_attributes(),
                    links,
                    end_fallback,
                )
            )
        root = buffer.root
        attributes = {**root.all_attributes(), **root_attributes}
        finished.append(
            self._span(
                root, root_context, remote_parent, SpanKind.SERVER, attributes, (), end_fallback
            )
        )
        on_end = self._on_end
        for span in finished:
            on_end(span)
        return len(finished)

    def _span(
        self,
        record: Record,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: tuple[Link, ...],
        end_fallback: int | None,
    ) -> Any:
        end = record.end_time
        if end is None:  # still running when exported (a teardown past the wait)
            end = max(end_fallback or 0, record.start_time)
        events = list(record.events or ())
        if self._max_events is not None:
            del events[self._max_events :]
        return self._readable(
            name=record.name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=self._bounded(
                self._max_attributes, attributes, immutable=True, max_value_len=self._max_length
            ),
            events=tuple(
                self._event(
                    name,
                    self._bounded(
                        self._max_attributes, attrs, immutable=True, max_value_len=self._max_length
                    ),
                    timestamp=ts,
                )
                for name, attrs, ts in events
            ),
            links=links,
            kind=kind,
            instrumentation_scope=self._scope,
            status=record.status or Status(StatusCode.UNSET),
            start_time=record.start_time,
            end_time=end,
        )


def exporter_for(provider: Any, span_processor: Any = None) -> Exporter | None:
    """The exporter for ``provider`` (an SDK ``TracerProvider``), or for
    ``span_processor`` when given; ``None`` when this SDK or provider doesn't fit."""
    if not sdk_supported():
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

        sdk_provider = provider if isinstance(provider, SdkTracerProvider) else None
        if span_processor is not None:
            on_end = span_processor.on_end
        elif sdk_provider is not None:
            on_end = sdk_provider._active_span_processor.on_end
        else:
            return None
        if not callable(on_end):
            return None
        resource = getattr(sdk_provider, "resource", None) or Resource.create({})
        generator = getattr(sdk_provider, "id_generator", None)
        generate = getattr(generator, "generate_span_id", None)
        if not callable(generate):
            generate = _random_span_id
        limits = getattr(sdk_provider, "_span_limits", None)
        return Exporter(
            on_end,
            resource,
            generate,
            getattr(limits, "max_span_attributes", 128),
            getattr(limits, "max_attribute_length", None),
            getattr(limits, "max_events", 128),
        )
    except Exception:
        return None


def _random_span_id() -> int:
    return random.getrandbits(64) or 1
