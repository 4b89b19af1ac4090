"""What the dashboard keeps of one request: a small summary plus its spans, bounded.

A :class:`RequestRecord` is built in the dashboard's writer thread from the
OpenTelemetry spans of one request (never on the event loop). Every string is
truncated and every list capped, so a record's size is bounded whatever the
application or its clients put in attributes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

__all__ = [
    "FLAG_BLOCKED",
    "FLAG_ERROR",
    "FLAG_PROFILED",
    "FLAG_SLOW",
    "RequestRecord",
    "build_record",
    "is_request_root",
    "span_entry",
    "valid_request_key",
]

FLAG_SLOW: Final = 1
FLAG_BLOCKED: Final = 2
FLAG_PROFILED: Final = 4
FLAG_ERROR: Final = 8

#: Spans kept per request (the root first); the rest are counted.
MAX_SPANS: Final = 256
MAX_ATTRIBUTES: Final = 48
MAX_EVENTS: Final = 16
MAX_VALUE: Final = 512
#: Stack traces (of an exception, of a blocked loop) are kept longer.
MAX_STACK: Final = 4096
_LONG_KEYS: Final = frozenset({"exception.stacktrace", "code.stacktrace"})

_KEY_RE: Final = re.compile(r"[0-9a-f]{16}")
_PROFILE_RE: Final = re.compile(r"[0-9a-f]{32}")
BLOCKED_EVENT: Final = "fastprof.loop.blocked"


def valid_request_key(key: object) -> bool:
    """``True`` for a request key: the root span id, 16 lowercase hex characters."""
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def _value(key: str, value: Any) -> Any:
    limit = MAX_STACK if key in _LONG_KEYS else MAX_VALUE
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, Sequence):
        items = [_value(key, v) for v in list(value)[:16]]
        return items
    return str(value)[:limit]


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not attributes:
        return out
    for key, value in attributes.items():
        kind = type(value)
        if kind is str:
            if len(value) > MAX_VALUE:
                value = _value(key, value)
        elif kind is not int and kind is not float and kind is not bool:
            value = _value(key, value)
        out[key] = value
        if len(out) >= MAX_ATTRIBUTES:
            break
    return out


def span_entry(span: ReadableSpan, origin_ns: int) -> list[Any]:
    """One span as a compact JSON-able list.

    ``[name, span id, parent span id, start offset µs, duration µs, error, attributes,
    events]``; each event is ``[name, offset µs, attributes]``. Offsets are from
    ``origin_ns`` (the request span's start).
    """
    context = span.context
    parent = span.parent
    start = span.start_time or origin_ns
    end = span.end_time or start
    events = (
        [
            [
                str(event.name)[:128],
                (event.timestamp - origin_ns) // 1000,
                _attributes(event.attributes),
            ]
            for event in list(span.events)[:MAX_EVENTS]
        ]
        if span.events
        else []
    )
    name = span.name
    return [
        name if len(name) <= MAX_VALUE else name[:MAX_VALUE],
        format(context.span_id, "016x") if context is not None else "",
        format(parent.span_id, "016x") if parent is not None and not parent.is_remote else "",
        (start - origin_ns) // 1000,
        (end - start) // 1000,
        span.status.status_code is StatusCode.ERROR,
        _attributes(span.attributes),
        events,
    ]


class RequestRecord:
    """One recorded request: the summary the list shows, and its spans."""

    __slots__ = (
        "deps",
        "duration_s",
        "error_type",
        "flags",
        "key",
        "method",
        "path",
        "pid",
        "profile_id",
        "request_id",
        "route",
        "size",
        "spans",
        "spans_dropped",
        "start",
        "status",
        "trace_id",
    )

    def __init__(
        self,
        key: str,
        *,
        trace_id: str,
        start: float,
        duration_s: float,
        method: str,
        route: str,
        path: str,
        status: int,
        error_type: str,
        flags: int,
        profile_id: str,
        request_id: str,
        pid: int,
        spans: list[list[Any]],
        deps: list[list[Any]],
        spans_dropped: int = 0,
    ) -> None:
        self.key = key
        self.trace_id = trace_id
        self.start = start
        self.duration_s = duration_s
        self.method = method
        self.route = route
        self.path = path
        self.status = status
        self.error_type = error_type
        self.flags = flags
        self.profile_id = profile_id
        self.request_id = request_id
        self.pid = pid
        self.spans = spans
        self.deps = deps
        self.spans_dropped = spans_dropped
        self.size = 0

    def add_late_span(self, entry: list[Any]) -> None:
        """A span of this request that ended after the request's span (a teardown)."""
        if len(self.spans) >= MAX_SPANS:
            self.spans_dropped += 1
            return
        self.spans.append(entry)
        dep = _dependency(entry)
        if dep is not None:
            self.deps.append(dep)
        self.flags |= _span_flags(entry)

    def spans_json(self) -> str:
        return json.dumps(
            {"spans": self.spans, "dropped": self.spans_dropped}, separators=(",", ":")
        )

    def deps_json(self) -> str:
        return json.dumps(self.deps, separators=(",", ":"))


def _dependency(entry: list[Any]) -> list[Any] | None:
    """``[name, kind, duration µs]`` of a dependency (or its teardown) span."""
    attrs = entry[6]
    if "fastprof.dependency.kind" not in attrs:
        return None
    return [entry[0], "teardown" if "fastprof.dependency.phase" in attrs else "call", entry[4]]


def _span_flags(entry: list[Any]) -> int:
    flags = 0
    for event in entry[7]:
        if event[0] == BLOCKED_EVENT:
            flags |= FLAG_BLOCKED
    return flags


def build_record(
    root: ReadableSpan, spans: Iterable[ReadableSpan], *, slow_s: float
) -> RequestRecord | None:
    """The record of the request whose SERVER span is ``root`` (``spans``: its descendants)."""
    context = root.context
    if context is None or root.start_time is None or root.end_time is None:
        return None
    origin = root.start_time
    entries = [span_entry(root, origin)]
    attrs: dict[str, Any] = entries[0][6]  # a plain dict: cheaper to read than the span's
    dropped = 0
    ordered = sorted(spans, key=lambda s: (s.start_time or 0, s.end_time or 0))
    for span in ordered:
        if len(entries) >= MAX_SPANS:
            dropped += 1
            continue
        entries.append(span_entry(span, origin))
    duration = (root.end_time - root.start_time) / 1e9
    status_raw = attrs.get("http.response.status_code", 0)
    status = status_raw if isinstance(status_raw, int) else 0
    error_type = str(attrs.get("error.type", ""))[:128]
    profile_raw = attrs.get("fastprof.profile.id", "")
    profile_id = profile_raw if isinstance(profile_raw, str) and _PROFILE_RE.fullmatch(
        profile_raw
    ) else ""
    flags = 0
    if duration >= slow_s:
        flags |= FLAG_SLOW
    if profile_id:
        flags |= FLAG_PROFILED
    if status >= 500 or error_type or root.status.status_code == StatusCode.ERROR:
        flags |= FLAG_ERROR
    deps: list[list[Any]] = []
    for entry in entries:
        flags |= _span_flags(entry)
        dep = _dependency(entry)
        if dep is not None:
            deps.append(dep)
    method = str(attrs.get("http.request.method", "") or root.name.split(" ", 1)[0])[:16]
    return RequestRecord(
        format(context.span_id, "016x"),
        trace_id=format(context.trace_id, "032x"),
        start=origin / 1e9,
        duration_s=round(duration, 6),
        method=method,
        route=str(attrs.get("http.route", ""))[:MAX_VALUE],
        path=str(attrs.get("url.path", ""))[:MAX_VALUE],
        status=status,
        error_type=error_type,
        flags=flags,
        profile_id=profile_id,
        request_id=str(attrs.get("fastprof.request_id", ""))[:128],
        pid=os.getpid(),
        spans=entries,
        deps=deps,
        spans_dropped=dropped,
    )


def is_request_root(span: ReadableSpan) -> bool:
    """A SERVER span whose parent (if any) is remote: the span of one request in this process."""
    parent = span.parent
    return span.kind == SpanKind.SERVER and (parent is None or parent.is_remote)
