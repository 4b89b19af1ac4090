"""One request's dependency span tree: nodes, their spans, and the runs of dependency code.

FastAPI resolves a dependency and calls it in two separate steps: the solver
resolves it (and its own sub-dependencies), returns, and only then is the
callable called. fastprof's span for a dependency starts when resolving starts,
so the node made by the solver hook has to reach the wrapper that FastAPI calls
next. That is the **pending hand-off**:

* :func:`leave_solve` leaves the resolved node in :attr:`Tracker.pending`;
* the wrapper called next (:func:`begin_call`) *claims* it when it is the same
  callable (``node.info is info``);
* anything else that happens first (another solve, another wrapper, the end of
  the request) *settles* it with :func:`settle_pending`: FastAPI did not call
  it, so it was served from FastAPI's per-request cache.

Spans are never attached across an ``await``/``yield`` boundary: each run of
dependency code attaches its span as the current one and detaches it in the
same thread and task, so spans opened inside a dependency (database, HTTP
client) become its children.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from starlette.exceptions import HTTPException

from fastprof import _internal_errors
from fastprof._context import RequestState, Timing
from fastprof._otel import attach_context, current_context, detach_context, error_type
from fastprof._records import CaptureBuffer, Record
from fastprof.attributes import CACHE_HIT, CACHE_HIT_EVENT, THREADPOOL_WAIT_S
from fastprof.dependencies._calls import CallInfo
from fastprof.hooks import run_in_worker

__all__ = [
    "Node",
    "Tracker",
    "active",
    "attach_node",
    "begin_call",
    "begin_teardown",
    "call_in_worker",
    "end_call",
    "end_unconsumed",
    "ensure_record",
    "ensure_span",
    "leave_solve",
    "record_error",
    "settle_pending",
    "start_span",
]


class Tracker:
    """Per-request dependency bookkeeping (only for requests whose span records)."""

    __slots__ = (
        "current",
        "epoch_offset",
        "marked_only",
        "max_spans",
        "pending",
        "phases",
        "recording",
        "records",
        "server_ctx",
        "spans",
        "spans_dropped",
        "spans_on",
        "state",
        "token",
        "tracer",
    )

    def __init__(
        self,
        tracer: trace.Tracer,
        max_spans: int,
        state: RequestState,
        marked_only: bool,
        recording: bool = True,
    ) -> None:
        #: Emit fastprof phase spans (no native operation span around the solver).
        self.phases = False
        self.tracer = tracer
        self.max_spans = max_spans
        self.state = state
        self.marked_only = marked_only
        #: A dependency resolved by the solver and not yet called: the pending
        #: hand-off (see the module docstring). At most one at a time.
        self.pending: Node | None = None
        #: Dependency spans started (setup and teardown) and refused by the cap.
        self.spans = 0
        self.spans_dropped = 0
        #: ``False`` for a timings-only tracker (an unsampled request, no capture records):
        #: no span or record work at all.
        self.spans_on = max_spans > 0
        self.current: Node | None = None  # the dependant being solved
        #: Add to ``perf_counter_ns`` readings for span times (read only when the
        #: request's span records: a timings-only tracker has no span).
        self.epoch_offset = time.time_ns() - time.perf_counter_ns() if recording else 0
        #: The request's span records: phase spans, FastAPI's native span checks.
        self.recording = recording
        self.server_ctx: Context | None = None
        self.token: Any = None
        #: An unsampled request the slow-request capture follows: its nodes get
        #: cheap :class:`~fastprof._records.Record` objects instead of spans.
        self.records: CaptureBuffer | None = None


    def release(self) -> None:
        """The request is over: drop the references to its state and nodes.

        A copy of the request's context (uvicorn's keep-alive timer) can keep the
        tracker alive after the request (see ``RequestState._release``).
        """
        self.current = self.pending = None
        self.server_ctx = None


class Node:
    """One dependency (or the root being solved) in one request."""

    __slots__ = (
        "called_ns",
        "ctx",
        "dropped",
        "info",
        "mirror",
        "parent",
        "prev_operation",
        "prev_span",
        "ready_ns",
        "record",
        "span",
        "span_ctx",
        "start_ns",
        "token",
        "tracker",
    )

    def __init__(
        self, tracker: Tracker, info: CallInfo | None, parent: Node | None, ctx: Context
    ) -> None:
        self.span_ctx: Context | None = None  # ctx with this node's span current
        self.tracker = tracker
        self.info = info  # None for the root, or a dependency fastprof does not time
        self.parent = parent
        self.ctx = ctx
        self.start_ns = time.perf_counter_ns()
        self.ready_ns = 0
        self.called_ns = 0
        self.span: Span | None = None
        self.dropped = False  # the cap refused its span
        self.mirror: Any = None
        self.token: Any = None
        self.prev_operation: str | None = None
        self.prev_span: Any = None
        self.record: Record | None = None  # the capture's record, instead of a span


#: The tracker of the current request, set only when its span is recording.
active: ContextVar[Tracker | None] = ContextVar("fastprof_dependencies", default=None)


def take_span_slot(tracker: Tracker) -> bool:
    """Count one more dependency span against the cap; ``False`` (counted as dropped) past it."""
    if tracker.spans >= tracker.max_spans:
        tracker.spans_dropped += 1
        return False
    tracker.spans += 1
    return True


def ensure_span(node: Node) -> Span | None:
    """The node's span, created on first need (with its real start time).

    The context with the span current (``span_ctx``) is built with it: every
    dependency span is attached while its code runs, and is its children's parent.
    """
    span = node.span
    if span is None and not node.dropped:
        info = node.info
        if info is None:
            return None
        if node.tracker.records is not None:
            ensure_record(node)
            return None
        parent_ctx = parent_context(node)  # parents first: they take their slots first
        if not take_span_slot(node.tracker):
            node.dropped = True
            return None
        span = node.span = start_span(
            node.tracker, info.span_name, parent_ctx, node.start_ns, info.attributes
        )
        node.span_ctx = trace.set_span_in_context(span, node.ctx)
    return span


def ensure_record(node: Node) -> Record | None:
    """The node's capture record, created on first need (parents first, like spans)."""
    record = node.record
    info = node.info
    if record is None and info is not None and not node.dropped:
        tracker = node.tracker
        parent = node.parent
        parent_record = None
        while parent is not None:
            parent_record = parent.record or ensure_record(parent)
            if parent_record is not None:
                break
            parent = parent.parent
        buffer = tracker.records
        assert buffer is not None
        record = node.record = buffer.add(
            info.span_name, info.attributes, node.start_ns + tracker.epoch_offset, parent_record
        )
        if record is None:
            node.dropped = True
    return record


def parent_context(node: Node) -> Context:
    parent = node.parent
    while parent is not None:
        ctx = parent.span_ctx
        if ctx is not None:
            return ctx
        if ensure_span(parent) is not None:
            return parent.span_ctx  # type: ignore[return-value]
        parent = parent.parent
    return node.ctx


def end_unconsumed(node: Node, cached: bool) -> None:
    """Close a dependency FastAPI resolved but did not call (cache hit, invalid input)."""
    span = node.span
    info = node.info
    record = node.record
    if record is not None:
        if cached:
            record.set_attribute(CACHE_HIT, True)
        record.end((node.ready_ns or time.perf_counter_ns()) + node.tracker.epoch_offset)
    elif span is not None:
        if cached:
            span.set_attribute(CACHE_HIT, True)
        span.end(end_time=(node.ready_ns or time.perf_counter_ns()) + node.tracker.epoch_offset)
    elif cached and info is not None and node.tracker.records is not None:
        parent = node.parent
        holder = ensure_record(parent) if parent is not None else None
        (holder or node.tracker.records.root).add_event(
            CACHE_HIT_EVENT,
            {"code.function.name": info.code_name},
            (node.ready_ns or time.perf_counter_ns()) + node.tracker.epoch_offset,
        )
    elif cached and info is not None and node.tracker.spans_on:
        # Visible without a second duration: an event on the span of what needed it.
        parent = node.parent
        target = ensure_span(parent) if parent is not None else None
        if target is None:
            target = trace.get_current_span(node.ctx)
        if target.is_recording():
            target.add_event(
                CACHE_HIT_EVENT,
                {"code.function.name": info.code_name},
                timestamp=(node.ready_ns or time.perf_counter_ns()) + node.tracker.epoch_offset,
            )


def settle_pending(tracker: Tracker) -> None:
    """End the pending hand-off: the resolved dependency was not called (a cache hit)."""
    node = tracker.pending
    if node is not None:
        tracker.pending = None
        end_unconsumed(node, cached=True)



def start_span(
    tracker: Tracker,
    name: str,
    ctx: Context,
    start_ns: int,
    attributes: dict[str, Any],
    links: list[Link] | None = None,
) -> Span:
    """Start a dependency, teardown or phase span at ``start_ns`` (callers count the cap)."""
    return tracker.tracer.start_span(
        name,
        context=ctx,
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        links=links,
        start_time=start_ns + tracker.epoch_offset,
    )



def leave_solve(tracker: Tracker, node: Node, result: Any) -> None:
    """The solver resolved ``node``: hand it off to the wrapper FastAPI calls next."""
    if tracker.pending is not None:
        settle_pending(tracker)
    if node.info is None:
        if node.parent is None:
            if node.span:
                node.span.end()  # the fastprof.dependencies phase
            elif node.record is not None:
                node.record.end(time.perf_counter_ns() + node.tracker.epoch_offset)
        return
    node.ready_ns = time.perf_counter_ns()
    if result.errors:
        end_unconsumed(node, cached=False)  # invalid input: FastAPI will not call it
    else:
        tracker.pending = node  # the hand-off: the wrapper called next claims it



# ------------------------------------------------------------------ running dependency code


def begin_call(tracker: Tracker, info: CallInfo, on_loop: bool) -> Node | None:
    """Start timing one run of a dependency (called by its wrapper): its span is
    started if needed and attached as the current one."""
    try:
        node = tracker.pending
        if node is not None and node.info is info:
            tracker.pending = None
        else:
            if node is not None:
                settle_pending(tracker)
            parent = tracker.current
            ctx = parent.ctx if parent is not None else current_context()
            node = Node(tracker, info, parent, ctx)
        node.called_ns = time.perf_counter_ns()
        if node.span is None and not node.dropped and tracker.spans_on:
            ensure_span(node)
    except Exception as exc:
        _internal_errors.report("dependencies.begin", exc)
        return None
    attach_node(node, on_loop)
    return node


def attach_node(node: Node, on_loop: bool) -> None:
    try:
        ctx = node.span_ctx
        if ctx is not None:
            node.token = attach_context(ctx)
        if on_loop and node.info is not None:
            state = node.tracker.state
            node.prev_operation = state.current_operation
            state.current_operation = node.info.name
            node.prev_span = state._operation_span
            state._operation_span = node.span if node.span is not None else node.record
    except Exception as exc:
        _internal_errors.report("dependencies.attach", exc)


def end_call(node: Node, on_loop: bool, error: BaseException | None, kind: str) -> None:
    """End one run of dependency code: detach its span, record the timing, end the span."""
    try:
        token = node.token
        if token is not None:
            node.token = None
            try:
                detach_context(token)
            except Exception as exc:  # a token from another context: report, go on
                _internal_errors.report("dependencies.detach", exc)
        if on_loop:
            state = node.tracker.state
            state.current_operation = node.prev_operation
            ended, state._operation_span = state._operation_span, node.prev_span
            if ended is not None:
                # Before the span ends: a block's event may go on it.
                for hook in state._operation_hooks:
                    try:
                        hook.on_operation_end(state, ended)
                    except Exception as exc:
                        _internal_errors.report("hook.on_operation_end", exc)
    except Exception as exc:
        _internal_errors.report("dependencies.detach", exc)
    try:
        end = time.perf_counter_ns()
        info = node.info
        assert info is not None
        wait_s = 0.0
        if not on_loop and node.ready_ns and kind == "dependency":
            wait_s = max(0, node.called_ns - node.ready_ns) / 1e9
        tracker = node.tracker
        tracker.state.add_timing(Timing(info.name, kind, (end - node.called_ns) / 1e9, wait_s))
        span: Any = node.span
        if span is None:
            span = node.record
        if span is not None:
            if wait_s:
                span.set_attribute(THREADPOOL_WAIT_S, wait_s)
            if error is not None:
                record_error(span, error)
            span.end(end_time=end + tracker.epoch_offset)
    except Exception as exc:
        _internal_errors.report("dependencies.end", exc)


def record_error(span: Span | Record, error: BaseException) -> None:
    if isinstance(error, HTTPException):
        span.set_attribute("http.response.status_code", error.status_code)
        return
    span.set_attribute("error.type", error_type(error))
    if isinstance(error, Exception):
        span.record_exception(error, escaped=True)
        span.set_status(Status(StatusCode.ERROR))


def call_in_worker(node: Node, step: Callable[[], Any]) -> Any:
    return run_in_worker(node.tracker.state, step)


def begin_teardown(setup: Node | None) -> Node | None:
    if setup is None:
        return None
    try:
        tracker = setup.tracker
        info = setup.info
        assert info is not None
        node = Node(tracker, info, None, setup.ctx)
        node.called_ns = node.start_ns
        span = None
        records = tracker.records
        if records is not None:
            node.record = records.add(
                info.teardown_name,
                info.teardown_attributes,
                node.start_ns + tracker.epoch_offset,
                None,
                setup.record,
            )
        elif take_span_slot(tracker):  # the parent context and link only for a span
            if tracker.server_ctx is None:
                tracker.server_ctx = trace.set_span_in_context(tracker.state.span, setup.ctx)
            links = [Link(setup.span.get_span_context())] if setup.span is not None else None
            span = start_span(
                tracker,
                info.teardown_name,
                tracker.server_ctx,
                node.start_ns,
                info.teardown_attributes,
                links,
            )
        node.span = span
        if span is not None:
            node.span_ctx = trace.set_span_in_context(span, node.ctx)
        return node
    except Exception as exc:
        _internal_errors.report("dependencies.teardown_begin", exc)
        return None

