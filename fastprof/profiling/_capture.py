"""One request's profile: pyinstrument on the request task plus its worker-thread calls.

The request's own async work is sampled in the request task (and its child
tasks, which inherit its context) the way ``Profiler(async_mode="strict")``
samples it, by a :class:`_Sampler`, a subscriber of pyinstrument's stack
sampler (see its docstring for why not the ``Profiler`` itself). Strict, not
"enabled": in "enabled" mode, time when the request's task is
suspended on something that is not a coroutine (a worker-thread future, for
instance) is attributed to whatever else runs on the loop, i.e. to other
requests. In strict mode it shows as ``[await]`` (awaiting a coroutine) or
``[out-of-context]`` in the frame that gave up control, so concurrently
profiled requests never contain each other's frames.

Sync work that fastprof runs in a worker thread for the request goes
through :meth:`ProfileCapture.worker_hook`, which samples that one call in that
thread with its own :class:`_Sampler` (no async context); its samples are grafted
into the request's session under a synthetic ``<fn> [worker thread]`` frame,
child of the frame that started the profile. Worker time is therefore visible
twice: as an ``[await]`` in the caller and in detail under the worker frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from time import process_time
from typing import Any

from pyinstrument.frame import AWAIT_FRAME_IDENTIFIER, OUT_OF_CONTEXT_FRAME_IDENTIFIER
from pyinstrument.frame_info import frame_info_get_identifier
from pyinstrument.session import Session
from pyinstrument.stack_sampler import get_stack_sampler

from fastprof import _internal_errors
from fastprof._frames import is_library

__all__ = ["MAX_SAMPLES", "MAX_WORKER_CALLS", "MAX_WORKER_SAMPLES", "ProfileCapture", "hot_frames"]

#: At most this many samples of the request's own task are kept (then the
#: profile is marked truncated): the duration cap's timer cannot fire while the
#: request blocks the event loop.
MAX_SAMPLES = 200_000
#: At most this many worker-thread calls are merged into one profile.
MAX_WORKER_CALLS = 256
#: At most this many worker-thread samples in total are merged into one profile.
MAX_WORKER_SAMPLES = 200_000

_active_profiler: ContextVar[object | None] | None
try:
    from pyinstrument.stack_sampler import active_profiler_context_var as _active_profiler
except ImportError:  # pragma: no cover - pyinstrument internals moved
    _active_profiler = None

_tls = threading.local()
_SYNTHETIC = frozenset({"[await]", "[self]", "[out-of-context]", "[root]"})


def _clear_stale_async_profiler() -> None:
    """Forget a stopped profiler still registered in this context.

    pyinstrument marks the async context that owns a profiler in a ContextVar and
    clears it in ``stop()``. When fastprof had to stop a profile from another
    task (a streaming response's child task, the duration-cap timer), the mark
    stays in the request task's context; clear it if its profiler is stopped.
    """
    if _active_profiler is None:  # pragma: no cover
        return
    target = _active_profiler.get()
    if target is None:
        return
    owner = getattr(target, "__self__", None)
    if isinstance(owner, _Sampler) and not owner.running:
        _active_profiler.set(None)


class _Sampler:
    """Samples of this thread: what ``Profiler(async_mode="strict")`` records.

    A subscriber of pyinstrument's per-thread stack sampler that records samples
    exactly as ``Profiler._sampler_saw_call_stack`` does in strict mode (bound to
    the current async context when ``in_task``, as a request's profile is; a
    worker thread's is not, like ``async_mode="disabled"``). It differs from a
    ``Profiler`` in two places, both costs of a profile that pyinstrument's own
    start and stop pay on the event loop:

    * the start stack is built without looking into every frame's locals (see
      :func:`_start_call_stack`);
    * :meth:`stop` removes the subscriber before clearing the async context
      marker. ``StackSampler.unsubscribe`` clears the marker first, so the
      sampler sees a context change while the subscriber is still registered and
      builds the full call stack of the stopping frame for a subscriber that is
      about to go. If pyinstrument's internals are not the expected ones, the
      public ``unsubscribe`` is used.
    """

    __slots__ = (
        "cpu_time",
        "dropped",
        "duration",
        "frame_records",
        "in_task",
        "interval",
        "max_samples",
        "recording",
        "running",
        "start_call_stack",
        "start_time",
    )

    def __init__(self, interval: float, *, in_task: bool, max_samples: int) -> None:
        self.interval = interval
        self.in_task = in_task
        self.max_samples = max_samples
        self.frame_records: list[tuple[list[str], float]] = []
        self.start_call_stack: list[str] = []
        self.start_time = 0.0
        self.duration = 0.0
        self.cpu_time = 0.0
        #: Subscribed to this thread's stack sampler.
        self.running = False
        #: Keeping samples (cleared to stop keeping them from another thread).
        self.recording = True
        #: Samples not kept: over ``max_samples``, or after ``recording`` was cleared.
        self.dropped = 0

    def start(self, caller_frame: Any) -> None:
        self.start_time = time.time()
        self.cpu_time = process_time()
        self.start_call_stack = _start_call_stack(caller_frame)
        target = self._saw_call_stack
        try:
            get_stack_sampler().subscribe(
                target, desired_interval=self.interval, use_async_context=self.in_task
            )
        except BaseException:
            # subscribe() may fail after registering us (and marking the context):
            # leave nothing behind that would keep sampling.
            with contextlib.suppress(Exception):
                _unsubscribe(target)
            # A sample may have come in between: a profile that never started has none.
            self.recording = False
            self.frame_records.clear()
            raise
        self.running = True

    def _saw_call_stack(
        self, call_stack: list[str], time_since_last_sample: float, async_state: Any = None, *_: Any
    ) -> None:
        # Runs inside pyinstrument's profile function, in whatever code is running:
        # an exception here would surface in the application.
        try:
            records = self.frame_records
            if not self.recording or len(records) >= self.max_samples:
                self.dropped += 1
                return
            if async_state is not None and async_state.state == "out_of_context_awaited":
                stack = [*async_state.info, AWAIT_FRAME_IDENTIFIER]
            elif async_state is not None and async_state.state == "out_of_context_unknown":
                stack = [*async_state.info, OUT_OF_CONTEXT_FRAME_IDENTIFIER]
            else:
                stack = call_stack
            records.append((stack, time_since_last_sample))
        except Exception as exc:
            _internal_errors.report("profile.sample", exc)

    def stop(self) -> None:
        self.running = False  # even if unsubscribing fails: the marker is then stale
        _unsubscribe(self._saw_call_stack)
        self.cpu_time = process_time() - self.cpu_time
        self.duration = time.time() - self.start_time

    def session(self, target_description: str) -> Session:
        """The samples as a pyinstrument session (after :meth:`stop`)."""
        records = self.frame_records
        return Session(
            frame_records=records,
            start_time=self.start_time,
            duration=self.duration,
            min_interval=self.interval,
            max_interval=self.interval,
            sample_count=len(records),
            target_description=target_description,
            start_call_stack=self.start_call_stack,
            cpu_time=self.cpu_time,
            sys_path=sys.path,
            sys_prefixes=Session.current_sys_prefixes(),
        )


def _start_call_stack(frame: Any) -> list[str]:
    """The frames from the thread's root down to ``frame``, as pyinstrument frame strings.

    What ``build_call_stack(frame, "initial", None)`` returns, without the
    class-name and hidden-frame attributes: working those out looks up every
    frame's local variable names (and, for methods, its locals), which made this
    stack cost more than the rest of starting a profile. pyinstrument uses the
    start stack by frame identifier only (to trim the stem above where
    profiling started), and frames keep the attributes
    recorded by the samples. The frames above a request's middleware are the
    same from request to request, so each (code, instruction) string is made
    once per process (a code object's own hash is computed from its contents at
    every lookup: the cache is keyed by its id and checks identity).
    """
    global _frame_strings_count
    stack: list[str] = []
    cache = _FRAME_STRINGS
    while frame is not None:
        code = frame.f_code
        entry = cache.get(id(code))
        if entry is None or entry[0] is not code:
            entry = cache[id(code)] = (
                code,
                f"{code.co_name}\x00{code.co_filename}\x00{code.co_firstlineno}\x01l",
                {},
            )
        lines = entry[2]
        text = lines.get(frame.f_lasti)
        if text is None:
            if _frame_strings_count >= _FRAME_STRINGS_MAX:
                cache.clear()  # and this entry's lines go with it
                cache[id(code)] = entry
                lines.clear()
                _frame_strings_count = 0
            text = lines[frame.f_lasti] = f"{entry[1]}{frame.f_lineno}"
            _frame_strings_count += 1
        stack.append(text)
        frame = frame.f_back
    thread = threading.current_thread()
    stack.append(f"{thread.name}\x00<thread>\x00{thread.ident}")
    stack.reverse()
    return stack


#: id(code) -> (code, the start of its frame strings, {instruction offset: frame string}).
#: Bounded: at most ``_FRAME_STRINGS_MAX`` frame strings in all (then cleared).
_FRAME_STRINGS: dict[int, tuple[Any, str, dict[int, str]]] = {}
_FRAME_STRINGS_MAX = 8192
_frame_strings_count = 0


def _unsubscribe(target: Callable[..., None]) -> None:
    """Remove ``target`` from this thread's stack sampler, then clear the async marker."""
    sampler = get_stack_sampler()
    subscribers = getattr(sampler, "subscribers", None)
    update = getattr(sampler, "_update", None)
    if _active_profiler is None or not isinstance(subscribers, list) or not callable(update):
        sampler.unsubscribe(target)
        return
    for index, subscriber in enumerate(subscribers):
        if getattr(subscriber, "target", None) == target:
            del subscribers[index]
            try:
                update()  # no subscriber left: sampling stops before the marker changes
            finally:
                if getattr(subscriber, "bound_to_async_context", True):
                    _active_profiler.set(None)
            return
    raise RuntimeError("fastprof: the profile's sampler was not subscribed on this thread")


def _callable_name(fn: Callable[..., Any]) -> str:
    inner: Any = fn
    for _ in range(8):  # functools.partial, and fastprof's guards of other hooks
        if not isinstance(inner, functools.partial):
            break
        passthrough = getattr(inner.func, "__fastprof_passthrough__", False)
        inner = inner.args[-1] if passthrough and inner.args else inner.func
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None)
    return str(name) if name else type(inner).__name__


class ProfileCapture:
    """The live profile of one request."""

    def __init__(
        self,
        profile_id: str,
        *,
        trigger: str,
        interval_s: float,
        on_done: Callable[[ProfileCapture], None],
    ) -> None:
        self.profile_id = profile_id
        self.trigger = trigger
        self.interval_s = interval_s
        self.session: Session | None = None
        self.truncated = False
        self.started_at = time.time()
        self._on_done = on_done
        self._sampler = _Sampler(interval_s, in_task=True, max_samples=MAX_SAMPLES)
        # Worker-thread samples: (worker frame, stack below the hook, duration).
        # Grafted under the request's start stack when the profile stops.
        self._worker_records: list[tuple[str, list[str], float]] = []
        # Samplers of worker calls still running: told to stop keeping samples
        # when the profile stops (only their own thread can unsubscribe them).
        self._live_workers: set[_Sampler] = set()
        self._worker_calls = 0
        self._worker_calls_incomplete = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._cap_handle: Any = None

    # -- request task --------------------------------------------------------

    def start(self, caller_frame: Any, max_duration_s: float) -> None:
        _clear_stale_async_profiler()
        # The duration-cap timer is set before sampling starts (and cancelled after
        # it stops), so its bookkeeping is neither sampled nor slowed by the sampler.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio (trio): no duration-cap timer
            pass
        else:
            self._cap_handle = loop.call_later(max_duration_s, self._hit_duration_cap)
        try:
            self._sampler.start(caller_frame)
        except BaseException:
            handle, self._cap_handle = self._cap_handle, None
            if handle is not None:
                handle.cancel()
            raise

    def _hit_duration_cap(self) -> None:
        try:
            self.truncated = True
            self.stop()
        except Exception as exc:
            _internal_errors.report("profile.duration_cap", exc)

    def stop(self) -> Session | None:
        """Stop sampling (idempotent); returns the merged session."""
        with self._lock:
            if self._stopped:
                return self.session
            self._stopped = True
            for worker in self._live_workers:
                worker.recording = False
        try:
            sampler = self._sampler
            sampler.stop()
            if sampler.dropped:
                self.truncated = True
            with self._lock:
                worker_records = self._worker_records
                self._worker_records = []
            if worker_records:
                # Graft each worker call under the request's start stack
                # (computed here, once, not on every worker call).
                root = sampler.start_call_stack
                sampler.frame_records.extend(
                    ([*root, frame, *stack], duration) for frame, stack, duration in worker_records
                )
            session = sampler.session("fastprof request")
            # The session owns the samples now. A context that still holds the
            # sampler (a stale async marker, see above) does not keep them alive.
            sampler.frame_records = []
            self.session = session
            return session
        finally:
            handle, self._cap_handle = self._cap_handle, None
            if handle is not None:
                handle.cancel()
            self._on_done(self)

    @property
    def worker_calls(self) -> int:
        return self._worker_calls

    @property
    def worker_calls_incomplete(self) -> int:
        """Worker calls not sampled (over the call or sample budget) or cut short by it."""
        return self._worker_calls_incomplete

    # -- worker threads -------------------------------------------------------

    def worker_hook(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the current (worker) thread, sampling it into this profile.

        Installed as ``RequestState.worker_hook``. Never changes what ``fn`` returns
        or raises; if profiling cannot start, ``fn()`` simply runs.
        """
        if self._stopped or getattr(_tls, "active", False):
            return fn()
        with self._lock:
            room = MAX_WORKER_SAMPLES - len(self._worker_records)
            if self._worker_calls >= MAX_WORKER_CALLS or room <= 0:
                self._worker_calls_incomplete += 1
                return fn()
            self._worker_calls += 1
            # Bounded while it runs, too: the profile's duration cap and sample
            # budget apply to a long sync call still in the thread pool.
            sampler = _Sampler(self.interval_s, in_task=False, max_samples=room)
            self._live_workers.add(sampler)
        try:
            sampler.start(inspect.currentframe())
        except Exception as exc:
            with self._lock:
                self._live_workers.discard(sampler)
            _internal_errors.report("profile.worker_start", exc)
            return fn()
        _tls.active = True
        try:
            return fn()
        finally:
            _tls.active = False
            try:
                with self._lock:
                    self._live_workers.discard(sampler)
                sampler.stop()
                self._merge_worker(sampler, _callable_name(fn))
            except Exception as exc:
                _internal_errors.report("profile.worker_stop", exc)

    def _merge_worker(self, worker: _Sampler, name: str) -> None:
        # Worker stacks start at the thread's bootstrap and go through this hook;
        # keep what is below the hook (grafted under the request's start frame
        # by stop()).
        prefix_len = len(worker.start_call_stack)
        frame = f"{name} [worker thread]\x00<worker thread>\x000"
        records = [
            (frame, stack[prefix_len:], duration) for stack, duration in worker.frame_records
        ]
        with self._lock:
            if self._stopped:
                return
            room = MAX_WORKER_SAMPLES - len(self._worker_records)
            if room < len(records) or worker.dropped:
                self._worker_calls_incomplete += 1
                records = records[: max(room, 0)]
            self._worker_records.extend(records)


def hot_frames(session: Session, limit: int) -> tuple[list[tuple[str, str, float]], float]:
    """The ``limit`` frames with the most self time, and the request's waiting time.

    Frames are ``(function, "file:line", seconds)``. Samples where the request's
    task was suspended while other work ran (pyinstrument's ``[out-of-context]``)
    are not a function's time: they are summed apart, as the second value
    (seconds).

    A single pass over the samples, cheap enough to run on the event loop when
    the request ends: what each distinct frame string is (application code or
    not, its identifier) is worked out once per process, not once per sample.
    """
    waiting = 0.0
    totals: dict[str, float] = {}
    cache = _FRAME_CACHE
    for stack, duration in session.frame_records:
        if not stack:
            continue
        key: str | None = None
        for raw in reversed(stack):
            info = cache.get(raw) or _frame_info(raw)
            if info[1]:
                # Charge the line of the application's own code that was running
                # (including the library calls it made): "which line inside it".
                key = info[0]
                break
        if key is None:
            leaf = cache.get(stack[-1]) or _frame_info(stack[-1])
            key = leaf[2]
            if key is None:
                # "[await]" etc.: charge the frame that awaited, marked as such.
                if len(stack) < 2:
                    continue
                caller = cache.get(stack[-2]) or _frame_info(stack[-2])
                key = caller[0] + "\x00" + leaf[0]
            elif key == _WAITING:
                waiting += duration
                continue
        totals[key] = totals.get(key, 0.0) + duration
    top = sorted(totals.items(), key=lambda item: item[1], reverse=True)[:limit]
    out: list[tuple[str, str, float]] = []
    for identifier, seconds in top:
        parts = identifier.split("\x00")
        function = parts[0]
        path = parts[1] if len(parts) > 1 else ""
        line = parts[2] if len(parts) > 2 else ""
        if len(parts) > 3:
            function = f"{function} {parts[3]}"
        location = f"{_short_path(path)}:{line}" if path else ""
        out.append((function, location, round(seconds, 6)))
    return out, round(waiting, 6)


#: pyinstrument frame string -> (identifier, is application code, key when it is
#: the leaf of a sample without application code; None: synthetic, see caller).
#: Frame strings repeat across samples and profiles. Bounded: cleared when full.
_FRAME_CACHE: dict[str, tuple[str, bool, str | None]] = {}
_FRAME_CACHE_MAX = 8192
_LOOP_FILES = ("asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py")
_WAITING = "[out-of-context]"


def _frame_info(raw: str) -> tuple[str, bool, str | None]:
    identifier = frame_info_get_identifier(raw)
    parts = identifier.split("\x00")
    path = parts[1] if len(parts) > 1 else ""
    is_app = bool(path) and not is_library(path)
    leaf_key: str | None = identifier
    if identifier == "[out-of-context]" or _is_loop_path(path):
        # The request's task was suspended and other work ran: say so, rather
        # than naming the event loop's outermost frame.
        leaf_key = "[out-of-context]"
    elif identifier in _SYNTHETIC:
        leaf_key = None
    info = (identifier, is_app, leaf_key)
    if len(_FRAME_CACHE) >= _FRAME_CACHE_MAX:
        _FRAME_CACHE.clear()
    _FRAME_CACHE[raw] = info
    return info


def _is_loop_path(path: str) -> bool:
    """A frame of the event loop itself: the request's task was suspended."""
    path = path.replace("\\", "/")
    return path.endswith(_LOOP_FILES) or "/uvloop/" in path


def _short_path(path: str) -> str:
    """The last two components of a path: enough to locate a frame, no absolute paths."""
    parts = path.replace("\\", "/").rsplit("/", 2)
    return "/".join(parts[-2:])
