"""``FastprofMiddleware``: the pure-ASGI middleware that owns (or enriches) the SERVER span.

The middleware itself is stateless per request: its options are validated once
into frozen :class:`~fastprof.middleware._settings.Settings`, and each request
is one object from :func:`~fastprof.middleware._request.start_request`.
"""

from __future__ import annotations

from typing import Unpack

from starlette.types import ASGIApp, Receive, Scope, Send

from fastprof import _internal_errors
from fastprof._context import SCOPE_KEY
from fastprof.hooks import RequestHooks
from fastprof.middleware._request import (
    LeanRequest,
    UnsampledRequest,
    WatchedRequest,
    start_request,
)
from fastprof.middleware._settings import ExcludeOption, MiddlewareOptions, Settings
from fastprof.middleware._websocket import start_session

__all__ = ["ExcludeOption", "FastprofMiddleware", "MiddlewareOptions", "RequestHooks"]


class FastprofMiddleware:
    """Trace every HTTP request with one OpenTelemetry SERVER span.

    Usage::

        app.add_middleware(FastprofMiddleware)            # Starlette / FastAPI
        app = FastprofMiddleware(app, tracer_provider=tp)  # any ASGI app

    When another layer already owns the request's SERVER span (FastAPI's native
    telemetry, OpenTelemetry's contrib ASGI/FastAPI instrumentation), fastprof
    enriches that span instead of creating a second one. A request FastAPI's
    native telemetry excludes (its ``exclude`` option) is not traced by fastprof
    either.

    Each websocket session gets one SERVER span (``WEBSOCKET <route>``) with its
    message counts and close code. Lifespan scopes pass through untouched.

    Args:
        app: The ASGI application to wrap.
        **options: The keyword options below (:class:`MiddlewareOptions`).

    Keyword Args:
        tracer_provider (TracerProvider | None): Provider for fastprof's spans; defaults
            to the global one.
        exclude (ExcludeOption): Paths not to trace: a list of exact paths, a regular
            expression searched in the path, or a callable receiving the ASGI scope.
        request_id_header (str | None): Incoming header holding a request id to reuse
            (validated: 1-128 characters of ``[A-Za-z0-9._:-]``); ``None`` always
            generates one. Default ``"x-request-id"``.
        response_request_id_header (str | None): If set, the request id is returned in
            this response header. Off by default: fastprof changes no response.
        query (QueryPolicy): How ``url.query`` is recorded: ``"redact_sensitive"``
            (the default: values of credential-like keys become ``REDACTED``),
            ``"redact_all"`` or ``"omit"``.
        redact_query_keys (Iterable[str]): More query parameter names whose values are
            redacted under ``"redact_sensitive"`` (case-insensitive).
        max_attribute_length (int): Longest string fastprof records in an attribute
            (16-65536, default 2048).
        hooks (Iterable[RequestHooks]): Per-request components (see :class:`RequestHooks`).
    """

    def __init__(self, app: ASGIApp, **options: Unpack[MiddlewareOptions]) -> None:
        self.app = app
        self._settings = Settings.build(**options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http" or SCOPE_KEY in scope:
            if scope_type == "websocket" and SCOPE_KEY not in scope:
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if "fastapi.telemetry" in scope and scope["fastapi.telemetry"] is None:
            # FastAPI's native telemetry excluded this request (its ``exclude``):
            # fastprof records nothing either, and leaves the ambient context alone
            # (an in-process request keeps the outer request's current span).
            await self.app(scope, receive, send)
            return
        settings = self._settings
        if settings.exclude is not None:
            try:
                excluded = settings.exclude(scope)
            except Exception as exc:
                _internal_errors.report("exclude", exc)
                excluded = False
            if excluded:
                await self.app(scope, receive, send)
                return
        try:
            request = start_request(settings, scope)
        except Exception as exc:
            _internal_errors.report("request_start", exc)
            await self.app(scope, receive, send)
            return
        if type(request) is LeanRequest:
            # An unsampled request no hook needs: only the span's context is current.
            try:
                await self.app(scope, receive, send)
            finally:
                request.leave(scope)
            return
        if type(request) is WatchedRequest:
            # As lean, with the status and end noted for the hooks told of a slow one.
            try:
                await self.app(scope, receive, request.bind(settings, send))
            finally:
                request.finish(scope)
            return
        if type(request) is UnsampledRequest:
            # An unsampled request some hook wants: hooks, and no span work.
            try:
                await self.app(scope, receive, request.bind(scope, send))
            except BaseException as exc:
                request.complete(exc)
                raise
            finally:
                request.exit(scope)
            return
        await request.run(self.app, scope, receive, send)  # type: ignore[attr-defined]

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self._settings
        try:
            excluded = settings.exclude is not None and settings.exclude(scope)
            session = None if excluded else start_session(settings, scope)
        except Exception as exc:
            _internal_errors.report("request_start", exc)
            session = None
        if session is None:
            await self.app(scope, receive, send)
        elif type(session) is LeanRequest:
            try:
                await self.app(scope, receive, send)
            finally:
                session.leave(scope)
        else:
            await session.run(self.app, scope, receive, send)  # type: ignore[attr-defined]
