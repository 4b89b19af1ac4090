"""Cheap span records of an unsampled request, for the slow-request capture.

When :class:`~fastprof.SlowRequestCapture` follows a request that head sampling
dropped, fastprof's components record what its spans would have held into
:class:`Record` objects instead of OpenTelemetry spans: a name, shared
attribute dicts, wall-clock start and end, the parent record, events, an error
status. They are plain slotted objects (no SDK, no context, no ids), made only
for what fastprof itself times (phases, dependencies, teardowns), and bounded
per request. Only a request that turns out slow has its records turned into
spans and exported (``fastprof.capture._sdk``); the others are dropped with the
request.

A :class:`Record` answers the few span methods fastprof's own code calls
(``set_attribute``, ``add_event``, ``record_exception``, ``set_status``,
``update_name``, ``end``), so the same code annotates a span or a record.
Records are never made current: the app's code keeps seeing the request's
(dropped) span.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry.trace import Status, StatusCode

from fastprof._otel import error_type

__all__ = ["MAX_RECORD_ATTRIBUTES", "MAX_RECORD_EVENTS", "CaptureBuffer", "Record"]

#: Attributes a record takes on top of the shared ones it was made with.
MAX_RECORD_ATTRIBUTES: Final = 64
#: Events a record keeps (blocked-loop events, exceptions, cache hits).
MAX_RECORD_EVENTS: Final = 32
_MAX_STACKTRACE: Final = 8192


class Record:
    """What one span of an unsampled request would have held."""

    __slots__ = (
        "attributes",
        "end_time",
        "events",
        "extra",
        "link",
        "name",
        "parent",
        "start_time",
        "status",
    )

    def __init__(
        self,
        name: str,
        attributes: Mapping[str, Any],
        start_time: int,
        parent: Record | None,
        link: Record | None = None,
    ) -> None:
        self.name = name
        #: Shared, never written (per-callable attributes); :attr:`extra` holds the rest.
        self.attributes = attributes
        self.extra: dict[str, Any] | None = None
        #: Wall-clock nanoseconds, like an SDK span's.
        self.start_time = start_time
        self.end_time: int | None = None
        #: ``None``: a child of the request's SERVER span.
        self.parent = parent
        #: The setup record a teardown record is linked to.
        self.link = link
        self.events: list[tuple[str, dict[str, Any], int]] | None = None
        self.status: Status | None = None

    def set_attribute(self, key: str, value: Any) -> None:
        extra = self.extra
        if extra is None:
            extra = self.extra = {}
        if key in extra or len(extra) < MAX_RECORD_ATTRIBUTES:
            extra[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        events = self.events
        if events is None:
            events = self.events = []
        if len(events) < MAX_RECORD_EVENTS:
            events.append((name, dict(attributes or {}), timestamp or time.time_ns()))

    def record_exception(self, exception: BaseException, escaped: bool = False) -> None:
        """The ``exception`` event, with the attributes the SDK gives it."""
        stacktrace = "".join(
            traceback.format_exception(type(exception), exception, exception.__traceback__)
        )
        self.add_event(
            "exception",
            {
                "exception.type": error_type(exception),
                "exception.message": str(exception),
                "exception.stacktrace": stacktrace[-_MAX_STACKTRACE:],
                "exception.escaped": str(escaped),
            },
        )

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self.status = status if isinstance(status, Status) else Status(status, description)

    def update_name(self, name: str) -> None:
        self.name = name

    def end(self, end_time: int | None = None) -> None:
        """End it at ``end_time`` (wall-clock ns), else now."""
        if self.end_time is None:
            self.end_time = end_time if end_time is not None else time.time_ns()

    def all_attributes(self) -> dict[str, Any]:
        """The shared attributes with the record's own on top."""
        if self.extra is None:
            return dict(self.attributes)
        return {**self.attributes, **self.extra}


class CaptureBuffer:
    """One unsampled request's records: the SERVER span's, and up to ``max_records`` more."""

    __slots__ = (
        "dropped",
        "epoch_offset",
        "handle",
        "headers",
        "max_records",
        "records",
        "root",
        "wanted",
    )

    def __init__(self, name: str, start_ns: int, max_records: int) -> None:
        #: Wall-clock ns minus ``perf_counter_ns()``: every record of the request is
        #: timed with the monotonic clock and this one offset, so they order exactly.
        self.epoch_offset = time.time_ns() - time.perf_counter_ns()
        #: The request's SERVER span (named like fastprof's, attributes at the end),
        #: from ``start_ns`` (``perf_counter_ns()``).
        self.root = Record(name, {}, start_ns + self.epoch_offset, None)
        self.records: list[Record] = []
        self.max_records = max_records
        #: Records refused by the cap.
        self.dropped = 0
        #: Set when the request was found slow enough to export (the middleware
        #: then annotates :attr:`root` as it would a recording span).
        self.wanted = False
        #: The request's ASGI headers (its propagated parent is read at export only).
        self.headers: Any = None
        #: The timer that exports it if the app does not return in time.
        self.handle: Any = None

    def add(
        self,
        name: str,
        attributes: Mapping[str, Any],
        start_time: int,
        parent: Record | None,
        link: Record | None = None,
    ) -> Record | None:
        """A new record (``None`` past the cap, counted in :attr:`dropped`)."""
        records = self.records
        if len(records) >= self.max_records:
            self.dropped += 1
            return None
        record = Record(name, attributes, start_time, parent, link)
        records.append(record)
        return record
