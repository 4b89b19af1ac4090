"""One OpenTelemetry span per FastAPI ``Depends``, nested like the dependency tree.

How it hooks FastAPI (FM-12, anchors P12):

* FastAPI resolves a route's dependencies with ``solve_dependencies``, which
  calls itself (through its module global) once per sub-dependency. fastprof
  replaces that module global, and ``fastapi.routing``'s reference to it, with
  one wrapper. Requests that fastprof does not trace pass straight through.
* The wrapper never mutates the application's routes. It hands the original
  solver a *mirror* of the dependant whose sub-dependencies call fastprof
  wrappers. Mirrors are cached per dependant; wrappers are memoised per
  original callable, so FastAPI's per-request cache (keyed on the callable)
  still runs each cached dependency once, and ``dependency_overrides`` still
  match the original callable (lookups are translated).
* A wrapper has the same kind as the dependency (``async def``, ``def``,
  generator, async generator), so FastAPI still runs sync code in the
  threadpool and still treats ``yield`` dependencies as context managers.

Span model: a dependency's span starts when FastAPI starts resolving it (so its
own sub-dependencies are its children) and ends when its code returns, or, for
a ``yield`` dependency, when it yields. The code after ``yield`` gets its own
``teardown`` span, whenever FastAPI runs it, parented to the request's server
span and linked to the setup span. A dependency served from FastAPI's cache gets
no span of its own unless one of its sub-dependencies really ran.

Spans are never attached across an ``await``/``yield`` boundary (FM-06); each
run of dependency code attaches its span as the current one and detaches it in
the same thread and task, so spans opened inside a dependency (database,
HTTP client) become its children.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
import types
import weakref
from collections.abc import Callable, Generator
from contextvars import ContextVar
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
from starlette.exceptions import HTTPException
from starlette.types import Scope

from fastprof import _internal_errors
from fastprof._context import RequestState, Timing
from fastprof._options import check_int
from fastprof._otel import (
    attach_context,
    current_context,
    detach_context,
    error_type,
    fastprof_tracer,
)
from fastprof.middleware import RequestHooks

__all__ = ["DEFAULT_MAX_SPANS", "DependencySpans"]

logger = logging.getLogger("fastprof")

DEFAULT_MAX_SPANS: Final = 256
_MAX_NAME: Final = 256
_MAX_MIRRORS: Final = 4096
_MAX_UNWEAKABLE: Final = 4096
_EXTRA_KEY: Final = "fastprof.dependencies"
_STOP: Final = object()
_DEPENDENCIES_PHASE: Final = {"fastprof.phase": "dependencies"}
_SERIALIZATION_PHASE: Final = {"fastprof.phase": "serialization"}


# --------------------------------------------------------------------------- installation


class _Support:
    """What was found in the installed FastAPI (filled by :func:`_install`)."""

    supported: bool | None = None
    is_gen: Callable[[Any], bool] | None = None
    is_async_gen: Callable[[Any], bool] | None = None
    is_coroutine: Callable[[Any], bool] | None = None


def _install() -> bool:
    if _Support.supported is not None:
        return _Support.supported
    try:
        import fastapi.dependencies.utils as utils
        import fastapi.routing as routing
    except ImportError:
        _Support.supported = False
        return False
    try:
        original = utils.solve_dependencies
        params = inspect.signature(original).parameters
        found = {
            name: getattr(utils, name, None) or getattr(utils, name.lstrip("_"), None)
            for name in ("_is_gen_callable", "_is_async_gen_callable", "_is_coroutine_callable")
        }
        ok = (
            inspect.iscoroutinefunction(original)
            and "dependant" in params
            and "dependency_overrides_provider" in params
            and all(callable(f) for f in found.values())
        )
    except Exception:  # pragma: no cover - defensive
        ok = False
    if not ok:
        logger.warning(
            "fastprof: this FastAPI version is not supported for dependency spans; "
            "requests are traced without them"
        )
        _Support.supported = False
        return False
    _Support.is_gen = found["_is_gen_callable"]
    _Support.is_async_gen = found["_is_async_gen_callable"]
    _Support.is_coroutine = found["_is_coroutine_callable"]
    setattr(utils, "solve_dependencies", _patch(original))  # noqa: B010
    routing_solve = getattr(routing, "solve_dependencies", None)
    if routing_solve is not None and not getattr(routing_solve, "__fastprof__", False):
        setattr(routing, "solve_dependencies", _patch(routing_solve))  # noqa: B010
    _install_phases(routing)
    _Support.supported = True
    return True


def _install_phases(routing: Any) -> None:
    """Hook ``run_endpoint_function`` and ``serialize_response`` (feature-detected)."""
    run_endpoint = getattr(routing, "run_endpoint_function", None)
    serialize = getattr(routing, "serialize_response", None)
    try:
        ok = (
            inspect.iscoroutinefunction(run_endpoint)
            and {"dependant", "values", "is_coroutine"}
            <= set(inspect.signature(run_endpoint).parameters)
            and inspect.iscoroutinefunction(serialize)
        )
    except Exception:  # pragma: no cover - defensive
        ok = False
    if not ok:  # pragma: no cover - depends on the FastAPI version
        logger.info("fastprof: FastAPI endpoint phases not found; no phase spans")
        return
    assert run_endpoint is not None and serialize is not None
    setattr(routing, "run_endpoint_function", _patch_endpoint(run_endpoint))  # noqa: B010
    setattr(routing, "serialize_response", _patch_serialize(serialize))  # noqa: B010


# --------------------------------------------------------------------------- per-callable data


class _CallInfo:
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
        name = qualname[:_MAX_NAME]
        self.name = name
        self.kind = kind
        self.on_loop = kind in ("async", "async_generator")
        self.code_name = f"{module}.{qualname}"[:_MAX_NAME] if module else name
        self.span_name = f"dependency {name}"
        self.teardown_name = f"teardown {name}"
        shown = "class" if isinstance(target, type) else kind
        self.attributes = {"code.function.name": self.code_name, "fastprof.dependency.kind": shown}
        self.teardown_attributes = {**self.attributes, "fastprof.dependency.phase": "teardown"}


_wrappers: weakref.WeakKeyDictionary[Any, Callable[..., Any]] = weakref.WeakKeyDictionary()
_unweakable: dict[int, tuple[Any, Callable[..., Any]]] = {}
#: (marked_only, root) -> {id(dependant): (dependant, mirror, _CallInfo of mirror.call or None)}
_mirrors: dict[tuple[bool, bool], dict[int, tuple[Any, Any, _CallInfo | None]]] = {
    (marked, root): {} for marked in (False, True) for root in (False, True)
}
#: The sub-dependant caches, indexed by ``marked_only`` (the solver's hot path).
_sub_mirrors: Final = (_mirrors[(False, False)], _mirrors[(True, False)])
_marked: weakref.WeakSet[Any] = weakref.WeakSet()
_marked_unweakable: dict[int, Any] = {}


def mark(call: Any) -> None:
    """Time ``call`` in ``dependencies="marked"`` mode (see :mod:`fastprof.depends`)."""
    try:
        _marked.add(call)
    except TypeError:
        if len(_marked_unweakable) < _MAX_UNWEAKABLE:
            _marked_unweakable[id(call)] = call


def is_marked(call: Any) -> bool:
    original = _original_of(call)
    try:
        return original in _marked
    except TypeError:
        return _marked_unweakable.get(id(original)) is original


def _kind(call: Any) -> str:
    assert _Support.is_gen and _Support.is_async_gen and _Support.is_coroutine
    if _Support.is_async_gen(call):
        return "async_generator"
    if _Support.is_gen(call):
        return "generator"
    if _Support.is_coroutine(call):
        return "async"
    return "sync"


def _wrapper_for(call: Any) -> Any:
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
    wrapper = _make_wrapper(call, _CallInfo(call, _kind(call)))
    if weakable:
        _wrappers[call] = wrapper
    elif len(_unweakable) < _MAX_UNWEAKABLE:
        _unweakable[id(call)] = (call, wrapper)
    else:
        return call  # keep identity stable: never hand out two wrappers for one callable
    return wrapper


def _original_of(call: Any) -> Any:
    if isinstance(call, types.FunctionType):
        return call.__dict__.get("__fastprof_original__", call)
    return call


def _make_wrapper(call: Any, info: _CallInfo) -> Callable[..., Any]:
    # The wrapper bodies use only closure variables and builtins, so they can be
    # rebuilt with the dependency's own globals: FastAPI < 0.116 resolves string
    # annotations with the *wrapper's* __globals__ when an override is active.
    wrapper: Callable[..., Any]
    if info.kind == "async":
        wrapper = _async_wrapper(call, info, _begin, _end)
    elif info.kind == "sync":
        wrapper = _sync_wrapper(call, info, _begin, _end)
    elif info.kind == "generator":
        wrapper = _gen_wrapper(call, info, _GenDriver, _STOP)
    else:
        wrapper = _async_gen_wrapper(call, info, _AsyncGenDriver, _STOP)
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


def _async_wrapper(fn: Any, info: _CallInfo, begin: Any, end: Any) -> Callable[..., Any]:
    # One coroutine per call: the timing is inline, not in a second coroutine.
    active = _active

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker = active.get()
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


def _sync_wrapper(fn: Any, info: _CallInfo, begin: Any, end: Any) -> Callable[..., Any]:
    active = _active
    partial = functools.partial

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker = active.get()
        node = begin(tracker, info, False) if tracker is not None else None
        if node is None:
            return fn(*args, **kwargs)
        try:
            hook = tracker.state.worker_hook  # type: ignore[union-attr]
            result = fn(*args, **kwargs) if hook is None else hook(partial(fn, *args, **kwargs))
        except BaseException as exc:
            end(node, False, exc, "dependency")
            raise
        end(node, False, None, "dependency")
        return result

    return wrapper


def _gen_wrapper(fn: Any, info: _CallInfo, driver: Any, stop: object) -> Callable[..., Any]:
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


def _async_gen_wrapper(fn: Any, info: _CallInfo, driver: Any, stop: object) -> Callable[..., Any]:
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


def _wrapper_if_timed(call: Any, marked_only: bool) -> Any:
    if marked_only and not is_marked(call):
        return call
    return _wrapper_for(call)


def _mirror_of(dependant: Any, marked_only: bool, root: bool) -> Any:
    """``dependant`` with every dependency below it calling fastprof's wrappers."""
    return _mirror_entry(dependant, marked_only, root)[1]


def _mirror_entry(
    dependant: Any, marked_only: bool, root: bool
) -> tuple[Any, Any, _CallInfo | None]:
    """``(dependant, its mirror, the _CallInfo of the mirror's call or None)``.

    Built once per dependant (and mode) and cached: the request path only does a
    dict lookup. Mirrors are fixed points (a mirror's mirror is itself), so the
    sub-dependants FastAPI hands back to the solver are recognised at once.
    """
    cache = _mirrors[(marked_only, root)]
    entry = cache.get(id(dependant))
    if entry is not None and entry[0] is dependant:
        return entry
    mirror = dependant
    changed = False
    subs = []
    for sub in dependant.dependencies:
        sub_mirror = _mirror_of(sub, marked_only, root=False)
        changed = changed or sub_mirror is not sub
        subs.append(sub_mirror)
    call = dependant.call if root else _wrapper_if_timed(dependant.call, marked_only)
    if changed or call is not dependant.call:
        mirror = copy.copy(dependant)
        mirror.dependencies = subs
        mirror.call = call
    info = None if root else _info_of(mirror.call)
    if len(cache) >= _MAX_MIRRORS:
        cache.clear()
    entry = cache[id(dependant)] = (dependant, mirror, info)
    if mirror is not dependant:
        subs_cache = _sub_mirrors[marked_only]
        if len(subs_cache) >= _MAX_MIRRORS:
            subs_cache.clear()
        subs_cache[id(mirror)] = (mirror, mirror, _info_of(call))
    return entry


class _OverridesView:
    """``app.dependency_overrides`` as seen through fastprof's wrappers.

    Read live from the provider on every lookup, as FastAPI does: a dependency
    may install (or replace) an override for the ones solved after it.
    """

    __slots__ = ("_marked_only", "_provider")

    def __init__(self, provider: Any, marked_only: bool) -> None:
        self._provider = provider
        self._marked_only = marked_only

    def __bool__(self) -> bool:
        return bool(self._provider.dependency_overrides)

    def get(self, key: Any, default: Any = None) -> Any:
        overrides = self._provider.dependency_overrides
        original = _original_of(key)
        if original in overrides:
            override = overrides[original]
            if self._marked_only and not (is_marked(original) or is_marked(override)):
                return override
            return _wrapper_for(override)
        return default


class _OverridesProvider:
    __slots__ = ("dependency_overrides",)

    def __init__(self, provider: Any, marked_only: bool) -> None:
        self.dependency_overrides = _OverridesView(provider, marked_only)


# --------------------------------------------------------------------------- per-request data


class _Tracker:
    """Per-request dependency bookkeeping (only for requests whose span records)."""

    __slots__ = (
        "current",
        "epoch_offset",
        "marked_only",
        "max_spans",
        "pending",
        "phases",
        "server_ctx",
        "state",
        "token",
        "tracer",
    )

    def __init__(
        self, tracer: trace.Tracer, max_spans: int, state: RequestState, marked_only: bool
    ) -> None:
        #: Emit fastprof phase spans (no native operation span around the solver).
        self.phases = False
        self.tracer = tracer
        self.max_spans = max_spans
        self.state = state
        self.marked_only = marked_only
        self.pending: _Node | None = None
        self.current: _Node | None = None  # the dependant being solved
        self.epoch_offset = time.time_ns() - time.perf_counter_ns()
        self.server_ctx: Context | None = None
        self.token: Any = None


class _Node:
    """One dependency (or the root being solved) in one request."""

    __slots__ = (
        "called_ns",
        "ctx",
        "dropped",
        "info",
        "mirror",
        "parent",
        "prev_operation",
        "ready_ns",
        "span",
        "span_ctx",
        "start_ns",
        "token",
        "tracker",
    )

    def __init__(
        self, tracker: _Tracker, info: _CallInfo | None, parent: _Node | None, ctx: Context
    ) -> None:
        self.span_ctx: Context | None = None  # ctx with this node's span current
        self.tracker = tracker
        self.info = info  # None for the root, or a dependency fastprof does not time
        self.parent = parent
        self.ctx = ctx
        self.start_ns = time.perf_counter_ns()
        self.ready_ns = 0
        self.called_ns = 0
        self.span: Span | None = None
        self.dropped = False  # the cap refused its span
        self.mirror: Any = None
        self.token: Any = None
        self.prev_operation: str | None = None


#: The tracker of the current request, set only when its span is recording.
_active: ContextVar[_Tracker | None] = ContextVar("fastprof_dependencies", default=None)


def _take_span_slot(tracker: _Tracker) -> bool:
    """Count one more dependency span against the cap; ``False`` (counted as dropped) past it."""
    state = tracker.state
    if state.dependency_spans >= tracker.max_spans:
        state.dependency_spans_dropped += 1
        return False
    state.dependency_spans += 1
    return True


def _ensure_span(node: _Node) -> Span | None:
    """The node's span, created on first need (with its real start time).

    The context with the span current (``span_ctx``) is built with it: every
    dependency span is attached while its code runs, and is its children's parent.
    """
    span = node.span
    if span is None and not node.dropped:
        info = node.info
        if info is None:
            return None
        parent_ctx = _parent_context(node)  # parents first: they take their slots first
        if not _take_span_slot(node.tracker):
            node.dropped = True
            return None
        span = node.span = _phase_span(
            node.tracker, info.span_name, parent_ctx, node.start_ns, info.attributes
        )
        node.span_ctx = trace.set_span_in_context(span, node.ctx)
    return span


def _parent_context(node: _Node) -> Context:
    parent = node.parent
    while parent is not None:
        ctx = parent.span_ctx
        if ctx is not None:
            return ctx
        if _ensure_span(parent) is not None:
            return parent.span_ctx  # type: ignore[return-value]
        parent = parent.parent
    return node.ctx


def _end_unconsumed(node: _Node, cached: bool) -> None:
    """Close a dependency FastAPI resolved but did not call (cache hit, invalid input)."""
    span = node.span
    info = node.info
    if span is not None:
        if cached:
            span.set_attribute("fastprof.dependency.cache_hit", True)
        span.end(end_time=(node.ready_ns or time.perf_counter_ns()) + node.tracker.epoch_offset)
    elif cached and info is not None:
        # Visible without a second duration: an event on the span of what needed it.
        parent = node.parent
        target = _ensure_span(parent) if parent is not None else None
        if target is None:
            target = trace.get_current_span(node.ctx)
        if target.is_recording():
            target.add_event(
                "fastprof.dependency.cache_hit",
                {"code.function.name": info.code_name},
                timestamp=(node.ready_ns or time.perf_counter_ns()) + node.tracker.epoch_offset,
            )


def _settle_pending(tracker: _Tracker) -> None:
    node = tracker.pending
    if node is not None:
        tracker.pending = None
        _end_unconsumed(node, cached=True)


# --------------------------------------------------------------------------- the solver hook


def _patch(original: Callable[..., Any]) -> Callable[..., Any]:
    async def traced(tracker: _Tracker, kwargs: dict[str, Any]) -> Any:
        parent = tracker.current
        dependant = kwargs["dependant"]
        if parent is not None and parent.mirror is dependant:
            return await original(**kwargs)  # another layer of wrapping
        try:
            node = _enter_solve(tracker, parent, dependant, kwargs)
        except Exception as exc:
            _internal_errors.report("dependencies.solve_start", exc)
            return await original(**kwargs)
        tracker.current = node
        try:
            result = await original(**kwargs)
        except BaseException:
            tracker.current = parent
            try:
                _settle_pending(tracker)
                if node.span is not None:
                    node.span.end()
            except Exception as exc:
                _internal_errors.report("dependencies.solve_end", exc)
            raise
        tracker.current = parent
        try:
            _leave_solve(tracker, node, result)
        except Exception as exc:
            _internal_errors.report("dependencies.solve_end", exc)
        return result

    # A plain function returning the original coroutine: requests fastprof does
    # not trace (or does not sample) pay one ContextVar read and nothing else.
    @functools.wraps(original)
    def solve_dependencies(*args: Any, **kwargs: Any) -> Any:
        tracker = _active.get()
        if tracker is None or args or "dependant" not in kwargs:
            return original(*args, **kwargs)
        return traced(tracker, kwargs)

    solve_dependencies.__fastprof__ = True  # type: ignore[attr-defined]
    return solve_dependencies


def _enter_solve(
    tracker: _Tracker, parent: _Node | None, dependant: Any, kwargs: dict[str, Any]
) -> _Node:
    if tracker.pending is not None:
        _settle_pending(tracker)
    if parent is None:  # the root: the endpoint (or router) being solved
        mirror = _mirror_of(dependant, tracker.marked_only, root=True)
        ctx = current_context()
        node = _Node(tracker, None, None, ctx)
        # FastAPI's native telemetry makes its ``fastapi.dependencies`` span current
        # here; without it the request span is current and fastprof adds phases
        # (to a sampled request: an unsampled one only records timings).
        span = tracker.state.span
        if trace.get_current_span(ctx) is span and span.is_recording():
            tracker.phases = True
            tracker.server_ctx = ctx  # the parent of teardown spans
            node.span = _phase_span(
                tracker, "fastprof.dependencies", ctx, node.start_ns, _DEPENDENCIES_PHASE
            )
            node.ctx = node.span_ctx = trace.set_span_in_context(node.span, ctx)
        provider = kwargs.get("dependency_overrides_provider")
        # Even when it is empty now: FastAPI reads it again for every sub-dependency.
        if (
            provider is not None
            and not isinstance(provider, _OverridesProvider)
            and getattr(provider, "dependency_overrides", None) is not None
        ):
            kwargs["dependency_overrides_provider"] = _OverridesProvider(
                provider, tracker.marked_only
            )
    else:
        # Usually already a mirror (a fixed point); an override's fresh dependant is mirrored here.
        # info is None when FastAPI will call something fastprof did not wrap:
        # the node then only groups its children.
        entry = _sub_mirrors[tracker.marked_only].get(id(dependant))
        if entry is None or entry[0] is not dependant:
            entry = _mirror_entry(dependant, tracker.marked_only, root=False)
        _, mirror, info = entry
        node = _Node(tracker, info, parent, parent.ctx)
    node.mirror = mirror
    kwargs["dependant"] = mirror
    return node


def _phase_span(
    tracker: _Tracker,
    name: str,
    ctx: Context,
    start_ns: int,
    attributes: dict[str, Any],
    links: list[Link] | None = None,
) -> Span:
    """A span starting at ``start_ns`` (phase spans are not counted against the cap)."""
    return tracker.tracer.start_span(
        name,
        context=ctx,
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        links=links,
        start_time=start_ns + tracker.epoch_offset,
    )


def _info_of(call: Any) -> _CallInfo | None:
    if type(call) is types.FunctionType:
        info = call.__dict__.get("__fastprof_info__")
        if type(info) is _CallInfo:
            return info
    return None


def _leave_solve(tracker: _Tracker, node: _Node, result: Any) -> None:
    if tracker.pending is not None:
        _settle_pending(tracker)
    if node.info is None:
        if node.parent is None and node.span:
            node.span.end()  # the fastprof.dependencies phase
        return
    node.ready_ns = time.perf_counter_ns()
    if result.errors:
        _end_unconsumed(node, cached=False)  # invalid input: FastAPI will not call it
    else:
        tracker.pending = node  # the wrapper called next picks it up


# ------------------------------------------------------------------ endpoint and serialization


#: For a sync endpoint run in the thread pool: where its worker thread records the
#: time it started, and the request's worker hook (set while a profile is active).
_worker_run: ContextVar[tuple[list[int], Callable[[Callable[[], Any]], Any] | None] | None] = (
    ContextVar("fastprof_endpoint_worker_run", default=None)
)


class _Endpoint:
    """What fastprof needs of one endpoint, made once per dependant."""

    __slots__ = ("attributes", "dependant", "mirror", "name")

    def __init__(self, dependant: Any) -> None:
        call = dependant.call
        self.dependant = dependant
        #: Timing name and phase-span attributes.
        self.name: str = getattr(call, "__qualname__", "endpoint")
        self.attributes: dict[str, Any] = {
            "fastprof.phase": "endpoint",
            "code.function.name": _CallInfo(call, "endpoint").code_name,
        }
        #: For a sync endpoint: a copy of the dependant whose call records when a
        #: worker thread starts it and runs it through the profile's worker hook.
        self.mirror: Any = None

    def timed(self) -> Any:
        mirror = self.mirror
        if mirror is None:
            call = self.dependant.call

            @functools.wraps(call)
            def endpoint(*args: Any, **kwargs: Any) -> Any:
                run = _worker_run.get()
                if run is None:
                    return call(*args, **kwargs)
                box, hook = run
                box.append(time.perf_counter_ns())
                if hook is None:
                    return call(*args, **kwargs)
                return hook(functools.partial(call, *args, **kwargs))

            mirror = self.mirror = copy.copy(self.dependant)
            mirror.call = endpoint
        return mirror


_endpoints: dict[int, _Endpoint] = {}


def _endpoint(dependant: Any) -> _Endpoint:
    """The endpoint entry of ``dependant`` (cached per dependant; bounded)."""
    entry = _endpoints.get(id(dependant))
    if entry is None or entry.dependant is not dependant:
        if len(_endpoints) >= _MAX_MIRRORS:
            _endpoints.clear()
        entry = _endpoints[id(dependant)] = _Endpoint(dependant)
    return entry


def _patch_endpoint(original: Callable[..., Any]) -> Callable[..., Any]:
    async def traced(tracker: _Tracker, dependant: Any, values: Any, is_coroutine: bool) -> Any:
        span: Span | None = None
        token = None
        box: list[int] | None = None
        box_token = None
        name = "endpoint"
        submitted = time.perf_counter_ns()
        try:
            endpoint = _endpoint(dependant)
            name = endpoint.name
            if tracker.phases:
                ctx = current_context()
                span = _phase_span(
                    tracker, "fastprof.endpoint", ctx, submitted, endpoint.attributes
                )
                token = attach_context(trace.set_span_in_context(span, ctx))
            if not is_coroutine:
                dependant = endpoint.timed()
                box = []
                # Read by the endpoint mirror in the worker thread (and by nothing else).
                box_token = _worker_run.set((box, tracker.state.worker_hook))
        except Exception as exc:
            _internal_errors.report("dependencies.endpoint_start", exc)
        error: BaseException | None = None
        try:
            return await original(dependant=dependant, values=values, is_coroutine=is_coroutine)
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                if box_token is not None:
                    _worker_run.reset(box_token)
                if token is not None:
                    detach_context(token)
                end = time.perf_counter_ns()
                wait_s = (box[0] - submitted) / 1e9 if box else 0.0
                tracker.state.add_timing(
                    Timing(name, "endpoint", (end - submitted) / 1e9 - wait_s, wait_s)
                )
                if span is not None:
                    if box:
                        span.set_attribute("fastprof.threadpool.wait_s", wait_s)
                    if error is not None:
                        _record_error(span, error)
                    span.end(end_time=end + tracker.epoch_offset)
                elif box and tracker.state.span.is_recording():
                    tracker.state.span.set_attribute("fastprof.endpoint.threadpool.wait_s", wait_s)
            except Exception as exc:
                _internal_errors.report("dependencies.endpoint_end", exc)

    @functools.wraps(original)
    def run_endpoint_function(*, dependant: Any, values: Any, is_coroutine: bool) -> Any:
        tracker = _active.get()
        if tracker is None:
            return original(dependant=dependant, values=values, is_coroutine=is_coroutine)
        return traced(tracker, dependant, values, is_coroutine)

    run_endpoint_function.__fastprof__ = True  # type: ignore[attr-defined]
    return run_endpoint_function


def _patch_serialize(original: Callable[..., Any]) -> Callable[..., Any]:
    async def traced(tracker: _Tracker, args: Any, kwargs: Any) -> Any:
        span = None
        started = time.perf_counter_ns()
        if tracker.phases:
            try:
                span = _phase_span(
                    tracker,
                    "fastprof.serialization",
                    current_context(),
                    started,
                    _SERIALIZATION_PHASE,
                )
            except Exception as exc:
                _internal_errors.report("dependencies.serialization_start", exc)
        try:
            return await original(*args, **kwargs)
        except BaseException as exc:
            if span is not None:
                _record_error(span, exc)
            raise
        finally:
            try:
                end = time.perf_counter_ns()
                if span is not None:
                    span.end(end_time=end + tracker.epoch_offset)
                # For the slow-request log, with or without phase spans.
                tracker.state.add_timing(
                    Timing("serialization", "serialization", (end - started) / 1e9)
                )
            except Exception as exc:
                _internal_errors.report("dependencies.serialization_end", exc)

    @functools.wraps(original)
    def serialize_response(*args: Any, **kwargs: Any) -> Any:
        tracker = _active.get()
        if tracker is None:
            return original(*args, **kwargs)
        return traced(tracker, args, kwargs)

    serialize_response.__fastprof__ = True  # type: ignore[attr-defined]
    return serialize_response


# ------------------------------------------------------------------ running dependency code


def _begin(tracker: _Tracker, info: _CallInfo, on_loop: bool) -> _Node | None:
    """Start timing one run of a dependency (called by its wrapper): its span is
    started if needed and attached as the current one."""
    try:
        node = tracker.pending
        if node is not None and node.info is info:
            tracker.pending = None
        else:
            if node is not None:
                _settle_pending(tracker)
            parent = tracker.current
            ctx = parent.ctx if parent is not None else current_context()
            node = _Node(tracker, info, parent, ctx)
        node.called_ns = time.perf_counter_ns()
        if node.span is None and not node.dropped:
            _ensure_span(node)
    except Exception as exc:
        _internal_errors.report("dependencies.begin", exc)
        return None
    _attach(node, on_loop)
    return node


def _attach(node: _Node, on_loop: bool) -> None:
    try:
        ctx = node.span_ctx
        if ctx is not None:
            node.token = attach_context(ctx)
        if on_loop and node.info is not None:
            state = node.tracker.state
            node.prev_operation = state.current_operation
            state.current_operation = node.info.name
    except Exception as exc:
        _internal_errors.report("dependencies.attach", exc)


def _end(node: _Node, on_loop: bool, error: BaseException | None, kind: str) -> None:
    """End one run of dependency code: detach its span, record the timing, end the span."""
    try:
        token = node.token
        if token is not None:
            node.token = None
            try:
                detach_context(token)
            except Exception as exc:  # a token from another context: report, go on
                _internal_errors.report("dependencies.detach", exc)
        if on_loop:
            node.tracker.state.current_operation = node.prev_operation
    except Exception as exc:
        _internal_errors.report("dependencies.detach", exc)
    try:
        end = time.perf_counter_ns()
        info = node.info
        assert info is not None
        wait_s = 0.0
        if not on_loop and node.ready_ns and kind == "dependency":
            wait_s = max(0, node.called_ns - node.ready_ns) / 1e9
        tracker = node.tracker
        tracker.state.add_timing(Timing(info.name, kind, (end - node.called_ns) / 1e9, wait_s))
        span = node.span
        if span is not None:
            if wait_s:
                span.set_attribute("fastprof.threadpool.wait_s", wait_s)
            if error is not None:
                _record_error(span, error)
            span.end(end_time=end + tracker.epoch_offset)
    except Exception as exc:
        _internal_errors.report("dependencies.end", exc)


def _record_error(span: Span, error: BaseException) -> None:
    if isinstance(error, HTTPException):
        span.set_attribute("http.response.status_code", error.status_code)
        return
    span.set_attribute("error.type", error_type(error))
    if isinstance(error, Exception):
        span.record_exception(error, escaped=True)
        span.set_status(Status(StatusCode.ERROR))


def _call_in_worker(node: _Node, step: Callable[[], Any]) -> Any:
    hook = node.tracker.state.worker_hook
    return hook(step) if hook is not None else step()


def _begin_teardown(setup: _Node | None) -> _Node | None:
    if setup is None:
        return None
    try:
        tracker = setup.tracker
        info = setup.info
        assert info is not None
        node = _Node(tracker, info, None, setup.ctx)
        node.called_ns = node.start_ns
        span = None
        if _take_span_slot(tracker):  # the parent context and link only for a span
            if tracker.server_ctx is None:
                tracker.server_ctx = trace.set_span_in_context(tracker.state.span, setup.ctx)
            links = [Link(setup.span.get_span_context())] if setup.span is not None else None
            span = _phase_span(
                tracker,
                info.teardown_name,
                tracker.server_ctx,
                node.start_ns,
                info.teardown_attributes,
                links,
            )
        node.span = span
        if span is not None:
            node.span_ctx = trace.set_span_in_context(span, node.ctx)
        return node
    except Exception as exc:
        _internal_errors.report("dependencies.teardown_begin", exc)
        return None


class _GenDriver:
    """Drives a sync ``yield`` dependency for its wrapper (runs in worker threads)."""

    __slots__ = ("gen", "info", "node")

    def __init__(self, gen: Generator[Any, Any, Any], info: _CallInfo) -> None:
        self.gen = gen
        self.info = info
        self.node: _Node | None = None

    def _step(self, node: _Node | None, step: Callable[[], Any]) -> Any:
        return _call_in_worker(node, step) if node is not None else step()

    def start(self) -> Any:
        tracker = _active.get()
        node = self.node = _begin(tracker, self.info, False) if tracker is not None else None
        try:
            value = self._step(node, self.gen.__next__)
        except StopIteration:
            value = _STOP
        except BaseException as exc:
            if node is not None:
                _end(node, False, exc, "dependency")
            raise
        if node is not None:
            _end(node, False, None, "dependency")
        return value

    def send(self, sent: Any) -> Any:
        return self._resume(functools.partial(self.gen.send, sent), None)

    def throw(self, exc: BaseException) -> Any:
        if isinstance(exc, GeneratorExit):
            self.gen.close()
            raise exc
        return self._resume(functools.partial(self.gen.throw, exc), exc)

    def _resume(self, step: Callable[[], Any], thrown: BaseException | None) -> Any:
        node = _begin_teardown(self.node)
        if node is not None:
            _attach(node, False)
        try:
            value = self._step(node, step)
        except StopIteration:
            value = _STOP
        except BaseException as exc:
            if node is not None:
                _end(node, False, None if exc is thrown else exc, "teardown")
            raise
        if node is not None:
            _end(node, False, None, "teardown")
        return value


class _AsyncGenDriver:
    """Drives an async ``yield`` dependency for its wrapper (runs on the event loop)."""

    __slots__ = ("agen", "info", "node")

    def __init__(self, agen: Any, info: _CallInfo) -> None:
        self.agen = agen
        self.info = info
        self.node: _Node | None = None

    async def start(self) -> Any:
        tracker = _active.get()
        node = self.node = _begin(tracker, self.info, True) if tracker is not None else None
        try:
            value = await self.agen.__anext__()
        except StopAsyncIteration:
            value = _STOP
        except BaseException as exc:
            if node is not None:
                _end(node, True, exc, "dependency")
            raise
        if node is not None:
            _end(node, True, None, "dependency")
        return value

    async def send(self, sent: Any) -> Any:
        return await self._resume(self.agen.asend(sent), None)

    async def throw(self, exc: BaseException) -> Any:
        if isinstance(exc, GeneratorExit):
            await self.agen.aclose()
            raise exc
        return await self._resume(self.agen.athrow(exc), exc)

    async def _resume(self, step: Any, thrown: BaseException | None) -> Any:
        node = _begin_teardown(self.node)
        if node is not None:
            _attach(node, True)
        try:
            value = await step
        except StopAsyncIteration:
            value = _STOP
        except BaseException as exc:
            if node is not None:
                _end(node, True, None if exc is thrown else exc, "teardown")
            raise
        if node is not None:
            _end(node, True, None, "teardown")
        return value


# --------------------------------------------------------------------------- public component


class DependencySpans(RequestHooks):
    """Per-dependency spans for FastAPI apps: pass it in ``hooks=[...]``.

    Usage::

        fastprof.instrument(app, hooks=[fastprof.DependencySpans()])

    Every ``Depends``/``Security`` of a traced request gets a span named
    ``dependency <qualname>`` (children: its own sub-dependencies), and every
    ``yield`` dependency a ``teardown <qualname>`` span for the code after
    ``yield``. Each run is also recorded in ``RequestState.timings`` (kinds
    ``"dependency"`` and ``"teardown"``, with threadpool wait for sync code).

    Creating the first instance hooks FastAPI's dependency solver once per
    process; requests fastprof does not trace are unaffected. Without FastAPI,
    or with an unsupported version, it does nothing.

    Args:
        tracer_provider: Provider for the spans; defaults to the global one. Use
            the same one as :class:`~fastprof.FastprofMiddleware`.
        max_spans: Most dependency spans per request (setup and teardown count
            alike). Further ones are counted in the server span attribute
            ``fastprof.dependency_spans_dropped``; timings are still recorded.
        mode: ``"all"`` times every dependency; ``"marked"`` only those declared
            with :func:`fastprof.Depends` / :func:`fastprof.Security`.
        timings_when_unsampled: Also record ``RequestState.timings`` (no spans) for
            requests whose span is not sampled, so a slow-request log can explain
            them. Off by default: unsampled requests then cost nothing here.
        profiled_requests: Also follow requests whose span is not sampled while
            they are being profiled (timings only, no spans), so their sync
            dependencies and endpoints run through the profile's worker hook and
            appear in the profile. Needs the profiling hook to come before this
            one (``instrument(profiling=...)`` puts it first; it sets this option
            on the instance it creates, set it yourself on one you pass in
            ``hooks``).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        max_spans: int = DEFAULT_MAX_SPANS,
        mode: str = "all",
        timings_when_unsampled: bool = False,
        profiled_requests: bool = False,
    ) -> None:
        self._tracer = fastprof_tracer(tracer_provider)
        check_int("max_spans", max_spans, 0, 10_000)
        if mode not in ("all", "marked"):
            raise ValueError(f"mode: expected 'all' or 'marked', got {mode!r}")
        self._max_spans = max_spans
        self._marked_only = mode == "marked"
        self.enabled = _install()
        self._timings_when_unsampled = bool(timings_when_unsampled)
        # Unsampled requests skip this hook entirely unless timings are wanted or
        # they may be profiled (and FastAPI is there and supported).
        self.unsampled_requests = (
            self._timings_when_unsampled or bool(profiled_requests)
        ) and self.enabled

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        if not self.enabled:
            return
        if state.span.is_recording():
            max_spans = self._max_spans
        elif self._timings_when_unsampled or state.worker_hook is not None:
            max_spans = 0  # timings only: no span for an unsampled request
        else:
            return  # unsampled: FastAPI runs exactly as without fastprof
        tracker = _Tracker(self._tracer, max_spans, state, self._marked_only)
        if state.extra is None:
            state.extra = {}
        state.extra[_EXTRA_KEY] = tracker
        tracker.token = _active.set(tracker)

    def on_request_end(self, state: RequestState) -> None:
        tracker = state.extra.get(_EXTRA_KEY) if state.extra else None
        if not isinstance(tracker, _Tracker):
            return
        _settle_pending(tracker)
        if state.dependency_spans_dropped and state.span.is_recording():
            state.span.set_attribute(
                "fastprof.dependency_spans_dropped", state.dependency_spans_dropped
            )

    def on_app_exit(self, state: RequestState) -> None:
        # pop: breaks the state <-> tracker reference cycle, so both are freed now.
        tracker = state.extra.pop(_EXTRA_KEY, None) if state.extra else None
        if isinstance(tracker, _Tracker) and tracker.token is not None:
            token, tracker.token = tracker.token, None
            _active.reset(token)
