"""``RequestHooks``: the per-request contract between the middleware and fastprof's components.

:class:`~fastprof.FastprofMiddleware` calls the hooks of every traced request at
fixed points of its life (the *phases*, in this order):

1. :meth:`~RequestHooks.on_request_start`: in the request's task, before the app runs;
2. :meth:`~RequestHooks.run_in_worker`: around each piece of sync code fastprof
   runs in a worker thread for the request (sync dependencies, sync endpoints),
   and :meth:`~RequestHooks.on_operation_end` as each dependency that ran on the
   event loop ends;
3. :meth:`~RequestHooks.on_response_start`: before ``http.response.start`` leaves;
4. :meth:`~RequestHooks.on_response_complete`: as the response's last message
   is about to leave, before fastprof's own end-of-request work;
5. :meth:`~RequestHooks.on_request_end`: once the response completed (or failed),
   before the span ends;
6. :meth:`~RequestHooks.on_app_exit`: when the application call returns or raises.

Within a phase, hooks run in ascending :attr:`~RequestHooks.order` (stable for
equal orders): fastprof's profiling decides first (-100), your hooks run at 0,
then dependency spans (100), the loop monitor (200) and the slow-request log
(300), which reads what all the others recorded. Only the hooks that override a
phase are called for it, chosen once when the middleware is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from starlette.types import Message, Scope

from fastprof import _internal_errors

if TYPE_CHECKING:
    from fastprof._context import RequestState

__all__ = ["RequestHooks"]

T = TypeVar("T")


class RequestHooks:
    """Extension points the middleware calls for each traced request.

    Components (profiling, dependency spans, loop monitoring, slow-request log)
    subclass this and override what they need. Every call is guarded: a hook
    that raises is reported and skipped, never propagated into the request.
    """

    #: Where the hook runs within each phase (ascending). fastprof's components:
    #: profiling -100, dependency spans 100, loop monitor 200, slow-request log 300.
    order: ClassVar[int] = 0

    #: Whether the hook is called for requests whose span is not recording
    #: (unsampled). A hook that sets it to ``False`` (class or instance
    #: attribute, read once when the middleware is built) is skipped for them,
    #: and an unsampled request that no hook needs costs fastprof no more than
    #: its span and context.
    unsampled_requests: bool = True

    #: fastprof's own components contain their failures themselves: their
    #: ``run_in_worker`` is called without the guard (no extra frame in a profile).
    _never_raises: ClassVar[bool] = False

    #: ``False`` when the component has nothing to do (e.g. profiling with no
    #: trigger configured, dependency spans without a supported FastAPI): the
    #: middleware then never calls it. Read once when the middleware is built.
    enabled: bool = True

    #: ``True`` when the hook never wants an unsampled request by itself: its phases
    #: run only for the unsampled requests another hook wants (dependency timings for
    #: a profiled request), so :meth:`wants_unsampled` is not asked for each one.
    #: Read once when the middleware is built.
    follows_unsampled: bool = False

    #: Set (seconds) when all the hook needs of an unsampled request is
    #: :meth:`on_request_end`, and only if the request took at least this long
    #: (the slow-request log with ``dependencies="traced"``). Such a hook does not
    #: make unsampled requests leave the lean path: fastprof notes their status
    #: and end with one ``send`` wrapper and calls :meth:`on_request_end` of the
    #: slow ones, with :attr:`~fastprof.RequestState.route` and the duration
    #: known. For an unsampled request another hook wants, and for a sampled one,
    #: every phase runs as for any hook, ``on_request_end`` whatever the duration.
    #: Read once when the middleware is built.
    unsampled_end_threshold_s: float | None = None

    #: ``True`` when :meth:`wants_unsampled` is exact: this hook does nothing for an
    #: unsampled request it declines, so its phases are skipped for that request even
    #: when another hook wants it (profiling without a token). Read once when the
    #: middleware is built.
    skip_when_unwanted: ClassVar[bool] = False

    def wants_unsampled(self, scope: Scope) -> bool:
        """Whether this hook needs this unsampled request (one whose span does not record).

        Asked before the request starts, only of hooks that override it and only
        for unsampled requests: an unsampled request that no hook wants takes the
        middleware's lean path (no hooks, ``send``/``receive`` untouched). Keep it
        cheap: it runs for every unsampled request. A hook that does not override
        it wants every unsampled request (unless :attr:`unsampled_requests` is
        ``False``). Profiling, for example, wants only requests that carry a token;
        the loop monitor none once it watches the loop (it finds a blocking request
        on the loop thread's stack). When another hook wants the request, every
        hook's phases run for it, except those of a hook that declined it and sets
        :attr:`skip_when_unwanted`.
        """
        return True

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        """Called in the request's task before the application runs."""

    def run_in_worker(self, state: RequestState, call: Callable[[], T]) -> T:
        """Run ``call`` (sync code of this request, in a worker thread) and return its result.

        Called in the worker thread for each sync dependency, teardown and
        endpoint fastprof instruments. An override must call ``call()`` exactly
        once and return (or raise) what it does; a profile uses it to sample the
        worker thread. Hooks are nested in :attr:`order`: the first is outermost.
        """
        return call()

    def on_operation_end(self, state: RequestState, span: Any) -> None:
        """Called as a dependency that ran on the event loop ends, before its span ends.

        ``span`` is the dependency's span (or its slow-capture record). The loop
        monitor puts the report of a block still in progress on it while it is open.
        """

    def on_response_start(self, state: RequestState, message: Message) -> None:
        """Called before ``http.response.start`` is sent; may append headers."""

    def on_response_complete(self, state: RequestState) -> None:
        """Called once as the response's last message is about to be sent (or the app failed).

        Before fastprof's own end-of-request work (route resolution, span
        attributes, :meth:`on_request_end`), so that work is neither measured nor
        slowed by what stops here (a profile's sampler).
        """

    def on_request_end(self, state: RequestState) -> None:
        """Called once the response is complete (or failed), before the span ends.

        Usually in the request's task; with Starlette's streaming responses on
        ASGI spec < 2.4 the last body message is sent from a child task.
        """

    def on_app_exit(self, state: RequestState) -> None:
        """Called in the request's task when the application call returns or raises.

        This is after background tasks and, on FastAPI >= 0.118, after
        yield-dependency teardown; a SERVER span fastprof owns has already ended.
        """


def ordered(hooks: Iterable[RequestHooks]) -> tuple[RequestHooks, ...]:
    """``hooks`` validated and sorted by :attr:`RequestHooks.order` (stable)."""
    hooks = tuple(hooks)
    for hook in hooks:
        if not isinstance(hook, RequestHooks):
            raise ValueError(f"hooks: {hook!r} is not a fastprof RequestHooks")
    return tuple(sorted(hooks, key=lambda h: h.order))


class HookSet:
    """Per-phase tuples of the hooks that implement it: nothing to call is free."""

    __slots__ = (
        "complete",
        "empty",
        "end",
        "exit",
        "gates",
        "hooks",
        "operation",
        "response",
        "skippable",
        "start",
        "watchers",
        "without",
        "worker",
    )

    def __init__(self, hooks: tuple[RequestHooks, ...], *, skip_unwanted: bool = False) -> None:
        """``skip_unwanted``: the set serves unsampled requests, and leaves out of each
        the hooks that decline it with :attr:`RequestHooks.skip_when_unwanted` (see
        :meth:`for_request`)."""
        self.hooks = hooks
        #: ``(threshold in ns, hook)`` of the hooks that need an unsampled request only
        #: if it was slow (:attr:`RequestHooks.unsampled_end_threshold_s`), shortest first.
        self.watchers = tuple(
            sorted(
                (
                    (round(h.unsampled_end_threshold_s * 1e9), h)
                    for h in hooks
                    if h.unsampled_end_threshold_s is not None
                ),
                key=lambda pair: pair[0],
            )
        )
        #: ``wants_unsampled`` of every other hook (but those that follow), or ``None``
        #: when one of them wants every unsampled request (it does not override it).
        others = tuple(
            h for h in hooks if h.unsampled_end_threshold_s is None and not h.follows_unsampled
        )
        gated = _implementing(others, "wants_unsampled")
        self.gates = tuple(h.wants_unsampled for h in gated) if len(gated) == len(others) else None
        self.start = _implementing(hooks, "on_request_start")
        self.worker = _implementing(hooks, "run_in_worker")
        self.operation = _implementing(hooks, "on_operation_end")
        self.response = _implementing(hooks, "on_response_start")
        self.complete = _implementing(hooks, "on_response_complete")
        self.end = _implementing(hooks, "on_request_end")
        self.exit = _implementing(hooks, "on_app_exit")
        self.empty = not (
            self.start
            or self.worker
            or self.operation
            or self.response
            or self.complete
            or self.end
            or self.exit
        )
        #: The hooks whose phases are skipped for a request they decline (at most
        #: four), and the sets without them, made once here: ``without[mask]``
        #: leaves out ``skippable[i]`` when bit ``i`` of ``mask`` is set.
        self.skippable: tuple[RequestHooks, ...] = ()
        self.without: tuple[HookSet, ...] = ()
        if skip_unwanted:
            gated = _implementing(hooks, "wants_unsampled")
            self.skippable = tuple(h for h in gated if h.skip_when_unwanted)[:4]
            self.without = tuple(
                HookSet(
                    tuple(
                        h
                        for h in hooks
                        if not any(mask >> i & 1 and h is s for i, s in enumerate(self.skippable))
                    )
                )
                for mask in range(1 << len(self.skippable))
            )

    def for_request(self, scope: Scope) -> HookSet:
        """The hooks to run for an unsampled request: all, less the skippable ones that
        decline it (a failing check counts as wanting it)."""
        mask = 0
        for i, hook in enumerate(self.skippable):
            try:
                wanted = hook.wants_unsampled(scope)
            except Exception as exc:
                _internal_errors.report("hook.wants_unsampled", exc)
                wanted = True
            if not wanted:
                mask |= 1 << i
        return self.without[mask] if mask else self


def _implementing(hooks: tuple[RequestHooks, ...], method: str) -> tuple[RequestHooks, ...]:
    base = getattr(RequestHooks, method)
    return tuple(h for h in hooks if getattr(type(h), method, base) is not base)


def run_in_worker(state: RequestState, call: Callable[[], T]) -> T:
    """Run ``call`` for ``state``'s request through its hooks' :meth:`~RequestHooks.run_in_worker`.

    The worker-thread seam: dependency instrumentation calls this in the worker
    thread without knowing which component (if any) wants to see the call. Each
    hook is guarded: what ``call`` returns or raises is what the caller gets, and
    a hook's own failure is reported and ``call`` still runs exactly once.
    """
    hooks = state._worker_hooks
    if not hooks:
        return call()
    for hook in reversed(hooks):
        if hook._never_raises:
            call = functools.partial(hook.run_in_worker, state, call)
        else:
            call = functools.partial(_guarded, hook, state, call)
    return call()


class _Once(Generic[T]):
    """``call`` wrapped to know whether it ran and what it gave."""

    __slots__ = ("call", "error", "ran", "result")

    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.ran = False
        self.error: BaseException | None = None

    def __call__(self) -> T:
        if self.ran:
            raise RuntimeError("run_in_worker called its call twice")
        self.ran = True
        try:
            self.result = self.call()
        except BaseException as exc:
            self.error = exc
            raise
        return self.result


def _guarded(hook: RequestHooks, state: RequestState, call: Callable[[], T]) -> T:
    """``hook.run_in_worker(state, call)``, guarded (see :func:`run_in_worker`)."""
    once = _Once(call)
    try:
        return hook.run_in_worker(state, once)
    except BaseException as exc:
        if exc is once.error:
            raise  # the application's own exception, untouched
        failure = exc
    _internal_errors.report("hook.run_in_worker", failure)  # the hook's own failure
    if once.error is not None:
        raise once.error  # outside the except block: its context stays as it was
    if once.ran:
        return once.result
    return call()


#: ``functools.partial(_guarded, hook, state, call)`` stands for ``call`` (a profile names
#: the worker-thread call after ``call``, not after the guard).
_guarded.__fastprof_passthrough__ = True  # type: ignore[attr-defined]
