"""fastprof: where each FastAPI/Starlette request's time goes, in OpenTelemetry.

Distribution ``fastprof-asgi``; import name ``fastprof``.
"""

from fastprof.__about__ import __version__
from fastprof._context import RequestState, Timing, current_request
from fastprof._instrument import instrument
from fastprof.capture import SlowRequestCapture
from fastprof.dashboard import Dashboard
from fastprof.dependencies import DependencySpans
from fastprof.depends import Depends, Security
from fastprof.hooks import RequestHooks
from fastprof.loop import LoopMonitor
from fastprof.middleware import FastprofMiddleware
from fastprof.profiling import Profiling
from fastprof.server_timing import ServerTiming
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
    "ServerTiming",
    "SlowRequestCapture",
    "SlowRequestLog",
    "Timing",
    "__version__",
    "current_request",
    "instrument",
]
