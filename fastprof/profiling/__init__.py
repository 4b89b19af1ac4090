"""On-demand pyinstrument profiles of single requests, linked to their OpenTelemetry span.

See ``docs/profiling.md``. The entry point is :class:`Profiling`::

    profiling = fastprof.Profiling(secret=os.environ["FASTPROF_SECRET"])
    fastprof.instrument(app, profiling=profiling)
    app.mount("/_fastprof/profiles", profiling.viewer())
"""

from __future__ import annotations

from fastprof.profiling._documents import FORMATS, Format, render
from fastprof.profiling._profiling import Profiling
from fastprof.profiling._tokens import mint_token, viewer_token
from fastprof.profiling.stores import FileStore, MemoryStore, ProfileMeta, ProfileStore
from fastprof.profiling.viewer import AuthHook, bearer_auth, mount_viewer, viewer_app

__all__ = [
    "FORMATS",
    "AuthHook",
    "FileStore",
    "Format",
    "MemoryStore",
    "ProfileMeta",
    "ProfileStore",
    "Profiling",
    "bearer_auth",
    "mint_token",
    "mount_viewer",
    "render",
    "viewer_app",
    "viewer_token",
]
