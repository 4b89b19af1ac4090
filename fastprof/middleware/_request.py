"""One HTTP request through :class:`~fastprof.FastprofMiddleware`: its span, context and hooks.

:func:`start_request` makes the one decision per request: which SERVER span
(fastprof's own, dropped without the SDK, or another layer's), and which shape
of request serves it:

* :class:`LeanRequest`: an unsampled request that no hook needs; only its span's
  context is current while the app runs, and it is undone at the end;
* :class:`WatchedRequest`: a lean request whose status and end are noted (one
  ``send`` wrapper), so the hooks that only want to hear of a slow unsampled
  request (the slow-request log with ``dependencies="traced"``) are told of it;
* :class:`UnsampledRequest`: an unsampled request some hook wants (the
  slow-request log follows every one); it wraps ``send`` to see the status and
  the end of the response, and runs the hooks: nothing else;
* :class:`TracedRequest`: a recording span (or an unsampled request the
  slow-request capture records); it wraps ``send`` (and ``receive`` for a
  recording span), runs the hooks and annotates and ends the span.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextvars import Token
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastprof import _internal_errors
from fastprof._context import SCOPE_KEY, RequestState, current_request
from fastprof._http import (
    SPAN_METHODS,
    extract_context,
    method_attributes,
    request_attributes,
    truncate,
)
from fastprof._otel import (
    attach_context,
    context_with_span,
    current_context,
    detach_context,
    error_type,
    foreign_server_span,
    with_ambient,
)
from fastprof._records import Record
from fastprof._routes import resolve_route
from fastprof.attributes import CLIENT_DISCONNECTED, REQUEST_ID, TIME_TO_RESPONSE_START_S
from fastprof.hooks import HookSet, RequestHooks
from fastprof.middleware._settings import Settings

__all__ = ["LeanRequest", "TracedRequest", "UnsampledRequest", "WatchedRequest", "start_request"]

_perf_counter_ns = time.perf_counter_ns


def start_request(
    settings: Settings, scope: Scope
) -> LeanRequest | UnsampledRequest | TracedRequest:
    """Start tracing a request in the cheapest shape that serves it."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
    path = scope.get("path", "")
    ambient = current_context()
    parent: Context | None = None
    fast = settings.drop_fast_path
    dropped = None
    if fast is not None and not ambient and "fastapi.telemetry" not in scope:
        parent = extract_context(headers)
        span = fast(parent)
        if span is not None:
            # Unsampled, and fastprof's own span (the usual case in production).
            # Positional: a class call with keywords builds a dict.
            state = RequestState(
                span,
                scope.get("method", "GET"),
                path,
                headers,
                settings.request_id_header,
                _route_resolver(scope, path),
            )
            gates = settings.unsampled_gates
            if settings.lean_unsampled or (
                gates is not None and not (gates and _wanted(gates, scope))
            ):
                scope[SCOPE_KEY] = state
                return (WatchedRequest if settings.unsampled_hooks.watchers else LeanRequest)(
                    state,
                    current_request.set(state),
                    attach_context(context_with_span(span, parent)),
                )
            hooks = settings.unsampled_hooks
            if hooks.skippable:
                hooks = hooks.for_request(scope)
            if hooks.worker:
                state._worker_hooks = hooks.worker
            if hooks.operation:
                state._operation_hooks = hooks.operation
            scope[SCOPE_KEY] = state
            published = current_request.set(state)
            attached = attach_context(context_with_span(span, parent))
            return _unsampled(settings, scope, state, hooks, True, published, attached)
        # else: the fast path can't serve it; the span below reuses ``parent``.
        dropped = span
    method = scope.get("method", "GET")
    span_method = SPAN_METHODS.get(method, "HTTP")
    span, owned, recording, ctx = open_server_span(
        settings, scope, headers, span_method, ambient, parent, dropped
    )
    state = RequestState(
        span, method, path, headers, settings.request_id_header, _route_resolver(scope, path)
    )
    hooks, state_token, context_token = enter(
        settings, scope, headers, state, owned, recording, ctx, method
    )
    if not recording:
        if settings.lean_unsampled:
            return LeanRequest(state, state_token, context_token)
        return _unsampled(settings, scope, state, hooks, owned, state_token, context_token)
    return TracedRequest(
        settings, state, hooks, owned, recording, span_method, state_token, context_token
    )


def _unsampled(
    settings: Settings,
    scope: Scope,
    state: RequestState,
    hooks: HookSet,
    owned: bool,
    state_token: Token[Any],
    context_token: Token[Any] | None,
) -> UnsampledRequest | TracedRequest:
    """An unsampled request some hook wants, published: run the start phase and pick
    its shape (a traced one when the slow-request capture records it)."""
    start_phase(hooks, state, scope)
    if state._capture is None:
        return UnsampledRequest(settings, state, hooks, owned, state_token, context_token)
    traced = TracedRequest(
        settings,
        state,
        hooks,
        owned,
        False,
        SPAN_METHODS.get(state.method, "HTTP"),
        state_token,
        context_token,
    )
    traced._started = True
    return traced


def enter(
    settings: Settings,
    scope: Scope,
    headers: list[tuple[bytes, bytes]],
    state: RequestState,
    owned: bool,
    recording: bool,
    ctx: Context | None,
    method: str | None,
) -> tuple[HookSet, Token[Any], Token[Any] | None]:
    """Annotate a recording span with the request's attributes, publish ``state``
    (scope and ``current_request``) and attach ``ctx``: ``(hooks, tokens)``.

    ``method``: the HTTP method for the semantic-convention attributes (``None``
    for a websocket session).
    """
    if recording:
        hooks = settings.sampled_hooks
        # One batch: every set_attribute call on an SDK span takes its lock.
        attrs = (
            request_attributes(
                scope,
                headers,
                method_attributes(method) if method is not None else {},
                settings.max_attribute_length,
                settings.query,
                settings.sensitive_keys,
            )
            if owned
            else {}
        )
        attrs[REQUEST_ID] = state.request_id
        state.span.set_attributes(attrs)
    else:
        hooks = settings.unsampled_hooks
        if hooks.skippable:
            hooks = hooks.for_request(scope)
    if hooks.worker:
        state._worker_hooks = hooks.worker
    if hooks.operation:
        state._operation_hooks = hooks.operation
    scope[SCOPE_KEY] = state
    state_token = current_request.set(state)
    context_token = attach_context(ctx) if ctx is not None else None
    return hooks, state_token, context_token


def open_server_span(
    settings: Settings,
    scope: Scope,
    headers: list[tuple[bytes, bytes]],
    name: str,
    ambient: Context,
    parent: Context | None,
    dropped: trace.Span | None = None,
) -> tuple[trace.Span, bool, bool, Context | None]:
    """``(span, owned, recording, context to attach)`` of a request or websocket session.

    The SERVER span another layer opened for it, else one of fastprof's own
    (dropped without the SDK when the drop fast path can serve it). ``parent``:
    the context already extracted from the headers, and ``dropped``: the span the
    drop fast path made from it, if the caller did.
    """
    # The usual case (no native telemetry, an empty context from the server)
    # skips the search for another layer's SERVER span.
    span = foreign_server_span(scope, ambient) if ambient or "fastapi.telemetry" in scope else None
    if span is not None:
        return span, False, span.is_recording(), None
    if parent is None:
        parent = extract_context(headers)
        drop = settings.drop_fast_path
        span = drop(parent) if drop is not None else None
    else:
        span = dropped
    if span is None:
        span = settings.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        recording = span.is_recording()
    else:
        recording = False  # the fast path only makes dropped spans
    # The span's parent is never ambient (a leak from another request), but the
    # app keeps every other value of its context (baggage, FastAPI's telemetry data).
    ctx = context_with_span(span, with_ambient(parent, ambient) if ambient else parent)
    return span, True, recording, ctx


def start_phase(hooks: HookSet, state: RequestState, scope: Scope) -> None:
    """``on_request_start`` (in the request's task, before the application runs)."""
    for hook in hooks.start:
        try:
            hook.on_request_start(state, scope)
        except Exception as exc:
            _internal_errors.report("hook.on_request_start", exc)


def end_phase(hooks: tuple[RequestHooks, ...], state: RequestState) -> None:
    """``on_request_end`` of ``hooks``, each guarded."""
    for hook in hooks:
        try:
            hook.on_request_end(state)
        except Exception as exc:
            _internal_errors.report("hook.on_request_end", exc)


def last_message(message_type: str, message: Message, trailers: bool) -> bool:
    """Whether ``message`` (any but ``http.response.start``) is the response's last:
    the body without ``more_body`` (unless trailers follow), the last trailers, or a
    ``pathsend``."""
    if message_type == "http.response.body":
        return not message.get("more_body", False) and not trailers
    if message_type == "http.response.trailers":
        return not message.get("more_trailers", False)
    return message_type == "http.response.pathsend"


class LeanRequest:
    """What a traced request undoes when it ends; all there is to an unsampled
    request that no hook needs."""

    __slots__ = ("_context_token", "_state_token", "state")

    def __init__(
        self, state: RequestState, state_token: Token[Any], context_token: Token[Any] | None
    ) -> None:
        self.state = state
        self._state_token = state_token
        self._context_token = context_token

    def leave(self, scope: Scope) -> None:
        self.state._ended = True
        if self._context_token is not None:
            try:
                detach_context(self._context_token)
            except Exception as exc:  # pragma: no cover - defensive
                _internal_errors.report("context_detach", exc)
        current_request.reset(self._state_token)
        # Break the scope <-> state reference cycle, so the request's objects
        # (FastAPI keeps exit stacks in the scope) are freed now, not by the GC.
        scope.pop(SCOPE_KEY, None)


class WatchedRequest(LeanRequest):
    """A lean request some hooks want to hear of only if it was slow
    (:attr:`~fastprof.RequestHooks.unsampled_end_threshold_s`).

    Its ``send`` notes the status and when the response's last message left;
    :meth:`finish` calls those hooks' ``on_request_end`` when the request took
    at least the shortest of their thresholds, then leaves it. Background tasks
    run after the response and are not counted, as for every other shape.
    """

    __slots__ = ("_send", "_settings", "_trailers")

    def bind(self, settings: Settings, send: Send) -> Send:
        """The ``send`` to give the application (called once, before it runs)."""
        self._settings = settings
        self._send = send
        self._trailers = False
        return self.send

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "http.response.start":
            self.state.status_code = message.get("status")
            self._trailers = bool(message.get("trailers", False))
        elif last_message(message_type, message, self._trailers):
            self.state.end_ns = _perf_counter_ns()
        await self._send(message)

    def finish(self, scope: Scope) -> None:
        """The application returned or raised: tell each hook whose threshold the
        request reached, then leave."""
        state = self.state
        if not state.end_ns:
            state.end_ns = _perf_counter_ns()  # failed, or ended without a response
        took = state.end_ns - state.start_ns
        watchers = self._settings.unsampled_hooks.watchers
        if took >= watchers[0][0]:
            state.finalize_route()
            end_phase(tuple(hook for threshold, hook in watchers if took >= threshold), state)
        self.leave(scope)


class HookedRequest(LeanRequest):
    """A request (or websocket session) whose hooks run: the phases every shape shares."""

    __slots__ = ("_hooks", "_owned", "_recording", "_settings")

    def __init__(
        self,
        settings: Settings,
        state: RequestState,
        hooks: HookSet,
        owned: bool,
        recording: bool,
        state_token: Token[Any],
        context_token: Token[Any] | None,
    ) -> None:
        super().__init__(state, state_token, context_token)
        self._settings = settings
        self._hooks = hooks
        self._owned = owned
        self._recording = recording

    def _start_phase(self, scope: Scope) -> None:
        start_phase(self._hooks, self.state, scope)

    def _end_phases(self, scope: Scope, error: BaseException | None) -> None:
        """``on_response_complete``, then the route and the span's annotations, then
        ``on_request_end``."""
        state = self.state
        for hook in self._hooks.complete:
            try:
                hook.on_response_complete(state)
            except Exception as exc:
                _internal_errors.report("hook.on_response_complete", exc)
        try:
            state.finalize_route()
            self._annotate_end(scope, error)
        except Exception as exc:
            _internal_errors.report("request_end", exc)
        end_phase(self._hooks.end, state)

    def _annotate_end(self, scope: Scope, error: BaseException | None) -> None:
        """Record what is known at the end on the span (or its capture record)."""

    def _response_hooks(self, message: Message) -> None:
        """``http.response.start`` is about to leave: the response request-id header,
        then ``on_response_start``."""
        state = self.state
        response_header = self._settings.response_request_id_header
        if response_header is not None:
            headers = list(message.get("headers", []))
            headers.append((response_header, state.request_id.encode("latin-1")))
            message["headers"] = headers
        for hook in self._hooks.response:
            try:
                hook.on_response_start(state, message)
            except Exception as exc:
                _internal_errors.report("hook.on_response_start", exc)

    def _exit_phase(self, scope: Scope) -> None:
        """``on_app_exit``, then leave the request and release what it held."""
        state = self.state
        for hook in self._hooks.exit:
            try:
                hook.on_app_exit(state)
            except Exception as exc:
                _internal_errors.report("hook.on_app_exit", exc)
        self.leave(scope)
        state._release()


class UnsampledRequest(HookedRequest):
    """An unsampled request some hook wants: the hooks' phases, and nothing a span needs.

    Its ``send`` wrapper notes the status and runs the end phases before the
    response's last message leaves, as :class:`TracedRequest` does; no time to
    first byte, disconnect or annotation (its span does not record). Its start
    phase ran in :func:`start_request`; the middleware drives the rest (the
    application with :meth:`bind`'s ``send``, then :meth:`complete` and
    :meth:`exit`), without a coroutine of its own.
    """

    __slots__ = ("_finished", "_scope", "_send", "_trailers")

    def __init__(
        self,
        settings: Settings,
        state: RequestState,
        hooks: HookSet,
        owned: bool,
        state_token: Token[Any],
        context_token: Token[Any] | None,
    ) -> None:
        super().__init__(settings, state, hooks, owned, False, state_token, context_token)
        self._finished = False
        self._trailers = False

    def bind(self, scope: Scope, send: Send) -> Send:
        """The ``send`` to give the application."""
        self._scope = scope
        self._send = send
        return self.send

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "http.response.start":
            self.state.status_code = message.get("status")
            self._trailers = bool(message.get("trailers", False))
            if self._hooks.response or self._settings.response_request_id_header is not None:
                try:
                    self._response_hooks(message)
                except Exception as exc:
                    _internal_errors.report("response_start", exc)
        elif last_message(message_type, message, self._trailers):
            # Hooks see the request before the last message leaves.
            self.complete(None)
        await self._send(message)

    def complete(self, error: BaseException | None) -> None:
        """The response is complete, or the application failed: the end phases, once."""
        if not self._finished:
            self._finished = True
            self._end_phases(self._scope, error)

    def exit(self, scope: Scope) -> None:
        """The application returned or raised: the end phases if not yet, then
        ``on_app_exit``, leave the request and release what it held."""
        if not self._finished:
            self.complete(None)
        self._exit_phase(scope)


class TracedRequest(HookedRequest):
    """A request whose span records (or that the slow-request capture records): its
    whole span lifecycle."""

    __slots__ = (
        "_completed",
        "_disconnected",
        "_ended",
        "_finished",
        "_receive",
        "_response_started",
        "_scope",
        "_send",
        "_span_method",
        "_started",
        "_trailers",
        "_ttfb_s",
    )

    def __init__(
        self,
        settings: Settings,
        state: RequestState,
        hooks: HookSet,
        owned: bool,
        recording: bool,
        span_method: str,
        state_token: Token[Any],
        context_token: Token[Any] | None,
    ) -> None:
        super().__init__(settings, state, hooks, owned, recording, state_token, context_token)
        self._span_method = span_method
        self._finished = False
        self._ended = False
        self._completed = False
        self._trailers = False
        self._disconnected = False
        self._response_started = False
        self._ttfb_s = -1.0
        #: The start phase already ran (an unsampled request turned traced).
        self._started = False

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._started:
            self._start_phase(scope)
        # The wrappers are bound methods, not closures: a request in flight holds
        # fewer objects for the garbage collector to track.
        self._scope = scope
        self._send = send
        if self._recording:
            # Disconnects are only recorded on a recording span.
            self._receive = receive
            receive = self._wrapped_receive
        try:
            await app(scope, receive, self._wrapped_send)
        except BaseException as exc:
            self._complete(scope, exc)
            self._end_span()
            raise
        else:
            if not self._finished:
                self._complete(scope, None)
            if not self._ended:
                self._end_span()
        finally:
            self._exit_phase(scope)

    async def _wrapped_receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            # Only read when the span is annotated, at the response's last
            # message: a disconnect after it (the usual end of a request) is
            # never recorded; one before it means the client left.
            self._disconnected = True
        return message

    async def _wrapped_send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "http.response.start":
            try:
                self._on_response_start(message)
            except Exception as exc:
                _internal_errors.report("response_start", exc)
            await self._send(message)
            return
        if not last_message(message_type, message, self._trailers):
            await self._send(message)
            return
        # Hooks see the span before the last message leaves: an outer layer
        # (FastAPI native, contrib) ends its span as soon as it passes.
        self._completed = True
        self._complete(self._scope, None)
        try:
            await self._send(message)
        finally:
            self._end_span()

    def _on_response_start(self, message: Message) -> None:
        self._response_started = True
        self._trailers = bool(message.get("trailers", False))
        state = self.state
        state.status_code = message.get("status")
        self._ttfb_s = state.elapsed_s()
        self._response_hooks(message)

    def _complete(self, scope: Scope, error: BaseException | None) -> None:
        """Resolve the route, annotate the span and run ``on_request_end`` hooks, once."""
        if self._finished:
            return
        self._finished = True
        self._end_phases(scope, error)

    def _annotate_end(self, scope: Scope, error: BaseException | None) -> None:
        state = self.state
        if self._recording:
            self._annotate(state.span, error)
        elif state._capture is not None and state._capture.wanted:
            self._annotate_capture(scope, state._capture.root, error)

    def _end_span(self) -> None:
        """End the SERVER span if fastprof owns it, once."""
        if self._owned and not self._ended:
            self._ended = True
            try:
                self.state.span.end()
            except Exception as exc:  # pragma: no cover - SDK failure
                _internal_errors.report("span_end", exc)

    def _annotate_capture(self, scope: Scope, root: Record, error: BaseException | None) -> None:
        """An unsampled request the slow-request capture exports: its SERVER span's
        record gets what a recording span fastprof owns would have (even when the
        dropped span was another layer's: the record is fastprof's)."""
        settings = self._settings
        method = self.state.method
        attrs = request_attributes(
            scope,
            scope.get("headers") or [],
            method_attributes(method),
            settings.max_attribute_length,
            settings.query,
            settings.sensitive_keys,
        )
        attrs[REQUEST_ID] = self.state.request_id
        root.set_attributes(attrs)
        self._annotate(root, error, owned=True, span_method=SPAN_METHODS.get(method, "HTTP"))

    def _annotate(
        self,
        span: trace.Span | Record,
        error: BaseException | None,
        owned: bool | None = None,
        span_method: str | None = None,
    ) -> None:
        state = self.state
        limit = self._settings.max_attribute_length
        attrs: dict[str, Any] = {}
        if self._ttfb_s >= 0:
            attrs[TIME_TO_RESPONSE_START_S] = self._ttfb_s
        if self._disconnected:
            attrs[CLIENT_DISCONNECTED] = True
        if not (self._owned if owned is None else owned):
            span.set_attributes(attrs)
            return
        status = state.status_code
        if error is not None and not self._response_started and isinstance(error, Exception):
            # Starlette's ServerErrorMiddleware (outside us) turns it into a 500.
            status = 500
        if status is not None:
            attrs["http.response.status_code"] = status
        if state.route is not None:
            route = truncate(state.route, limit)
            attrs["http.route"] = route
            span.update_name(f"{span_method or self._span_method} {route}")
        failure: str | None = None
        if error is not None:
            failure = error_type(error)
            if isinstance(error, Exception):
                span.record_exception(error, escaped=True)
        elif status is not None and status >= 500:
            failure = str(status)
        elif not self._completed and not self._disconnected:
            failure = "incomplete_response"
        if failure is not None:
            attrs["error.type"] = failure
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attrs)


def _route_resolver(scope: Scope, path: str) -> Callable[[], str | None]:
    # Routing mutates the scope: resolve from what it was on the way in.
    return functools.partial(
        _resolve_route_safely, scope, scope.get("app"), scope.get("root_path", ""), path
    )


def _resolve_route_safely(
    scope: Scope, entry_app: Any, entry_root_path: str, entry_path: str
) -> str | None:
    try:
        return resolve_route(scope, entry_app, entry_root_path, entry_path)
    except Exception as exc:
        _internal_errors.report("request_end", exc)
        return None


def _wanted(gates: tuple[Callable[[Scope], bool], ...], scope: Scope) -> bool:
    """Whether a hook wants this unsampled request (a failing check counts as yes)."""
    for wants in gates:
        try:
            if wants(scope):
                return True
        except Exception as exc:
            _internal_errors.report("hook.wants_unsampled", exc)
            return True
    return False
