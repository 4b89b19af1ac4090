"""The pure-ASGI middleware that owns (or enriches) the SERVER span of a request."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Iterable
from contextvars import Token
from typing import Any, Final

from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastprof import _internal_errors
from fastprof._context import SCOPE_KEY, RequestState, current_request
from fastprof._http import (
    SENSITIVE_QUERY_KEYS,
    SPAN_METHODS,
    QueryPolicy,
    extract_context,
    find_header,
    method_attributes,
    redact_query,
    server_address,
    truncate,
)
from fastprof._options import check_header_name, check_int
from fastprof._otel import (
    TRACER_NAME,
    attach_context,
    context_with_span,
    current_context,
    detach_context,
    error_type,
    fastprof_tracer,
)
from fastprof._routes import resolve_route
from fastprof._sampling import drop_fast_path

__all__ = ["ExcludeOption", "FastprofMiddleware", "RequestHooks"]

ExcludeOption = Iterable[str] | str | re.Pattern[str] | Callable[[Scope], bool] | None

_QUERY_POLICIES: Final = ("redact_sensitive", "redact_all", "omit")


class RequestHooks:
    """Extension points the middleware calls for each traced request.

    Components (profiling, loop monitoring, slow-request log) subclass this and
    override what they need. Every call is guarded: a hook that raises is
    reported and skipped, never propagated into the request.
    """

    #: Whether the hook is called for requests whose span is not recording
    #: (unsampled). A hook that sets it to ``False`` (class or instance
    #: attribute, read once when the middleware is built) is skipped for them,
    #: and an unsampled request that no hook needs costs fastprof no more than
    #: its span and context.
    unsampled_requests: bool = True

    #: ``False`` when the component has nothing to do (e.g. profiling with no
    #: trigger configured, dependency spans without a supported FastAPI): the
    #: middleware then never calls it. Read once when the middleware is built.
    enabled: bool = True

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        """Called in the request's task before the application runs."""

    def on_response_start(self, state: RequestState, message: Message) -> None:
        """Called before ``http.response.start`` is sent; may append headers."""

    def on_request_end(self, state: RequestState) -> None:
        """Called once the response is complete (or failed), before the span ends.

        Usually in the request's task; with Starlette's streaming responses on
        ASGI spec < 2.4 the last body message is sent from a child task.
        """

    def on_app_exit(self, state: RequestState) -> None:
        """Called in the request's task when the application call returns or raises.

        This is after background tasks and, on FastAPI >= 0.118, after
        yield-dependency teardown; a SERVER span fastprof owns has already ended.
        """


def _compile_exclude(exclude: ExcludeOption) -> Callable[[Scope], bool] | None:
    if exclude is None:
        return None
    if callable(exclude) and not isinstance(exclude, re.Pattern):
        return exclude
    if isinstance(exclude, re.Pattern):
        pattern = exclude
        return lambda scope: pattern.search(scope.get("path", "")) is not None
    if isinstance(exclude, str):
        try:
            pattern = re.compile(exclude)
        except re.error as exc:
            raise ValueError(f"exclude: invalid regular expression {exclude!r}: {exc}") from exc
        return lambda scope: pattern.search(scope.get("path", "")) is not None
    try:
        paths = frozenset(exclude)
    except TypeError:
        raise ValueError(
            "exclude: expected a list of paths, a regex (str or re.Pattern) or a callable "
            f"taking the ASGI scope, got {type(exclude).__name__}"
        ) from None
    if not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise ValueError("exclude: every path in the list must be a string starting with '/'")
    return lambda scope: scope.get("path") in paths


class FastprofMiddleware:
    """Trace every HTTP request with one OpenTelemetry SERVER span.

    Usage::

        app.add_middleware(FastprofMiddleware)            # Starlette / FastAPI
        app = FastprofMiddleware(app, tracer_provider=tp)  # any ASGI app

    When another layer already owns the request's SERVER span (FastAPI's native
    telemetry, OpenTelemetry's contrib ASGI/FastAPI instrumentation), fastprof
    enriches that span instead of creating a second one.

    Lifespan and websocket scopes pass through untouched.

    Args:
        app: The ASGI application to wrap.
        tracer_provider: Provider for fastprof's spans; defaults to the global one.
        exclude: Paths not to trace: a list of exact paths, a regular expression
            searched in the path, or a callable receiving the ASGI scope.
        request_id_header: Incoming header holding a request id to reuse (validated:
            1-128 characters of ``[A-Za-z0-9._:-]``); ``None`` always generates one.
        response_request_id_header: If set, the request id is returned in this
            response header. Off by default: fastprof changes no response.
        query: How ``url.query`` is recorded: ``"redact_sensitive"`` (values of
            credential-like keys become ``REDACTED``), ``"redact_all"`` or ``"omit"``.
        redact_query_keys: More query parameter names whose values are redacted
            under ``"redact_sensitive"`` (case-insensitive).
        max_attribute_length: Longest string fastprof records in an attribute.
        hooks: Extra per-request components (see :class:`RequestHooks`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer_provider: TracerProvider | None = None,
        exclude: ExcludeOption = None,
        request_id_header: str | None = "x-request-id",
        response_request_id_header: str | None = None,
        query: QueryPolicy = "redact_sensitive",
        redact_query_keys: Iterable[str] = (),
        max_attribute_length: int = 2048,
        hooks: Iterable[RequestHooks] = (),
    ) -> None:
        tracer = fastprof_tracer(tracer_provider)
        if query not in _QUERY_POLICIES:
            raise ValueError(f"query: expected one of {_QUERY_POLICIES}, got {query!r}")
        check_int("max_attribute_length", max_attribute_length, 16, 65536)
        request_id_key = check_header_name("request_id_header", request_id_header)
        response_id_key = check_header_name(
            "response_request_id_header", response_request_id_header
        )
        hooks = tuple(hooks)
        for hook in hooks:
            if not isinstance(hook, RequestHooks):
                raise ValueError(f"hooks: {hook!r} is not a fastprof RequestHooks")
        hooks = tuple(h for h in hooks if h.enabled)
        self.app = app
        self._tracer = tracer
        self._drop_fast_path = drop_fast_path(tracer)
        self._exclude = _compile_exclude(exclude)
        self._request_id_header = request_id_key
        self._response_request_id_header = response_id_key
        self._query: QueryPolicy = query
        if isinstance(redact_query_keys, str) or not all(
            isinstance(k, str) for k in redact_query_keys
        ):
            raise ValueError("redact_query_keys: expected a list of query parameter names")
        self._sensitive_keys = SENSITIVE_QUERY_KEYS | {k.lower() for k in redact_query_keys}
        self._limit = max_attribute_length
        self._sampled_hooks = _HookSet(hooks)
        self._unsampled_hooks = _HookSet(
            tuple(h for h in hooks if getattr(h, "unsampled_requests", True))
        )
        # An unsampled request that no hook needs and whose response fastprof
        # doesn't change runs the app with the send/receive callables untouched.
        self._lean_unsampled = (
            self._unsampled_hooks.empty and self._response_request_id_header is None
        )
        # Dropped spans built without the SDK, for requests that take the lean path.
        self._lean_fast_path = self._drop_fast_path if self._lean_unsampled else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return
        if self._exclude is not None:
            try:
                excluded = self._exclude(scope)
            except Exception as exc:
                _internal_errors.report("exclude", exc)
                excluded = False
            if excluded:
                await self.app(scope, receive, send)
                return
        try:
            request = self._enter(scope)
        except Exception as exc:
            _internal_errors.report("request_start", exc)
            await self.app(scope, receive, send)
            return
        if type(request) is _Request and not request.lean:
            await request.run(self.app, scope, receive, send)
            return
        # An unsampled request no hook needs: only the span's context is current.
        try:
            await self.app(scope, receive, send)
        finally:
            request.leave(scope)

    def _enter(self, scope: Scope) -> _Request | _LeanRequest:
        """Start tracing a request: the cheapest path that serves it."""
        parent = None
        fast = self._lean_fast_path
        if fast is not None and "fastapi.telemetry" not in scope and not current_context():
            headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
            parent = extract_context(headers)
            span = fast(parent)
            if span is not None:
                path = scope.get("path", "")
                # Positional: a class call with keywords builds a dict.
                state = RequestState(
                    span,
                    scope.get("method", "GET"),
                    path,
                    headers,
                    self._request_id_header,
                    _route_resolver(scope, path),
                )
                scope[SCOPE_KEY] = state
                return _LeanRequest(
                    current_request.set(state), attach_context(context_with_span(span, parent))
                )
        return _Request(self, scope, parent)


class _HookSet:
    """Per-method tuples of the hooks that implement it: nothing to call is free."""

    __slots__ = ("empty", "end", "exit", "response", "start")

    def __init__(self, hooks: tuple[RequestHooks, ...]) -> None:
        self.start = _implementing(hooks, "on_request_start")
        self.response = _implementing(hooks, "on_response_start")
        self.end = _implementing(hooks, "on_request_end")
        self.exit = _implementing(hooks, "on_app_exit")
        self.empty = not (self.start or self.response or self.end or self.exit)


class _LeanRequest:
    """What a traced request undoes when it ends; all there is to an unsampled
    request that no hook needs."""

    __slots__ = ("_context_token", "_state_token")

    def __init__(self, state_token: Token[Any], context_token: Token[Any] | None) -> None:
        self._state_token = state_token
        self._context_token = context_token

    def leave(self, scope: Scope) -> None:
        if self._context_token is not None:
            try:
                detach_context(self._context_token)
            except Exception as exc:  # pragma: no cover - defensive
                _internal_errors.report("context_detach", exc)
        current_request.reset(self._state_token)
        # Break the scope <-> state reference cycle, so the request's objects
        # (FastAPI keeps exit stacks in the scope) are freed now, not by the GC.
        scope.pop(SCOPE_KEY, None)


class _Request(_LeanRequest):
    """The per-request bookkeeping of :class:`FastprofMiddleware`."""

    __slots__ = (
        "_completed",
        "_disconnected",
        "_ended",
        "_finished",
        "_hooks",
        "_mw",
        "_owned",
        "_recording",
        "_response_started",
        "_span_method",
        "_trailers",
        "_ttfb_s",
        "lean",
        "state",
    )

    def __init__(self, mw: FastprofMiddleware, scope: Scope, parent: Context | None) -> None:
        """``parent``: the context extracted from the headers, when the lean path
        already did (and found that the drop fast path can't serve the request)."""
        self._mw = mw
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        method = scope.get("method", "GET")
        path = scope.get("path", "")

        ambient = current_context()
        # The usual case (no native telemetry, an empty context from the server)
        # skips the search for another layer's SERVER span.
        span = (
            _foreign_server_span(scope, ambient)
            if ambient or "fastapi.telemetry" in scope
            else None
        )
        ctx: Context | None
        if span is None:
            self._owned = True
            fast = mw._drop_fast_path
            if parent is None:
                parent = extract_context(headers)
                span = fast(parent) if fast is not None else None
            # else: the lean path already asked the fast path, which can't serve it.
            span_method = self._span_method = SPAN_METHODS.get(method, "HTTP")
            if span is None:
                span = mw._tracer.start_span(span_method, context=parent, kind=SpanKind.SERVER)
                recording = span.is_recording()
            else:
                recording = False  # the fast path only makes dropped spans
            # The span's parent is never ambient (FM-05), but the app keeps every
            # other value of its context (baggage, FastAPI's telemetry data, ...).
            ctx = context_with_span(span, _with_ambient(parent, ambient) if ambient else parent)
        else:
            self._owned = False
            self._span_method = ""
            recording = span.is_recording()
            ctx = None
        state = self.state = RequestState(
            span, method, path, headers, mw._request_id_header, _route_resolver(scope, path)
        )
        self._recording = recording
        if recording:
            self._hooks = mw._sampled_hooks
            self.lean = False
            # One batch: every set_attribute call on an SDK span takes its lock.
            attrs = (
                self._request_attributes(scope, headers, method_attributes(method))
                if self._owned
                else {}
            )
            attrs["fastprof.request_id"] = state.request_id
            span.set_attributes(attrs)
        else:
            self._hooks = mw._unsampled_hooks
            self.lean = mw._lean_unsampled
        if not self.lean:
            self._finished = False
            self._ended = False
            self._completed = False
            self._trailers = False
            self._disconnected = False
            self._response_started = False
            self._ttfb_s = -1.0
        scope[SCOPE_KEY] = state
        self._state_token = current_request.set(state)
        self._context_token = attach_context(ctx) if ctx is not None else None

    def _request_attributes(
        self, scope: Scope, headers: list[tuple[bytes, bytes]], attrs: dict[str, Any]
    ) -> dict[str, Any]:
        limit = self._mw._limit
        scheme = scope.get("scheme", "http")
        attrs["url.scheme"] = scheme
        attrs["url.path"] = truncate(scope.get("path", ""), limit)
        query = redact_query(
            scope.get("query_string", b""), self._mw._query, limit, self._mw._sensitive_keys
        )
        if query is not None:
            attrs["url.query"] = query
        version = scope.get("http_version")
        if version:
            attrs["network.protocol.version"] = version
        address, port = server_address(find_header(headers, b"host"), scope.get("server"), scheme)
        if address is not None:
            attrs["server.address"] = truncate(address, limit)
            if port is not None:
                attrs["server.port"] = port
        client = scope.get("client")
        if client:
            attrs["client.address"] = client[0]
            if client[1] is not None:
                attrs["client.port"] = client[1]
        user_agent = find_header(headers, b"user-agent")
        if user_agent is not None:
            attrs["user_agent.original"] = truncate(user_agent.decode("latin-1"), limit)
        return attrs

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        hooks = self._hooks
        for hook in hooks.start:
            try:
                hook.on_request_start(self.state, scope)
            except Exception as exc:
                _internal_errors.report("hook.on_request_start", exc)
        if self._recording:
            # Disconnects are only recorded on a recording span.
            receive = self._receive_wrapper(receive)
        try:
            await app(scope, receive, self._send_wrapper(scope, send))
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
            for hook in hooks.exit:
                try:
                    hook.on_app_exit(self.state)
                except Exception as exc:
                    _internal_errors.report("hook.on_app_exit", exc)
            self.leave(scope)

    def _receive_wrapper(self, receive: Receive) -> Receive:
        async def wrapped_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                # Only read when the span is annotated, at the response's last
                # message: a disconnect after it (the usual end of a request) is
                # never recorded; one before it means the client left.
                self._disconnected = True
            return message

        return wrapped_receive

    def _send_wrapper(self, scope: Scope, send: Send) -> Callable[[Message], Awaitable[None]]:
        hooks = self._hooks.response
        response_header = self._mw._response_request_id_header

        async def wrapped_send(message: Message) -> None:
            message_type = message["type"]
            final = False
            if message_type == "http.response.start":
                try:
                    self._on_response_start(message, hooks, response_header)
                except Exception as exc:
                    _internal_errors.report("response_start", exc)
            elif message_type == "http.response.body":
                final = not message.get("more_body", False) and not self._trailers
            elif message_type == "http.response.trailers":
                final = not message.get("more_trailers", False)
            elif message_type == "http.response.pathsend":
                final = True
            if not final:
                await send(message)
                return
            # Hooks see the span before the last message leaves: an outer layer
            # (FastAPI native, contrib) ends its span as soon as it passes.
            self._completed = True
            self._complete(scope, None)
            try:
                await send(message)
            finally:
                self._end_span()

        return wrapped_send

    def _on_response_start(
        self,
        message: Message,
        hooks: tuple[RequestHooks, ...],
        response_header: bytes | None,
    ) -> None:
        state = self.state
        self._response_started = True
        self._trailers = bool(message.get("trailers", False))
        state.status_code = message.get("status")
        self._ttfb_s = state.elapsed_s()
        if response_header is not None:
            headers = list(message.get("headers", []))
            headers.append((response_header, state.request_id.encode("latin-1")))
            message["headers"] = headers
        for hook in hooks:
            try:
                hook.on_response_start(state, message)
            except Exception as exc:
                _internal_errors.report("hook.on_response_start", exc)

    def _complete(self, scope: Scope, error: BaseException | None) -> None:
        """Resolve the route, annotate the span and run ``on_request_end`` hooks, once."""
        if self._finished:
            return
        self._finished = True
        state = self.state
        stop_profile = state.stop_profile
        if stop_profile is not None:
            state.stop_profile = None
            try:
                stop_profile()
            except Exception as exc:
                _internal_errors.report("profile.stop", exc)
        try:
            state.finalize_route()
            if self._recording:
                self._annotate(state.span, error)
        except Exception as exc:
            _internal_errors.report("request_end", exc)
        for hook in self._hooks.end:
            try:
                hook.on_request_end(state)
            except Exception as exc:
                _internal_errors.report("hook.on_request_end", exc)

    def _end_span(self) -> None:
        """End the SERVER span if fastprof owns it, once."""
        if self._owned and not self._ended:
            self._ended = True
            try:
                self.state.span.end()
            except Exception as exc:  # pragma: no cover - SDK failure
                _internal_errors.report("span_end", exc)

    def _annotate(self, span: trace.Span, error: BaseException | None) -> None:
        state = self.state
        limit = self._mw._limit
        attrs: dict[str, Any] = {}
        if self._ttfb_s >= 0:
            attrs["fastprof.time_to_response_start_s"] = self._ttfb_s
        if self._disconnected:
            attrs["fastprof.client_disconnected"] = True
        if not self._owned:
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
            span.update_name(f"{self._span_method} {route}")
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


def _implementing(hooks: tuple[RequestHooks, ...], method: str) -> tuple[RequestHooks, ...]:
    base = getattr(RequestHooks, method)
    return tuple(h for h in hooks if getattr(type(h), method, base) is not base)


def _with_ambient(extracted: Context, ambient: Context) -> Context:
    """The ambient context with what was extracted from the headers added."""
    if not extracted:
        return ambient
    if not ambient:
        return extracted
    merged = Context({**ambient, **extracted})
    outer = baggage.get_all(ambient)
    if outer:
        # Header entries are added to (not replacing) the ambient baggage, as
        # propagate.extract() onto the current context would do.
        for name, value in {**outer, **baggage.get_all(extracted)}.items():
            merged = baggage.set_baggage(name, value, merged)
    return merged


def _foreign_server_span(scope: Scope, ambient: Context) -> trace.Span | None:
    """The SERVER span another layer opened for this request, if any.

    FastAPI's native telemetry publishes its request in ``scope["fastapi.telemetry"]``;
    other instrumentations (OpenTelemetry contrib) make their SERVER span current.
    A recording SERVER span created by fastprof itself in the ambient context can
    only be a leak from another request, so it is ignored.
    """
    native = scope.get("fastapi.telemetry")
    native_span = getattr(native, "span", None)
    if native_span is not None:
        return native_span  # type: ignore[no-any-return]
    if not ambient:
        return None  # the usual case: the server starts each request in an empty context
    current = trace.get_current_span(ambient)
    if current.is_recording():
        if getattr(current, "kind", None) == SpanKind.SERVER:
            scope_info = getattr(current, "instrumentation_scope", None)
            if getattr(scope_info, "name", None) != TRACER_NAME:
                return current
        return None
    span_context = current.get_span_context()
    if span_context.is_valid and not span_context.is_remote and not _is_sdk_span(current):
        # An unsampled span opened by an outer layer in this request.
        return current
    return None


def _is_sdk_span(span: trace.Span) -> bool:
    return hasattr(span, "end_time")
