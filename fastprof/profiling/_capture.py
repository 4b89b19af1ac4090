"""One request's profile: pyinstrument on the request task plus its worker-thread calls.

The request's own async work is sampled by a ``Profiler(async_mode="strict")``
started in the request task (and its child tasks, which inherit its context).
Strict, not "enabled": in "enabled" mode, time when the request's task is
suspended on something that is not a coroutine (a worker-thread future, for
instance) is attributed to whatever else runs on the loop, i.e. to other
requests. In strict mode it shows as ``[await]`` (awaiting a coroutine) or
``[out-of-context]`` in the frame that gave up control, so concurrently
profiled requests never contain each other's frames.

Sync work that fastprof runs in a worker thread for the request goes
through :meth:`ProfileCapture.worker_hook`, which samples that one call in that
thread with its own ``Profiler(async_mode="disabled")``; its samples are grafted
into the request's session under a synthetic ``<fn> [worker thread]`` frame,
child of the frame that started the profile. Worker time is therefore visible
twice: as an ``[await]`` in the caller and in detail under the worker frame.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

from pyinstrument import Profiler
from pyinstrument.frame_info import frame_info_get_identifier
from pyinstrument.session import Session
from pyinstrument.stack_sampler import build_call_stack

from fastprof import _internal_errors
from fastprof._frames import is_library

__all__ = ["MAX_WORKER_CALLS", "MAX_WORKER_SAMPLES", "ProfileCapture", "hot_frames"]

#: At most this many worker-thread calls are merged into one profile.
MAX_WORKER_CALLS = 256
#: At most this many worker-thread samples in total are merged into one profile.
MAX_WORKER_SAMPLES = 200_000

_tls = threading.local()
_SYNTHETIC = frozenset({"[await]", "[self]", "[out-of-context]", "[root]"})


def _clear_stale_async_profiler() -> None:
    """Forget a stopped profiler still registered in this context.

    pyinstrument marks the async context that owns a profiler in a ContextVar and
    clears it in ``stop()``. When fastprof had to stop a profile from another
    task (a streaming response's child task, the duration-cap timer), the mark
    stays in the request task's context; clear it if its profiler is stopped.
    """
    try:
        from pyinstrument.stack_sampler import active_profiler_context_var
    except ImportError:  # pragma: no cover - pyinstrument internals moved
        return
    target = active_profiler_context_var.get()
    if target is None:
        return
    owner = getattr(target, "__self__", None)
    if isinstance(owner, Profiler) and not owner.is_running:
        active_profiler_context_var.set(None)


def _callable_name(fn: Callable[..., Any]) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
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
        self._profiler = Profiler(interval=interval_s, async_mode="strict")
        self._worker_records: list[tuple[list[str], float]] = []
        self._worker_calls = 0
        self._worker_dropped = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._cap_handle: Any = None
        self._start_stack: list[str] = []

    # -- request task --------------------------------------------------------

    def start(self, caller_frame: Any, max_duration_s: float) -> None:
        _clear_stale_async_profiler()
        self._start_stack = build_call_stack(caller_frame, "initial", None)
        self._profiler.start(caller_frame=caller_frame, target_description="fastprof request")
        try:
            import asyncio

            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio (trio): no duration-cap timer
            return
        self._cap_handle = loop.call_later(max_duration_s, self._hit_duration_cap)

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
        handle, self._cap_handle = self._cap_handle, None
        if handle is not None:
            handle.cancel()
        try:
            session = self._profiler.stop()
            with self._lock:
                worker_records = self._worker_records
                self._worker_records = []
            if worker_records:
                session = Session(
                    frame_records=session.frame_records + worker_records,
                    start_time=session.start_time,
                    duration=session.duration,
                    min_interval=session.min_interval,
                    max_interval=session.max_interval,
                    sample_count=session.sample_count + len(worker_records),
                    start_call_stack=session.start_call_stack,
                    target_description=session.target_description,
                    cpu_time=session.cpu_time,
                    sys_path=session.sys_path,
                    sys_prefixes=session.sys_prefixes,
                )
            self.session = session
            return session
        finally:
            self._on_done(self)

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def worker_calls(self) -> int:
        return self._worker_calls

    @property
    def worker_dropped(self) -> int:
        return self._worker_dropped

    # -- worker threads -------------------------------------------------------

    def worker_hook(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the current (worker) thread, sampling it into this profile.

        Installed as ``RequestState.worker_hook``. Never changes what ``fn`` returns
        or raises; if profiling cannot start, ``fn()`` simply runs.
        """
        if self._stopped or getattr(_tls, "active", False):
            return fn()
        with self._lock:
            if self._worker_calls >= MAX_WORKER_CALLS:
                self._worker_dropped += 1
                return fn()
            self._worker_calls += 1
        profiler = Profiler(interval=self.interval_s, async_mode="disabled")
        try:
            profiler.start(
                caller_frame=inspect.currentframe(), target_description="fastprof worker"
            )
        except Exception as exc:
            _internal_errors.report("profile.worker_start", exc)
            return fn()
        _tls.active = True
        try:
            return fn()
        finally:
            _tls.active = False
            try:
                self._merge_worker(profiler.stop(), _callable_name(fn))
            except Exception as exc:
                _internal_errors.report("profile.worker_stop", exc)

    def _merge_worker(self, worker: Session, name: str) -> None:
        # Worker stacks start at the thread's bootstrap and go through this hook;
        # keep what is below the hook and graft it under the request's start frame.
        prefix_len = len(worker.start_call_stack)
        graft_root = [*self._start_stack, f"{name} [worker thread]\x00<worker thread>\x000"]
        records: list[tuple[list[str], float]] = []
        for stack, duration in worker.frame_records:
            records.append((graft_root + stack[prefix_len:], duration))
        with self._lock:
            if self._stopped:
                return
            room = MAX_WORKER_SAMPLES - len(self._worker_records)
            if room < len(records):
                self._worker_dropped += 1
                records = records[: max(room, 0)]
            self._worker_records.extend(records)


def hot_frames(session: Session, limit: int) -> list[tuple[str, str, float]]:
    """The ``limit`` frames with the most self time: ``(function, "file:line", seconds)``.

    A single pass over the samples (leaf frame of each), cheap enough to run on
    the event loop when the request ends.
    """
    totals: dict[str, float] = {}
    for stack, duration in session.frame_records:
        if not stack:
            continue
        app_frame = _innermost_app_frame(stack)
        if app_frame is not None:
            # Charge the line of the application's own code that was running
            # (including the library calls it made): "which line inside it".
            totals[app_frame] = totals.get(app_frame, 0.0) + duration
            continue
        leaf = frame_info_get_identifier(stack[-1])
        if leaf == "[out-of-context]" or _is_loop_frame(leaf):
            # The request's task was suspended and other work ran: say so,
            # rather than naming the event loop's outermost frame.
            key = "[out-of-context]"
            totals[key] = totals.get(key, 0.0) + duration
            continue
        if leaf in _SYNTHETIC:
            # "[await]" etc.: charge the frame that awaited, marked as such.
            if len(stack) < 2:
                continue
            leaf = frame_info_get_identifier(stack[-2]) + "\x00" + leaf
        totals[leaf] = totals.get(leaf, 0.0) + duration
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
    return out


_LOOP_FILES = ("asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py")


def _is_loop_frame(identifier: str) -> bool:
    """A sample that stops in the event loop itself: the request's task was suspended."""
    parts = identifier.split("\x00")
    path = parts[1].replace("\\", "/") if len(parts) > 1 else ""
    return path.endswith(_LOOP_FILES) or "/uvloop/" in path


def _innermost_app_frame(stack: Any) -> str | None:
    for frame in reversed(stack):
        identifier = frame_info_get_identifier(frame)
        parts = identifier.split("\x00")
        if len(parts) > 1 and parts[1] and not is_library(parts[1]):
            return identifier
    return None


def _short_path(path: str) -> str:
    """The last two components of a path: enough to locate a frame, no absolute paths."""
    parts = path.replace("\\", "/").rsplit("/", 2)
    return "/".join(parts[-2:])
