"""fastprof: where each FastAPI/Starlette request's time goes, in OpenTelemetry.

Distribution ``fastprof-asgi``; import name ``fastprof``.
"""

from fastprof.__about__ import __version__
from fastprof._context import RequestState, current_request
from fastprof._dependencies import DependencySpans
from fastprof._instrument import instrument
from fastprof.dashboard import Dashboard
from fastprof.depends import Depends, Security
from fastprof.loop_monitor import LoopMonitor
from fastprof.middleware import FastprofMiddleware, RequestHooks
from fastprof.profiling import Profiling
from fastprof.slow_requests import SlowRequestLog

__all__ = [
    "Dashboard",
    "Depends",
    "DependencySpans",
    "FastprofMiddleware",
    "LoopMonitor",
    "Profiling",
    "RequestHooks",
    "RequestState",
    "Security",
    "SlowRequestLog",
    "__version__",
    "current_request",
    "instrument",
]
