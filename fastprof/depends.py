"""``fastprof.Depends`` / ``fastprof.Security``: FastAPI's, marking the dependency for timing.

They take exactly the parameters of the installed FastAPI's ``Depends`` and
``Security`` (``use_cache``, ``scope``, ``scopes``, ... whatever that version
has) and return FastAPI's own object, so FastAPI sees no difference. The
dependency callable is additionally marked: with
``fastprof.instrument(app, dependencies="marked")`` only marked dependencies
(and their teardowns) get spans. Without ``instrument()``, or with
``dependencies="all"``, they behave exactly like FastAPI's.

The mark belongs to the callable: a callable passed to ``fastprof.Depends``
once is timed wherever it is used. ``fastprof.Depends()`` without an argument
(dependency taken from the type annotation) cannot be marked; pass the class.
"""

from __future__ import annotations

import functools
from typing import Any

from fastprof._dependencies import mark

__all__ = ["Depends", "Security"]


def _fastapi(name: str) -> Any:
    try:
        import fastapi
    except ImportError:  # pragma: no cover - exercised by the packaging tests
        raise ImportError(f"fastprof.{name} needs FastAPI installed") from None
    return getattr(fastapi, name)


def _marking(name: str) -> Any:
    def factory(dependency: Any = None, *args: Any, **kwargs: Any) -> Any:
        result = _fastapi(name)(dependency, *args, **kwargs)
        if dependency is not None:
            mark(dependency)
        return result

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = __name__
    try:
        original = _fastapi(name)
    except ImportError:
        return factory
    # Same signature and docs as the installed FastAPI's (inspect, IDEs).
    return functools.wraps(original)(factory)


Depends: Any = _marking("Depends")
Security: Any = _marking("Security")
