"""What fastprof knows about one dependency callable: its kind and the names its spans carry."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, Final, Protocol

from fastprof.attributes import DEPENDENCY_KIND, DEPENDENCY_PHASE

__all__ = ["MAX_NAME", "CallInfo", "Dependant", "Kinds", "info_of", "kind_of"]

MAX_NAME: Final = 256


class Dependant(Protocol):
    """What fastprof reads and sets of FastAPI's ``Dependant`` (``fastapi.dependencies.models``)."""

    call: Callable[..., Any] | None
    dependencies: list[Dependant]


class Kinds:
    """FastAPI's own predicates for a dependency's kind, found by :func:`~._fastapi.install`.

    FastAPI decides how to run a dependency (thread pool, context manager, ...)
    with them; fastprof's wrappers must be of the same kind, so it asks the same.
    """

    is_gen: Callable[[Any], bool] | None = None
    is_async_gen: Callable[[Any], bool] | None = None
    is_coroutine: Callable[[Any], bool] | None = None


class CallInfo:
    """Static facts about one dependency callable."""

    __slots__ = (
        "attributes",
        "code_name",
        "kind",
        "name",
        "on_loop",
        "span_name",
        "teardown_attributes",
        "teardown_name",
    )

    def __init__(self, call: Any, kind: str) -> None:
        target = call
        while isinstance(target, functools.partial):
            target = target.func
        qualname = getattr(target, "__qualname__", None)
        module = getattr(target, "__module__", None)
        if not isinstance(qualname, str):
            qualname = type(target).__qualname__
            module = type(target).__module__
        name = qualname[:MAX_NAME]
        self.name = name
        self.kind = kind
        self.on_loop = kind in ("async", "async_generator")
        self.code_name = f"{module}.{qualname}"[:MAX_NAME] if module else name
        self.span_name = f"dependency {name}"
        self.teardown_name = f"teardown {name}"
        shown = "class" if isinstance(target, type) else kind
        self.attributes = {"code.function.name": self.code_name, DEPENDENCY_KIND: shown}
        self.teardown_attributes = {**self.attributes, DEPENDENCY_PHASE: "teardown"}



def info_of(call: Any) -> CallInfo | None:
    """The :class:`CallInfo` of a fastprof wrapper, else ``None``."""
    if type(call) is types.FunctionType:
        info = call.__dict__.get("__fastprof_info__")
        if type(info) is CallInfo:
            return info
    return None



def kind_of(call: Any) -> str:
    """``async``, ``sync``, ``generator`` or ``async_generator``, as FastAPI sees ``call``."""
    assert Kinds.is_gen and Kinds.is_async_gen and Kinds.is_coroutine
    if Kinds.is_async_gen(call):
        return "async_generator"
    if Kinds.is_gen(call):
        return "generator"
    if Kinds.is_coroutine(call):
        return "async"
    return "sync"

