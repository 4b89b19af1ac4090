"""Log correlation: request id, trace id and span id on every log line of a request.

structlog::

    import structlog
    import fastprof.logging

    structlog.configure(
        processors=[
            fastprof.logging.add_request_context,
            structlog.processors.JSONRenderer(),
        ]
    )

stdlib :mod:`logging`::

    import logging
    import fastprof.logging

    handler = logging.StreamHandler()
    handler.addFilter(fastprof.logging.RequestContextFilter())
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(request_id)s %(trace_id)s %(message)s")
    )

Both read fastprof's ``current_request`` ContextVar and the current
OpenTelemetry span, so they work in the request's task, in tasks it creates,
and in sync dependencies/endpoints that Starlette runs in a worker thread
(anyio copies the context into the worker). The span id is the *current*
span's: inside a dependency span it is that span's id.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from opentelemetry import trace

from fastprof._context import current_request
from fastprof._otel import hex_ids

__all__ = ["RequestContextFilter", "add_request_context", "request_context"]


def request_context() -> dict[str, str]:
    """``request_id``, ``trace_id`` and ``span_id`` of the current request/span.

    Keys are omitted when unknown (outside a request, no valid span).
    """
    fields: dict[str, str] = {}
    state = current_request.get()
    if state is not None:
        fields["request_id"] = state.request_id
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid and state is not None:
        span_context = state.span.get_span_context()
    ids = hex_ids(span_context)
    if ids is not None:
        fields["trace_id"], fields["span_id"] = ids
    return fields


def add_request_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add ``request_id``, ``trace_id`` and ``span_id``.

    Values already bound in the event dict win. Outside a request and without
    a valid span the event dict is returned unchanged.
    """
    try:
        for key, value in request_context().items():
            event_dict.setdefault(key, value)
    except Exception:  # pragma: no cover - never break logging
        pass
    return event_dict


class RequestContextFilter(logging.Filter):
    """stdlib logging filter: set ``request_id``, ``trace_id``, ``span_id`` on records.

    The attributes are always set (to ``default`` when unknown) so format
    strings like ``%(request_id)s`` never fail. The filter never drops a record.
    """

    def __init__(self, name: str = "", *, default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            fields = request_context()
        except Exception:  # pragma: no cover - never break logging
            fields = {}
        default = self.default
        for key in ("request_id", "trace_id", "span_id"):
            if not hasattr(record, key):
                setattr(record, key, fields.get(key, default))
        return True
