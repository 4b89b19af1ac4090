"""fastprof's pure-ASGI middleware."""

from fastprof.middleware._server_span import ExcludeOption, FastprofMiddleware, RequestHooks

__all__ = ["ExcludeOption", "FastprofMiddleware", "RequestHooks"]
