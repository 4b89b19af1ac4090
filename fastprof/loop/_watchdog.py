"""A loop-implementation-independent watchdog for event-loop blocking.

Two parts cooperate:

* a **heartbeat**: a callback re-scheduled on the event loop every
  ``interval_s`` with ``loop.call_later``. When it runs it measures how late it
  ran (the loop's *scheduling lag*). An idle loop waiting on I/O wakes up for
  its timer on time, so idleness never shows as lag.
* a **watchdog thread** (a daemon thread owned by the watchdog). It sleeps
  until the pending heartbeat is ``threshold_s`` overdue; if the heartbeat
  still has not run, the loop thread is stuck in one callback. The thread then
  samples the loop thread's stack with ``sys._current_frames()`` and the loop's
  current task with ``asyncio.current_task(loop)`` every ``sample_interval_s``
  until the heartbeat runs again, so the samples show the blocking line itself,
  not the next ``await``.

Nothing here patches asyncio: it works on any loop that implements
``call_later`` and runs ``asyncio.Task`` objects (asyncio, uvloop). No frame
object is kept (only file, line and function name), so no locals are retained.

The heartbeat calls ``on_beat(lag_s, block)`` on the loop thread; ``block`` is
the :class:`Block` the watchdog recorded for that heartbeat, or ``None``.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from fastprof import _internal_errors

__all__ = ["Block", "Frame", "LoopWatchdog", "Sample"]

Frame = tuple[str, int, str]
"""``(file path, line number, function name)`` of one stack frame."""


class Sample:
    """One look at the loop thread while it was blocked."""

    __slots__ = ("operation", "owner", "stack", "task_name")

    def __init__(
        self, owner: Any, task_name: str | None, operation: str | None, stack: tuple[Frame, ...]
    ) -> None:
        #: What ``resolve_owner(task)`` returned (a request's state) or ``None``.
        self.owner = owner
        self.task_name = task_name
        self.operation = operation
        #: Outermost first, innermost last (like a traceback).
        self.stack = stack


class Block:
    """A block seen by the watchdog: the samples taken while it lasted."""

    __slots__ = ("due", "reported", "samples", "seq")

    def __init__(self, seq: int, due: float) -> None:
        self.seq = seq
        #: ``time.perf_counter()`` at which the late heartbeat was due.
        self.due = due
        #: At most :attr:`LoopWatchdog.max_samples`, taken while the loop was blocked.
        self.samples: list[Sample] = []
        #: Set by whoever reported the block (so it is reported once).
        self.reported = False


class LoopWatchdog:
    """Heartbeat plus watchdog thread for one event loop.

    :meth:`start` must be called on the loop's thread while the loop runs;
    :meth:`stop` is idempotent and may be called from any thread.
    """

    def __init__(
        self,
        *,
        threshold_s: float,
        interval_s: float,
        sample_interval_s: float,
        max_samples: int,
        max_stack_depth: int,
        on_beat: Callable[[float, Block | None], None],
        resolve_owner: Callable[[asyncio.Task[Any]], tuple[Any, str | None]],
    ) -> None:
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self.sample_interval_s = sample_interval_s
        self.max_samples = max_samples
        self.max_stack_depth = max_stack_depth
        self._on_beat = on_beat
        self._resolve_owner = resolve_owner
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread_id: int | None = None
        # (seq, due) replaced atomically by the heartbeat; read by the thread.
        self._beat: tuple[int, float] = (0, 0.0)
        self._block: Block | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The heartbeat runs in an empty context: never in a request's context.
        self._context = contextvars.Context()

    # -- lifecycle (loop thread) --------------------------------------------

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        """Start monitoring the running loop of the calling thread."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.loop_thread_id = threading.get_ident()
        self._stop = threading.Event()
        self._block = None
        self._schedule(loop, seq=0)
        self._thread = threading.Thread(
            target=self._run, args=(loop, self._stop), name="fastprof-loop-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the thread and the heartbeat. Safe to call twice, from any thread."""
        self._stop.set()
        handle, self._handle = self._handle, None
        loop = self.loop
        if handle is not None and loop is not None and not loop.is_closed():
            try:
                if threading.get_ident() == self.loop_thread_id:
                    handle.cancel()
                else:
                    loop.call_soon_threadsafe(handle.cancel)
            except RuntimeError:  # pragma: no cover - loop closed meanwhile
                pass
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self._block = None

    @property
    def current_block(self) -> Block | None:
        """The block in progress (seen by the thread, heartbeat not yet run)."""
        block = self._block
        if block is not None and block.seq == self._beat[0]:
            return block
        return None

    # -- heartbeat (loop thread) --------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop, seq: int) -> None:
        self._beat = (seq, time.perf_counter() + self.interval_s)
        self._handle = loop.call_later(self.interval_s, self._heartbeat, context=self._context)

    def _heartbeat(self) -> None:
        if self._stop.is_set():
            return
        seq, due = self._beat
        lag = time.perf_counter() - due
        loop = self.loop
        assert loop is not None
        # Publish the new beat first: the thread discards samples taken after it.
        self._schedule(loop, seq + 1)
        block = self._block
        if block is not None and block.seq == seq:
            self._block = None
        else:
            block = None
        try:
            self._on_beat(lag if lag > 0.0 else 0.0, block)
        except Exception as exc:
            _internal_errors.report("loop.heartbeat", exc)

    # -- watchdog thread ------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        try:
            self._watch(loop, stop)
        except Exception as exc:  # pragma: no cover - defensive
            _internal_errors.report("loop.watchdog", exc)

    def _watch(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        threshold = self.threshold_s
        while not stop.is_set():
            seq, due = self._beat
            timeout = due + threshold - time.perf_counter()
            if timeout > 0.0:
                if stop.wait(timeout):
                    return
                continue
            if loop.is_closed():
                return
            if not loop.is_running():
                # A stopped (not closed) loop: nothing runs, nothing to report.
                if stop.wait(threshold):
                    return
                continue
            self._watch_block(loop, stop, seq, due)

    def _watch_block(
        self, loop: asyncio.AbstractEventLoop, stop: threading.Event, seq: int, due: float
    ) -> None:
        block = Block(seq, due)
        self._block = block
        interval = self.sample_interval_s
        while self._beat[0] == seq and not stop.is_set():
            if len(block.samples) < self.max_samples:  # past it: wait for the end only
                sample = self._sample(loop)
                # Keep it only if the loop was still blocked when it was taken.
                if sample is not None and self._beat[0] == seq:
                    block.samples.append(sample)
            if loop.is_closed() or stop.wait(interval):
                return

    def _sample(self, loop: asyncio.AbstractEventLoop) -> Sample | None:
        tid = self.loop_thread_id
        if tid is None:
            return None
        try:
            task = asyncio.current_task(loop)
        except Exception:  # pragma: no cover - loop without task support
            task = None
        frame = sys._current_frames().get(tid)
        stack: list[Frame] = []
        depth = self.max_stack_depth
        while frame is not None and len(stack) < depth:
            code = frame.f_code
            stack.append((code.co_filename, frame.f_lineno or 0, code.co_name))
            frame = frame.f_back
        del frame
        stack.reverse()
        owner: Any = None
        task_name: str | None = None
        operation: str | None = None
        if task is not None:
            owner, operation = self._resolve_owner(task)
            try:
                task_name = task.get_name()
            except Exception:  # pragma: no cover - exotic task
                task_name = None
        return Sample(owner, task_name, operation, tuple(stack))
