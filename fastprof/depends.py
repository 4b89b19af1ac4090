"""``fastprof.Depends`` / ``fastprof.Security``: FastAPI's, marking the dependency for timing.

They take exactly the parameters of the installed FastAPI's ``Depends`` and
``Security`` (``use_cache``, ``scope``, ``scopes``, ... whatever that version
has) and return FastAPI's own object, so FastAPI sees no difference; type
checkers see FastAPI's own signatures. The dependency callable is additionally
marked: with ``fastprof.instrument(app, dependencies=DependencySpans(mode="marked"))``
only marked dependencies (and their teardowns) get spans. Without
``instrument()``, or in the default mode, they behave exactly like FastAPI's.

The mark belongs to the callable: a callable passed to ``fastprof.Depends``
once is timed wherever it is used. ``fastprof.Depends()`` without an argument
(dependency taken from the type annotation) cannot be marked; pass the class.

Importing this module never imports FastAPI's attributes eagerly, so fastprof
can be imported at any moment, even from an import hook that fires while FastAPI
itself is being imported; FastAPI is looked up at the first call then.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from fastprof.dependencies._wrappers import mark

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
    except (ImportError, AttributeError):
        # No FastAPI, or FastAPI still being imported (an import hook): it is
        # looked up when the factory is first called.
        return factory
    # Same signature and docs as the installed FastAPI's (inspect, IDEs).
    return functools.wraps(original)(factory)


if TYPE_CHECKING:
    from fastapi import Depends as Depends
    from fastapi import Security as Security
else:
    Depends = _marking("Depends")
    Security = _marking("Security")
