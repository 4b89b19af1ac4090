"""``fastprof.run:app``: your application, instrumented from the environment.

The entry point behind ``fastprof run``, to give any ASGI server by import string::

    FASTPROF_APP=main:app uvicorn fastprof.run:app --workers 4
    FASTPROF_APP=main:app gunicorn -k uvicorn_worker.UvicornWorker -w 4 fastprof.run:app
    FASTPROF_APP=main:app fastapi run --entrypoint fastprof.run:app --workers 4

Importing this module does nothing; reading its ``app`` attribute imports
``$FASTPROF_APP`` (``module:attribute``; with ``FASTPROF_APP_FACTORY=true`` the
attribute is called to make the app), sets tracing up from ``OTEL_*`` and
instruments the app from ``FASTPROF_*`` (:func:`fastprof.config.instrument_from_env`).
Servers resolve the import string in each worker process, so every worker does this
after the fork and starts its own exporter thread.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from fastprof.config import instrument_from_env

__all__ = ["load"]  # and `app`, resolved on first access (PEP 562)

_lock = threading.Lock()
_app: Any = None


def load() -> Any:
    """Import ``$FASTPROF_APP`` and instrument it (once per process)."""
    global _app
    with _lock:
        if _app is None:
            _app = _load()
        return _app


def _load() -> Any:
    import os

    from fastprof.config import _Env

    env = _Env(os.environ)
    target = env.text("FASTPROF_APP")
    if target is None:
        raise ValueError(
            "FASTPROF_APP: set it to your application's import string, e.g. main:app"
        )
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise env.error("FASTPROF_APP", "an import string 'module:attribute', e.g. main:app")
    module = importlib.import_module(module_name)
    obj: Any = module
    try:
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(
            f"FASTPROF_APP: module {module_name!r} has no attribute {attribute!r}"
        ) from None
    if env.boolean("FASTPROF_APP_FACTORY"):
        obj = obj()
    return instrument_from_env(obj)


def __getattr__(name: str) -> Any:
    if name == "app":
        return load()
    raise AttributeError(f"module 'fastprof.run' has no attribute {name!r}")
