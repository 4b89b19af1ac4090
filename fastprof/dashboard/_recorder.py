"""The dashboard's recorder: an OpenTelemetry span processor and a writer thread.

``on_end`` runs wherever a span ends, usually on the event loop, so it only
files the span under its trace (a dict lookup and an append, under a lock).
When a request's SERVER span ends, its descendants are picked out and queued
(a bounded deque; when full, the request is dropped and counted). Spans of the
request that end later (the teardown of a ``yield`` dependency after the
response) are recognised by their parent and queued too.

The writer thread wakes every ``flush_interval_s``, turns what was queued into
records (:func:`~fastprof.dashboard._records.build_record`) and hands them to the
store in one batch: records are built and stored off the event loop, and the
thread takes the GIL from the loop once per batch rather than once per request.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict, deque
from typing import Any, Final

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from fastprof import _internal_errors
from fastprof.dashboard._records import (
    RequestRecord,
    build_record,
    is_request_root,
    span_entry,
)
from fastprof.dashboard.stores import RequestStore

__all__ = ["Recorder"]

#: Traces with spans waiting for their request's span to end.
MAX_PENDING_TRACES: Final = 2048
#: Spans waiting per trace.
MAX_PENDING_SPANS: Final = 256
#: Spans waiting in all (spans of no request, e.g. a background job's, wait here until evicted).
MAX_PENDING_TOTAL: Final = 20_000
#: Finished requests remembered for spans that end after them.
MAX_RECENT: Final = 1024

WRITER_THREAD_NAME: Final = "fastprof-dashboard-writer"


class _Recent:
    __slots__ = ("ids", "key", "origin")

    def __init__(self, key: str, ids: set[int], origin: int) -> None:
        self.key = key
        self.ids = ids
        self.origin = origin


class Recorder(SpanProcessor):
    """Keeps the spans of recent requests and writes them to a store, in batches.

    Add it to the SDK tracer provider that fastprof's spans go to::

        provider.add_span_processor(dashboard.span_processor)
    """

    def __init__(
        self,
        store: RequestStore,
        *,
        slow_s: float,
        exclude: re.Pattern[str] | None,
        max_queue: int,
        flush_interval_s: float,
    ) -> None:
        self.store = store
        self.slow_s = slow_s
        self._exclude = exclude
        self._max_queue = max_queue
        self._interval = flush_interval_s
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._pending_count = 0
        self._recent: OrderedDict[int, list[_Recent]] = OrderedDict()
        # (root, descendants) of a finished request, or (request key, origin, late span).
        self._queue: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False
        self._flush_requests: list[threading.Event] = []
        self.dropped = 0
        self.spans_dropped = 0
        self.recorded = 0
        self.failed = 0

    # -- SpanProcessor -------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._on_end(span)
        except Exception as exc:  # never into the application
            _internal_errors.report("dashboard.record", exc)

    def _on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None:
            return
        trace_id = context.trace_id
        parent = span.parent
        with self._lock:
            if parent is not None and not parent.is_remote:
                recent = self._recent.get(trace_id)
                if recent is not None:
                    for request in recent:
                        if parent.span_id in request.ids:
                            request.ids.add(context.span_id)
                            self._enqueue((request.key, request.origin, span))
                            return
            if not is_request_root(span):
                pending = self._pending.get(trace_id)
                if pending is None:
                    pending = self._pending[trace_id] = []
                if len(pending) >= MAX_PENDING_SPANS:
                    self.spans_dropped += 1
                    return
                pending.append(span)
                self._pending_count += 1
                while (
                    len(self._pending) > MAX_PENDING_TRACES
                    or self._pending_count > MAX_PENDING_TOTAL
                ):
                    _, evicted = self._pending.popitem(last=False)
                    self._pending_count -= len(evicted)
                    self.spans_dropped += len(evicted)
                return
            mine, ids = self._descendants(trace_id, context.span_id)
            if self._exclude is not None:
                path = (span.attributes or {}).get("url.path")
                if isinstance(path, str) and self._exclude.search(path):
                    return
            recent_list = self._recent.get(trace_id)
            if recent_list is None:
                recent_list = self._recent[trace_id] = []
                if len(self._recent) > MAX_RECENT:
                    self._recent.popitem(last=False)
            if len(recent_list) < 16:
                key = format(context.span_id, "016x")
                recent_list.append(_Recent(key, ids, span.start_time or 0))
            self._enqueue((span, mine))

    def _descendants(self, trace_id: int, root_id: int) -> tuple[list[ReadableSpan], set[int]]:
        """Take the root's descendants out of the trace's pending spans (lock held)."""
        pending = self._pending.pop(trace_id, None)
        ids = {root_id}
        if not pending:
            return [], ids
        self._pending_count -= len(pending)
        mine: list[ReadableSpan] = []
        rest = pending
        while rest:
            # Children usually end before their parent: scanning from the last span
            # to end finds a parent before its children, so one pass is the norm.
            left: list[ReadableSpan] = []
            for span in reversed(rest):
                parent = span.parent
                context = span.context
                if parent is not None and context is not None and parent.span_id in ids:
                    ids.add(context.span_id)
                    mine.append(span)
                else:
                    left.append(span)
            if len(left) == len(rest):
                break
            left.reverse()
            rest = left
        if rest:
            self._pending[trace_id] = rest  # another request of the same trace
            self._pending_count += len(rest)
        return mine, ids

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        if self._closed:
            return
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        self._queue.append(item)
        self._ensure_thread()

    def shutdown(self) -> None:
        self.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.flush(timeout_millis / 1000)

    # -- writer thread ---------------------------------------------------------------

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            return
        # First request, or a forked child (which inherits no thread). Lock held.
        self._pid = os.getpid()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=WRITER_THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            with self._lock:
                waiters, self._flush_requests = self._flush_requests, []
                closed = self._closed
            self._write_batch()
            for waiter in waiters:
                waiter.set()
            if closed:
                return

    def _write_batch(self) -> None:
        queue = self._queue
        records: dict[str, RequestRecord] = {}
        late: list[tuple[str, list[Any]]] = []
        while queue:
            item = queue.popleft()
            try:
                if len(item) == 2:
                    record = build_record(item[0], item[1], slow_s=self.slow_s)
                    if record is not None:
                        records[record.key] = record
                else:
                    key, origin, span = item
                    entry = span_entry(span, origin)
                    found = records.get(key)
                    if found is not None:
                        found.add_late_span(entry)
                    else:
                        late.append((key, entry))
            except Exception as exc:
                self.failed += 1
                _internal_errors.report("dashboard.build", exc)
        if not records and not late:
            return
        try:
            self.store.add(list(records.values()), late)
            self.recorded += len(records)
        except Exception as exc:
            self.failed += len(records)
            _internal_errors.report("dashboard.store", exc)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is stored (not from the event loop)."""
        done = threading.Event()
        with self._lock:
            self._ensure_thread()
            self._flush_requests.append(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Store what is queued and stop the writer thread."""
        with self._lock:
            thread = self._thread
            self._closed = True
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._wake.set()
            thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            pending = self._pending_count
        return {
            "recorded": self.recorded,
            "dropped": self.dropped,
            "spans_dropped": self.spans_dropped,
            "failed": self.failed,
            "queued": len(self._queue),
            "pending_spans": pending,
        }
