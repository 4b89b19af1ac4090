"""Wrappers of dependency callables, of the same kind as the dependency, and the marks.

A wrapper has the same kind as the dependency (``async def``, ``def``,
generator, async generator), so FastAPI still runs sync code in the thread pool
and still treats ``yield`` dependencies as context managers. Wrappers are
memoised per original callable, so FastAPI's per-request cache (keyed on the
callable) still runs each cached dependency once.
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from collections.abc import Callable, Generator
from typing import Any, Final

from fastprof.dependencies._calls import CallInfo, kind_of
from fastprof.dependencies._tracker import (
    Node,
    active,
    attach_node,
    begin_call,
    begin_teardown,
    call_in_worker,
    end_call,
)
from fastprof.hooks import run_in_worker

__all__ = ["STOP", "is_marked", "mark", "original_of", "wrapper_for"]

MAX_UNWEAKABLE: Final = 4096
STOP: Final = object()

_wrappers: weakref.WeakKeyDictionary[Any, Callable[..., Any]] = weakref.WeakKeyDictionary()
_unweakable: dict[int, tuple[Any, Callable[..., Any]]] = {}
_marked: weakref.WeakSet[Any] = weakref.WeakSet()
_marked_unweakable: dict[int, Any] = {}


def mark(call: Any) -> None:
    """Time ``call`` in ``DependencySpans(mode="marked")`` (see :mod:`fastprof.depends`)."""
    try:
        _marked.add(call)
    except TypeError:
        if len(_marked_unweakable) < MAX_UNWEAKABLE:
            _marked_unweakable[id(call)] = call


def is_marked(call: Any) -> bool:
    """Whether ``call`` (or the callable behind a wrapper) was marked."""
    original = original_of(call)
    try:
        return original in _marked
    except TypeError:
        return _marked_unweakable.get(id(original)) is original



def wrapper_for(call: Any) -> Any:
    """The memoised wrapper of ``call`` (``call`` itself if it cannot be wrapped)."""
    if call is None or getattr(call, "__fastprof_original__", None) is not None:
        return call
    try:
        wrapper = _wrappers.get(call)
        weakable = True
    except TypeError:  # not hashable or not weak-referenceable
        weakable = False
        entry = _unweakable.get(id(call))
        wrapper = entry[1] if entry is not None and entry[0] is call else None
    if wrapper is not None:
        return wrapper
    wrapper = _make_wrapper(call, CallInfo(call, kind_of(call)))
    if weakable:
        _wrappers[call] = wrapper
    elif len(_unweakable) < MAX_UNWEAKABLE:
        _unweakable[id(call)] = (call, wrapper)
    else:
        return call  # keep identity stable: never hand out two wrappers for one callable
    return wrapper


def original_of(call: Any) -> Any:
    """The user's callable behind a fastprof wrapper (``call`` itself otherwise)."""
    if isinstance(call, types.FunctionType):
        return call.__dict__.get("__fastprof_original__", call)
    return call


def _make_wrapper(call: Any, info: CallInfo) -> Callable[..., Any]:
    # The wrapper bodies use only closure variables and builtins, so they can be
    # rebuilt with the dependency's own globals: FastAPI < 0.116 resolves string
    # annotations with the *wrapper's* __globals__ when an override is active.
    wrapper: Callable[..., Any]
    if info.kind == "async":
        wrapper = _async_wrapper(call, info, begin_call, end_call)
    elif info.kind == "sync":
        wrapper = _sync_wrapper(call, info, begin_call, end_call)
    elif info.kind == "generator":
        wrapper = _gen_wrapper(call, info, GenDriver, STOP)
    else:
        wrapper = _async_gen_wrapper(call, info, AsyncGenDriver, STOP)
    target = call
    while isinstance(target, functools.partial):
        target = target.func
    user_globals = getattr(inspect.unwrap(target), "__globals__", None)
    if isinstance(user_globals, dict) and isinstance(wrapper, types.FunctionType):
        wrapper = types.FunctionType(
            wrapper.__code__, user_globals, wrapper.__name__, None, wrapper.__closure__
        )
    functools.update_wrapper(wrapper, call, updated=())
    wrapper.__fastprof_original__ = call  # type: ignore[attr-defined]
    wrapper.__fastprof_info__ = info  # type: ignore[attr-defined]
    return wrapper


def _async_wrapper(fn: Any, info: CallInfo, begin: Any, end: Any) -> Callable[..., Any]:
    # One coroutine per call: the timing is inline, not in a second coroutine.
    current = active

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker = current.get()
        node = begin(tracker, info, True) if tracker is not None else None
        if node is None:
            return await fn(*args, **kwargs)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            end(node, True, exc, "dependency")
            raise
        end(node, True, None, "dependency")
        return result

    return wrapper


def _sync_wrapper(fn: Any, info: CallInfo, begin: Any, end: Any) -> Callable[..., Any]:
    current = active
    partial = functools.partial
    run = run_in_worker

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker = current.get()
        node = begin(tracker, info, False) if tracker is not None else None
        if node is None:
            return fn(*args, **kwargs)
        try:
            state = tracker.state  # type: ignore[union-attr]
            if state._worker_hooks:
                result = run(state, partial(fn, *args, **kwargs))
            else:
                result = fn(*args, **kwargs)
        except BaseException as exc:
            end(node, False, exc, "dependency")
            raise
        end(node, False, None, "dependency")
        return result

    return wrapper


def _gen_wrapper(fn: Any, info: CallInfo, driver: Any, stop: object) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, None]:
        d = driver(fn(*args, **kwargs), info)
        value = d.start()
        while value is not stop:
            try:
                sent = yield value
            except BaseException as exc:
                value = d.throw(exc)
            else:
                value = d.send(sent)

    return wrapper


def _async_gen_wrapper(fn: Any, info: CallInfo, driver: Any, stop: object) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        d = driver(fn(*args, **kwargs), info)
        value = await d.start()
        while value is not stop:
            try:
                sent = yield value
            except BaseException as exc:
                value = await d.throw(exc)
            else:
                value = await d.send(sent)

    return wrapper




class GenDriver:
    """Drives a sync ``yield`` dependency for its wrapper (runs in worker threads)."""

    __slots__ = ("gen", "info", "node")

    def __init__(self, gen: Generator[Any, Any, Any], info: CallInfo) -> None:
        self.gen = gen
        self.info = info
        self.node: Node | None = None

    def _step(self, node: Node | None, step: Callable[[], Any]) -> Any:
        return call_in_worker(node, step) if node is not None else step()

    def start(self) -> Any:
        tracker = active.get()
        node = self.node = begin_call(tracker, self.info, False) if tracker is not None else None
        try:
            value = self._step(node, self.gen.__next__)
        except StopIteration:
            value = STOP
        except BaseException as exc:
            if node is not None:
                end_call(node, False, exc, "dependency")
            raise
        if node is not None:
            end_call(node, False, None, "dependency")
        return value

    def send(self, sent: Any) -> Any:
        return self._resume(functools.partial(self.gen.send, sent), None)

    def throw(self, exc: BaseException) -> Any:
        if isinstance(exc, GeneratorExit):
            self.gen.close()
            raise exc
        return self._resume(functools.partial(self.gen.throw, exc), exc)

    def _resume(self, step: Callable[[], Any], thrown: BaseException | None) -> Any:
        node = begin_teardown(self.node)
        if node is not None:
            attach_node(node, False)
        try:
            value = self._step(node, step)
        except StopIteration:
            value = STOP
        except BaseException as exc:
            if node is not None:
                end_call(node, False, None if exc is thrown else exc, "teardown")
            raise
        if node is not None:
            end_call(node, False, None, "teardown")
        return value


class AsyncGenDriver:
    """Drives an async ``yield`` dependency for its wrapper (runs on the event loop)."""

    __slots__ = ("agen", "info", "node")

    def __init__(self, agen: Any, info: CallInfo) -> None:
        self.agen = agen
        self.info = info
        self.node: Node | None = None

    async def start(self) -> Any:
        tracker = active.get()
        node = self.node = begin_call(tracker, self.info, True) if tracker is not None else None
        try:
            value = await self.agen.__anext__()
        except StopAsyncIteration:
            value = STOP
        except BaseException as exc:
            if node is not None:
                end_call(node, True, exc, "dependency")
            raise
        if node is not None:
            end_call(node, True, None, "dependency")
        return value

    async def send(self, sent: Any) -> Any:
        return await self._resume(self.agen.asend(sent), None)

    async def throw(self, exc: BaseException) -> Any:
        if isinstance(exc, GeneratorExit):
            await self.agen.aclose()
            raise exc
        return await self._resume(self.agen.athrow(exc), exc)

    async def _resume(self, step: Any, thrown: BaseException | None) -> Any:
        node = begin_teardown(self.node)
        if node is not None:
            attach_node(node, True)
        try:
            value = await step
        except StopAsyncIteration:
            value = STOP
        except BaseException as exc:
            if node is not None:
                end_call(node, True, None if exc is thrown else exc, "teardown")
            raise
        if node is not None:
            end_call(node, True, None, "teardown")
        return value

