"""One OpenTelemetry span per FastAPI ``Depends``, nested like the dependency tree.

How the pieces fit (``docs/architecture.md`` has the picture):

* ``_fastapi``: the only module that touches FastAPI's internals (detection,
  the solver, endpoint and serialization hooks, the overrides view);
* ``_mirrors``: cached copies of dependants whose dependencies call fastprof's wrappers;
* ``_wrappers``: the wrappers, of the same kind as each dependency, and the
  drivers of ``yield`` dependencies;
* ``_tracker``: one request's span tree, and the hand-off between resolving a
  dependency and calling it;
* this module: :class:`DependencySpans`, the per-request component.

Span model: a dependency's span starts when FastAPI starts resolving it (so its
own sub-dependencies are its children) and ends when its code returns, or, for
a ``yield`` dependency, when it yields. The code after ``yield`` gets its own
``teardown`` span, whenever FastAPI runs it, parented to the request's server
span and linked to the setup span. A dependency served from FastAPI's cache gets
no span of its own unless one of its sub-dependencies really ran.
"""

from __future__ import annotations

from typing import Final, Literal

from opentelemetry.trace import TracerProvider
from starlette.types import Scope

from fastprof._context import RequestState
from fastprof._options import check_int
from fastprof._otel import fastprof_tracer
from fastprof.attributes import DEPENDENCY_SPANS_DROPPED
from fastprof.dependencies._fastapi import install
from fastprof.dependencies._tracker import Tracker, active, settle_pending
from fastprof.hooks import RequestHooks

__all__ = ["DEFAULT_MAX_SPANS", "DependencySpans"]

DEFAULT_MAX_SPANS: Final = 256


# --------------------------------------------------------------------------- public component


class DependencySpans(RequestHooks):
    """Per-dependency spans for FastAPI apps.

    ``fastprof.instrument(app)`` turns them on with the defaults; pass an
    instance to change the options, or ``False`` to turn them off::

        fastprof.instrument(app, dependencies=fastprof.DependencySpans(mode="marked"))

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
            ``fastprof.dependency_spans_dropped``; timings are still recorded
            (0-10000).
        mode: ``"all"`` times every dependency; ``"marked"`` only those declared
            with :func:`fastprof.Depends` / :func:`fastprof.Security`.
        timings_when_unsampled: Also record ``RequestState.timings`` (no spans) for
            requests whose span is not sampled, so a slow-request log can explain
            them. Off by default: unsampled requests then cost nothing here.
        profiled_requests: Also follow requests whose span is not sampled while
            they are being profiled (timings only, no spans), so their sync
            dependencies and endpoints run through the profile's worker hook and
            appear in the profile. ``instrument(profiling=...)`` turns it on;
            profiling's hooks always run before these (:attr:`RequestHooks.order`).
    """

    order = 100

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        max_spans: int = DEFAULT_MAX_SPANS,
        mode: Literal["all", "marked"] = "all",
        timings_when_unsampled: bool = False,
        profiled_requests: bool = False,
    ) -> None:
        check_int("max_spans", max_spans, 0, 10_000)
        if mode not in ("all", "marked"):
            raise ValueError(f"mode: expected 'all' or 'marked', got {mode!r}")
        self.tracer_provider = tracer_provider
        self.max_spans = max_spans
        self.mode: Literal["all", "marked"] = mode
        self.timings_when_unsampled = bool(timings_when_unsampled)
        self.profiled_requests = bool(profiled_requests)
        self._tracer = fastprof_tracer(tracer_provider)
        self._marked_only = mode == "marked"
        self.enabled = install()
        # Unsampled requests skip this hook entirely unless timings are wanted or
        # they may be profiled (and FastAPI is there and supported).
        self.unsampled_requests = (
            self.timings_when_unsampled or self.profiled_requests
        ) and self.enabled
        # Without timings for every request, it runs for the unsampled requests
        # another component wants (profiled ones), never by itself.
        self.follows_unsampled = not self.timings_when_unsampled

    def wants_unsampled(self, scope: Scope) -> bool:
        # Timings for the slow-request log: every unsampled request. Only for
        # profiled requests: not by itself (it follows the requests profiling wants).
        return self.timings_when_unsampled

    def _configured(
        self,
        tracer_provider: TracerProvider | None,
        timings_when_unsampled: bool,
        profiled_requests: bool,
        on_demand: bool = False,
    ) -> DependencySpans:
        """This component as ``instrument()`` runs it: its options, plus what the
        other components need (its own ``tracer_provider`` wins over ``instrument()``'s).

        ``on_demand``: another component may ask, per request, for the timings of
        an unsampled one (``RequestState._wants_timings``: the slow-request
        capture, Server-Timing)."""
        configured = DependencySpans(
            tracer_provider=self.tracer_provider or tracer_provider,
            max_spans=self.max_spans,
            mode=self.mode,
            timings_when_unsampled=self.timings_when_unsampled or timings_when_unsampled,
            profiled_requests=self.profiled_requests or profiled_requests,
        )
        if on_demand:
            configured.unsampled_requests = configured.enabled
        return configured

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        if not self.enabled:
            return
        recording = state.span.is_recording()
        if recording:
            max_spans = self.max_spans
        elif self.timings_when_unsampled or state.profile_id is not None or state._wants_timings:
            max_spans = 0  # timings only: no span for an unsampled request
        else:
            return  # unsampled: FastAPI runs exactly as without fastprof
        tracker = state._dependencies = Tracker(
            self._tracer, max_spans, state, self._marked_only, recording
        )
        if max_spans == 0 and state._capture is not None:
            # The slow-request capture follows it: cheap records instead of spans.
            tracker.records = state._capture
            tracker.spans_on = True  # records take the place of spans
            tracker.epoch_offset = state._capture.epoch_offset
        tracker.token = active.set(tracker)

    def on_request_end(self, state: RequestState) -> None:
        tracker = state._dependencies
        if tracker is None:
            return
        settle_pending(tracker)
        if tracker.spans_dropped and state.span.is_recording():
            state.span.set_attribute(DEPENDENCY_SPANS_DROPPED, tracker.spans_dropped)

    def on_app_exit(self, state: RequestState) -> None:
        # Breaks the state <-> tracker reference cycle, so both are freed now.
        tracker: Tracker | None = state._dependencies
        if tracker is not None:
            state._dependencies = None
            if tracker.token is not None:
                token, tracker.token = tracker.token, None
                active.reset(token)
            tracker.release()
