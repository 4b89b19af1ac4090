"""fastprof: where each FastAPI/Starlette request's time goes, in OpenTelemetry.

Distribution ``fastprof-asgi``; import name ``fastprof``.
"""

from fastprof.__about__ import __version__
from fastprof._context import RequestState, current_request
from fastprof._dependencies import DependencySpans
from fastprof._instrument import instrument
from fastprof.depends import Depends, Security
from fastprof.middleware import FastprofMiddleware, RequestHooks

__all__ = [
    "Depends",
    "DependencySpans",
    "FastprofMiddleware",
    "RequestHooks",
    "RequestState",
    "Security",
    "__version__",
    "current_request",
    "instrument",
]
