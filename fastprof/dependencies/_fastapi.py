"""Everything fastprof does with FastAPI's internals, in one place.

* **Detection** (:func:`install`): feature-detects the installed FastAPI once
  per process; an unsupported version leaves FastAPI untouched.
* **The solver**: FastAPI resolves a route's dependencies with
  ``solve_dependencies``, which calls itself (through its module global) once
  per sub-dependency. fastprof replaces that module global, and
  ``fastapi.routing``'s reference to it, with one wrapper that hands the
  original solver a mirror of the dependant (see ``_mirrors``). Requests that
  fastprof does not follow pass straight through.
* **Endpoint and serialization**: ``run_endpoint_function`` and
  ``serialize_response`` are wrapped to time (and, without native telemetry,
  span) the endpoint and serialization phases.
* **The overrides view**: ``app.dependency_overrides`` as seen through
  fastprof's wrappers, so overrides still match the original callables.

Tests in ``tests/dependencies/test_fastapi_internals.py`` check these internals
against the installed FastAPI.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span

from fastprof import _internal_errors
from fastprof._context import RequestState, Timing
from fastprof._otel import attach_context, current_context, detach_context
from fastprof._records import Record
from fastprof.attributes import (
    DEPENDENCIES_PHASE_SPAN,
    ENDPOINT_PHASE_SPAN,
    ENDPOINT_THREADPOOL_WAIT_S,
    PHASE,
    SERIALIZATION_PHASE_SPAN,
    THREADPOOL_WAIT_S,
)
from fastprof.dependencies._calls import CallInfo, Kinds
from fastprof.dependencies._mirrors import MAX_MIRRORS, mirror_entry, mirror_of, sub_mirrors
from fastprof.dependencies._tracker import (
    Node,
    Tracker,
    active,
    leave_solve,
    record_error,
    settle_pending,
    start_span,
)
from fastprof.dependencies._wrappers import is_marked, original_of, wrapper_for
from fastprof.hooks import run_in_worker

__all__ = ["install"]

logger = logging.getLogger("fastprof")

_DEPENDENCIES_PHASE: Final = {PHASE: "dependencies"}
_SERIALIZATION_PHASE: Final = {PHASE: "serialization"}


# --------------------------------------------------------------------------- installation


_supported: bool | None = None


def install() -> bool:
    """Hook the installed FastAPI once per process; whether it is supported."""
    global _supported
    if _supported is not None:
        return _supported
    try:
        import fastapi.dependencies.utils as utils
        import fastapi.routing as routing
    except ImportError:
        _supported = False
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
        _supported = False
        return False
    Kinds.is_gen = found["_is_gen_callable"]
    Kinds.is_async_gen = found["_is_async_gen_callable"]
    Kinds.is_coroutine = found["_is_coroutine_callable"]
    setattr(utils, "solve_dependencies", _patch(original))  # noqa: B010
    routing_solve = getattr(routing, "solve_dependencies", None)
    if routing_solve is not None and not getattr(routing_solve, "__fastprof__", False):
        setattr(routing, "solve_dependencies", _patch(routing_solve))  # noqa: B010
    _install_phases(routing)
    _supported = True
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
        original = original_of(key)
        if original in overrides:
            override = overrides[original]
            if self._marked_only and not (is_marked(original) or is_marked(override)):
                return override
            return wrapper_for(override)
        return default


class _OverridesProvider:
    __slots__ = ("dependency_overrides", "provider")

    def __init__(self, provider: Any, marked_only: bool) -> None:
        self.provider = provider
        self.dependency_overrides = _OverridesView(provider, marked_only)


#: (id(provider), marked_only) -> its view: one per application, not one per request
#: (the view reads the overrides live). A process has one or a few applications.
_providers: dict[tuple[int, bool], _OverridesProvider] = {}
_MAX_PROVIDERS = 64


def _overrides_provider(provider: Any, marked_only: bool) -> _OverridesProvider:
    key = (id(provider), marked_only)
    view = _providers.get(key)
    if view is None or view.provider is not provider:
        if len(_providers) >= _MAX_PROVIDERS:
            _providers.clear()
        view = _providers[key] = _OverridesProvider(provider, marked_only)
    return view



# --------------------------------------------------------------------------- the pass-through


#: Names the generated pass-through uses itself (a parameter with one of them: no pass-through).
_PASSTHROUGH_NAMES: Final = frozenset({"tracker", "_original", "_active", "_traced"})


def _keyword_passthrough(
    original: Callable[..., Any], traced: Callable[[Tracker, dict[str, Any]], Any]
) -> Callable[..., Any] | None:
    """A wrapper of ``original`` with its own keyword-only signature, or ``None``.

    It calls ``original`` with the same arguments when no request is traced, else
    ``traced(tracker, kwargs)``. Spelling the parameters out (as ``dataclasses``
    generates ``__init__``) spares every request the ``**kwargs`` dictionary a
    generic wrapper builds and unpacks: FastAPI passes ``solve_dependencies`` and
    ``serialize_response`` a dozen keywords, and that round trip cost more than
    the rest of the wrapper. ``None`` (the caller keeps its generic wrapper) when
    the signature is not keyword-only or cannot be spelled out.
    """
    try:
        parameters = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return None
    if not parameters:
        return None
    namespace: dict[str, Any] = {"_original": original, "_active": active, "_traced": traced}
    declared: list[str] = []
    passed: list[str] = []
    for parameter in parameters:
        name = parameter.name
        if (
            parameter.kind is not inspect.Parameter.KEYWORD_ONLY
            or not name.isidentifier()
            or name in _PASSTHROUGH_NAMES
            or name.startswith("_default_")
        ):
            return None
        if parameter.default is inspect.Parameter.empty:
            declared.append(name)
        else:
            namespace[f"_default_{name}"] = parameter.default
            declared.append(f"{name}=_default_{name}")
        passed.append(f"{name}={name}")
    arguments = ", ".join(passed)
    source = (
        f"def {original.__name__}(*, {', '.join(declared)}):\n"
        "    tracker = _active.get()\n"
        "    if tracker is None:\n"
        f"        return _original({arguments})\n"
        f"    return _traced(tracker, dict({arguments}))\n"
    )
    try:
        exec(compile(source, f"<fastprof pass-through {original.__name__}>", "exec"), namespace)
    except SyntaxError:
        return None
    wrapper: Callable[..., Any] = functools.wraps(original)(namespace[original.__name__])
    wrapper.__fastprof__ = True  # type: ignore[attr-defined]
    return wrapper


# --------------------------------------------------------------------------- the solver hook


def _patch(original: Callable[..., Any]) -> Callable[..., Any]:
    async def traced(tracker: Tracker, kwargs: dict[str, Any]) -> Any:
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
                settle_pending(tracker)
                if node.span is not None:
                    node.span.end()
            except Exception as exc:
                _internal_errors.report("dependencies.solve_end", exc)
            raise
        tracker.current = parent
        try:
            leave_solve(tracker, node, result)
        except Exception as exc:
            _internal_errors.report("dependencies.solve_end", exc)
        return result

    fast = _keyword_passthrough(original, traced)
    if fast is not None:
        return fast

    # A plain function returning the original coroutine: requests fastprof does
    # not trace (or does not sample) pay one ContextVar read and nothing else.
    @functools.wraps(original)
    def solve_dependencies(*args: Any, **kwargs: Any) -> Any:
        tracker = active.get()
        if tracker is None or args or "dependant" not in kwargs:
            return original(*args, **kwargs)
        return traced(tracker, kwargs)

    solve_dependencies.__fastprof__ = True  # type: ignore[attr-defined]
    return solve_dependencies


def _enter_solve(
    tracker: Tracker, parent: Node | None, dependant: Any, kwargs: dict[str, Any]
) -> Node:
    if tracker.pending is not None:
        settle_pending(tracker)
    if parent is None:  # the root: the endpoint (or router) being solved
        mirror = mirror_of(dependant, tracker.marked_only, root=True)
        ctx = current_context()
        node = Node(tracker, None, None, ctx)
        # FastAPI's native telemetry makes its ``fastapi.dependencies`` span current
        # here; without it the request span is current and fastprof adds phases
        # (to a sampled request: an unsampled one only records timings).
        span = tracker.state.span
        if tracker.recording and trace.get_current_span(ctx) is span:
            tracker.phases = True
            tracker.server_ctx = ctx  # the parent of teardown spans
            node.span = start_span(
                tracker, DEPENDENCIES_PHASE_SPAN, ctx, node.start_ns, _DEPENDENCIES_PHASE
            )
            node.ctx = node.span_ctx = trace.set_span_in_context(node.span, ctx)
        elif tracker.records is not None:  # an unsampled request the capture follows
            node.record = tracker.records.add(
                DEPENDENCIES_PHASE_SPAN,
                _DEPENDENCIES_PHASE,
                node.start_ns + tracker.epoch_offset,
                None,
            )
        provider = kwargs.get("dependency_overrides_provider")
        # Even when it is empty now: FastAPI reads it again for every sub-dependency.
        if (
            provider is not None
            and not isinstance(provider, _OverridesProvider)
            and getattr(provider, "dependency_overrides", None) is not None
        ):
            kwargs["dependency_overrides_provider"] = _overrides_provider(
                provider, tracker.marked_only
            )
    else:
        # Usually already a mirror (a fixed point); an override's fresh dependant is mirrored here.
        # info is None when FastAPI will call something fastprof did not wrap:
        # the node then only groups its children.
        entry = sub_mirrors[tracker.marked_only].get(id(dependant))
        if entry is None or entry[0] is not dependant:
            entry = mirror_entry(dependant, tracker.marked_only, root=False)
        _, mirror, info = entry
        node = Node(tracker, info, parent, parent.ctx)
    node.mirror = mirror
    kwargs["dependant"] = mirror
    return node



# ------------------------------------------------------------------ endpoint and serialization


#: For a sync endpoint run in the thread pool: where its worker thread records the
#: time it started (``started``), and the request whose hooks it runs through.
_worker_run: ContextVar[tuple[list[int], RequestState] | None] = (
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
            PHASE: "endpoint",
            "code.function.name": CallInfo(call, "endpoint").code_name,
        }
        #: For a sync endpoint: a copy of the dependant whose call records when a
        #: worker thread starts it and runs it through the request's worker hooks.
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
                started, state = run
                started.append(time.perf_counter_ns())
                if not state._worker_hooks:
                    return call(*args, **kwargs)
                return run_in_worker(state, functools.partial(call, *args, **kwargs))

            mirror = self.mirror = copy.copy(self.dependant)
            mirror.call = endpoint
        return mirror


_endpoints: dict[int, _Endpoint] = {}


def _endpoint(dependant: Any) -> _Endpoint:
    """The endpoint entry of ``dependant`` (cached per dependant; bounded)."""
    entry = _endpoints.get(id(dependant))
    if entry is None or entry.dependant is not dependant:
        if len(_endpoints) >= MAX_MIRRORS:
            _endpoints.clear()
        entry = _endpoints[id(dependant)] = _Endpoint(dependant)
    return entry


def _patch_endpoint(original: Callable[..., Any]) -> Callable[..., Any]:
    async def traced(tracker: Tracker, dependant: Any, values: Any, is_coroutine: bool) -> Any:
        span: Span | Record | None = None
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
                span = start_span(
                    tracker, ENDPOINT_PHASE_SPAN, ctx, submitted, endpoint.attributes
                )
                token = attach_context(trace.set_span_in_context(span, ctx))
            elif tracker.records is not None:
                span = tracker.records.add(
                    ENDPOINT_PHASE_SPAN, endpoint.attributes, submitted + tracker.epoch_offset, None
                )
            if not is_coroutine:
                dependant = endpoint.timed()
                box = []
                # Read by the endpoint mirror in the worker thread (and by nothing else).
                box_token = _worker_run.set((box, tracker.state))
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
                        span.set_attribute(THREADPOOL_WAIT_S, wait_s)
                    if error is not None:
                        record_error(span, error)
                    span.end(end_time=end + tracker.epoch_offset)
                elif box and tracker.state.span.is_recording():
                    tracker.state.span.set_attribute(ENDPOINT_THREADPOOL_WAIT_S, wait_s)
            except Exception as exc:
                _internal_errors.report("dependencies.endpoint_end", exc)

    @functools.wraps(original)
    def run_endpoint_function(*, dependant: Any, values: Any, is_coroutine: bool) -> Any:
        tracker = active.get()
        if tracker is None:
            return original(dependant=dependant, values=values, is_coroutine=is_coroutine)
        return traced(tracker, dependant, values, is_coroutine)

    run_endpoint_function.__fastprof__ = True  # type: ignore[attr-defined]
    return run_endpoint_function


def _patch_serialize(original: Callable[..., Any]) -> Callable[..., Any]:
    async def traced(tracker: Tracker, kwargs: Any, args: Any = ()) -> Any:
        span: Span | Record | None = None
        started = time.perf_counter_ns()
        if tracker.phases or tracker.records is not None:
            try:
                if tracker.records is not None:
                    span = tracker.records.add(
                        SERIALIZATION_PHASE_SPAN,
                        _SERIALIZATION_PHASE,
                        started + tracker.epoch_offset,
                        None,
                    )
                else:
                    span = start_span(
                        tracker,
                        SERIALIZATION_PHASE_SPAN,
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
                record_error(span, exc)
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

    fast = _keyword_passthrough(original, traced)
    if fast is not None:
        return fast

    @functools.wraps(original)
    def serialize_response(*args: Any, **kwargs: Any) -> Any:
        tracker = active.get()
        if tracker is None:
            return original(*args, **kwargs)
        return traced(tracker, kwargs, args)

    serialize_response.__fastprof__ = True  # type: ignore[attr-defined]
    return serialize_response

