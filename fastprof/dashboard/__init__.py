"""A page of fastprof's own: recent requests, their waterfalls, profiles and routes.

See ``docs/dashboard.md``. The entry point is :class:`Dashboard`::

    dashboard = fastprof.Dashboard(secret=os.environ["FASTPROF_SECRET"], profiling=profiling)
    provider.add_span_processor(dashboard.span_processor)   # record recent requests
    dashboard.mount(app, "/_fastprof/dashboard")             # serve the pages
"""

from __future__ import annotations

from fastprof.dashboard._dashboard import AuthHook, Dashboard, dashboard_token
from fastprof.dashboard._records import RequestRecord
from fastprof.dashboard.stores import (
    MemoryRequestStore,
    RequestFilter,
    RequestStore,
    SQLiteStore,
    default_path,
)

__all__ = [
    "AuthHook",
    "Dashboard",
    "MemoryRequestStore",
    "RequestFilter",
    "RequestRecord",
    "RequestStore",
    "SQLiteStore",
    "dashboard_token",
    "default_path",
]
