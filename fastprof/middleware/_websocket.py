"""One websocket session through :class:`~fastprof.FastprofMiddleware`: one SERVER span.

The span covers the whole session, from the handshake until the application
returns, and is named ``WEBSOCKET <route>``. It records how many messages were
received and sent (counts only: no span per message), whether the handshake was
accepted, the close code and any error. The components' hooks run as for an HTTP
request (``on_response_start`` excepted: a session has no HTTP response), so
dependency spans, profiles and blocked-loop reports work for websocket routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import Token
from typing import Any, Final

from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from fastprof import _internal_errors
from fastprof._context import RequestState
from fastprof._http import truncate
from fastprof._otel import current_context, error_type
from fastprof.attributes import (
    WEBSOCKET_ACCEPTED,
    WEBSOCKET_CLOSE_CODE,
    WEBSOCKET_MESSAGES_RECEIVED,
    WEBSOCKET_MESSAGES_SENT,
)
from fastprof.hooks import HookSet
from fastprof.middleware._request import (
    HookedRequest,
    LeanRequest,
    _route_resolver,
    enter,
    open_server_span,
)
from fastprof.middleware._settings import Settings

__all__ = ["WebSocketSession", "start_session"]

SPAN_PREFIX: Final = "WEBSOCKET"
#: Close codes that mean the session failed (1006: abnormal closure, 1011: internal error).
_ERROR_CLOSE_CODES: Final = frozenset({1006, 1011})


def start_session(settings: Settings, scope: Scope) -> LeanRequest | WebSocketSession:
    """Start tracing a websocket session in the cheapest shape that serves it."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
    path = scope.get("path", "")
    span, owned, recording, ctx = open_server_span(
        settings, scope, headers, SPAN_PREFIX, current_context(), None
    )
    state = RequestState(
        span, "GET", path, headers, settings.request_id_header, _route_resolver(scope, path)
    )
    state.websocket = True
    hooks, state_token, context_token = enter(
        settings, scope, headers, state, owned, recording, ctx, None
    )
    if not recording and hooks.empty:
        return LeanRequest(state, state_token, context_token)
    return WebSocketSession(settings, state, hooks, owned, recording, state_token, context_token)


class WebSocketSession(HookedRequest):
    """A websocket session whose span records or whose hooks run."""

    __slots__ = ("_accepted", "_close_code", "_received", "_sent")

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
        super().__init__(settings, state, hooks, owned, recording, state_token, context_token)
        self._accepted = False
        self._close_code: int | None = None
        self._received = 0
        self._sent = 0

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        self._start_phase(scope)
        if self._recording:
            receive, send = self._receive_wrapper(receive), self._send_wrapper(send)
        error: BaseException | None = None
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_phases(scope, error)
            if self._owned:
                try:
                    self.state.span.end()
                except Exception as exc:  # pragma: no cover - SDK failure
                    _internal_errors.report("span_end", exc)
            self._exit_phase(scope)

    def _receive_wrapper(self, receive: Receive) -> Receive:
        async def wrapped_receive() -> Message:
            message = await receive()
            message_type = message["type"]
            if message_type == "websocket.receive":
                self._received += 1
            elif message_type == "websocket.disconnect" and self._close_code is None:
                code = message.get("code")
                self._close_code = code if isinstance(code, int) else 1005
            return message

        return wrapped_receive

    def _send_wrapper(self, send: Send) -> Callable[[Message], Awaitable[None]]:
        async def wrapped_send(message: Message) -> None:
            message_type = message["type"]
            if message_type == "websocket.send":
                self._sent += 1
            elif message_type == "websocket.accept":
                self._accepted = True
            elif message_type == "websocket.close" and self._close_code is None:
                code = message.get("code", 1000)
                self._close_code = code if isinstance(code, int) else 1000
            await send(message)

        return wrapped_send

    def _annotate_end(self, scope: Scope, error: BaseException | None) -> None:
        if self._recording:
            self._annotate(error)

    def _annotate(self, error: BaseException | None) -> None:
        span = self.state.span
        attrs: dict[str, Any] = {
            WEBSOCKET_MESSAGES_RECEIVED: self._received,
            WEBSOCKET_MESSAGES_SENT: self._sent,
            WEBSOCKET_ACCEPTED: self._accepted,
        }
        if isinstance(error, WebSocketDisconnect):
            # The client closed: how the application learns it, not a failure.
            if self._close_code is None:
                self._close_code = error.code
            error = None
        code = self._close_code
        if code is not None:
            attrs[WEBSOCKET_CLOSE_CODE] = code
        if not self._owned:
            # Another layer's span: its owner records the route, errors and status.
            span.set_attributes(attrs)
            return
        route = self.state.route
        if route is not None:
            route = truncate(route, self._settings.max_attribute_length)
            attrs["http.route"] = route
            span.update_name(f"{SPAN_PREFIX} {route}")
        failure: str | None = None
        if error is not None:
            failure = error_type(error)
            if isinstance(error, Exception):
                span.record_exception(error, escaped=True)
        elif code in _ERROR_CLOSE_CODES:
            failure = str(code)
        if failure is not None:
            attrs["error.type"] = failure
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attrs)
