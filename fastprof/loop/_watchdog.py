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

One late heartbeat can cover several blocks: request A's callback blocks, then
request B's, with no heartbeat between them. The thread splits what it sees
into one :class:`Block` per owner: a new block starts when the sampled owner
(the request whose task runs) changes, or when the current block was already
reported (its request or dependency ended inside it). Each block also carries
two readings of the loop thread's CPU clock and of the time spent in garbage
collection on that thread (``gc.callbacks``), taken at its first sample and at
its end, so a report can say whether the loop was computing, waiting or
collecting.

The heartbeat calls ``on_beat(lag_s, blocks)`` on the loop thread; ``blocks``
are the :class:`Block` objects recorded since the previous heartbeat (usually
none, or one).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from fastprof import _internal_errors

__all__ = ["MAX_BLOCKS_PER_BEAT", "Block", "Frame", "LoopWatchdog", "Reading", "Sample"]

Frame = tuple[str, int, str]
"""``(file path, line number, function name)`` of one stack frame."""

Reading = tuple[float, float, float, float]
"""``(perf_counter s, loop thread CPU s, loop thread GC s, loop thread run-queue s)``.

CPU is NaN when the platform cannot read another thread's CPU clock; the
run-queue time (runnable, waiting for a CPU: Linux ``schedstat``) is NaN when
the kernel does not tell it."""

#: Blocks one late heartbeat is split into at most (later owners join the last one).
MAX_BLOCKS_PER_BEAT = 16

_UNSET: Any = object()


class Sample:
    """One look at the loop thread while it was blocked."""

    __slots__ = ("operation", "owner", "span", "stack", "task_name")

    def __init__(
        self,
        owner: Any,
        task_name: str | None,
        operation: str | None,
        stack: tuple[Frame, ...],
        span: Any = None,
    ) -> None:
        #: What ``resolve_owner(task, frame)`` returned (a request's state) or ``None``.
        self.owner = owner
        self.task_name = task_name
        self.operation = operation
        #: Outermost first, innermost last (like a traceback).
        self.stack = stack
        #: The span of the innermost dependency running on the loop, when known.
        self.span = span


class Block:
    """One owner's block seen by the watchdog: the samples taken while it lasted."""

    __slots__ = ("due", "end", "first", "last", "owner", "reported", "samples", "seq")

    def __init__(self, seq: int, due: float) -> None:
        self.seq = seq
        #: ``time.perf_counter()`` at which it started: the late heartbeat's due
        #: time for the first block of a beat, else the split from the previous one.
        self.due = due
        #: ``time.perf_counter()`` at which it ended (``None`` while it lasts).
        self.end: float | None = None
        #: What ``resolve_owner`` returned for its samples (one owner per block).
        self.owner: Any = _UNSET
        #: At most :attr:`LoopWatchdog.max_samples`, taken while the loop was blocked.
        self.samples: list[Sample] = []
        #: Readings at its first sample and at its last sample or end.
        self.first: Reading | None = None
        self.last: Reading | None = None
        #: Set by whoever reported the block (so it is reported once).
        self.reported = False

    def close(self, reading: Reading) -> None:
        """End it now (loop thread: a request or dependency ended inside it, or the beat)."""
        if self.end is None:
            self.end = reading[0]
            if self.first is not None:
                self.last = reading


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
        on_beat: Callable[[float, list[Block]], None],
        resolve_owner: Callable[
            [asyncio.Task[Any] | None, FrameType | None], tuple[Any, str | None, Any]
        ],
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
        #: The blocks of the late heartbeat being watched (all with its seq).
        self._blocks: list[Block] = []
        self._cpu_clock: int | None = None
        self._schedstat: str | None = None
        # Garbage collection on the loop thread: total seconds, and the start of
        # the collection in progress (0.0: none). Written by gc.callbacks.
        self._gc_total = 0.0
        self._gc_started = 0.0
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
        self._blocks = []
        try:
            self._cpu_clock = time.pthread_getcpuclockid(self.loop_thread_id)
            time.clock_gettime(self._cpu_clock)
        except (AttributeError, OSError):  # pragma: no cover - not on this platform
            self._cpu_clock = None
        self._schedstat = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        if math.isnan(self._run_delay()):
            self._schedstat = None
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
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
        self._blocks = []
        try:
            gc.callbacks.remove(self._on_gc)
        except ValueError:
            pass

    @property
    def current_blocks(self) -> list[Block]:
        """The blocks in progress (seen by the thread, heartbeat not yet run)."""
        blocks = self._blocks
        if blocks and blocks[0].seq == self._beat[0]:
            return blocks
        return []

    def reading(self) -> Reading:
        """Now, the loop thread's CPU clock and its time in garbage collection (any thread)."""
        now = time.perf_counter()
        clock = self._cpu_clock
        try:
            cpu = time.clock_gettime(clock) if clock is not None else math.nan
        except OSError:  # pragma: no cover - the thread is gone
            cpu = math.nan
        started = self._gc_started
        gc_s = self._gc_total + (now - started if started else 0.0)
        return (now, cpu, gc_s, self._run_delay())

    def _run_delay(self) -> float:
        """Seconds the loop thread has spent runnable but waiting for a CPU (Linux)."""
        path = self._schedstat
        if path is None:
            return math.nan
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                return int(os.read(fd, 128).split()[1]) / 1e9
            finally:
                os.close(fd)
        except (OSError, ValueError, IndexError):
            return math.nan

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Any thread's collections: only the loop thread's count.
        if threading.get_ident() != self.loop_thread_id:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self._gc_total += time.perf_counter() - self._gc_started
            self._gc_started = 0.0

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
        blocks = self._blocks
        if blocks and blocks[0].seq == seq:
            self._blocks = []
            blocks[-1].close(self.reading())
        else:
            blocks = []
        try:
            self._on_beat(lag if lag > 0.0 else 0.0, blocks)
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
        current = Block(seq, due)
        blocks = [current]
        self._blocks = blocks
        interval = self.sample_interval_s
        previous_t = due
        while self._beat[0] == seq and not stop.is_set():
            sample = self._sample(loop, len(current.samples) < self.max_samples)
            reading = self.reading()
            # Keep it only if the loop was still blocked when it was taken.
            if sample is not None and self._beat[0] == seq:
                if current.owner is _UNSET:
                    current.owner = sample.owner
                elif (
                    (current.reported or sample.owner is not current.owner)
                    and len(blocks) < MAX_BLOCKS_PER_BEAT
                ):
                    # Another owner (or the same one after a report): a new block,
                    # split halfway between the two samples.
                    split = (previous_t + reading[0]) / 2
                    if current.end is None:
                        current.end = split
                        if current.last is current.first:
                            current.last = reading
                    current = Block(seq, split)
                    current.owner = sample.owner
                    blocks.append(current)
                if current.first is None:
                    current.first = reading
                if current.end is None:
                    current.last = reading
                if sample.stack and len(current.samples) < self.max_samples:
                    current.samples.append(sample)
                previous_t = reading[0]
            if loop.is_closed() or stop.wait(interval):
                return

    def _sample(self, loop: asyncio.AbstractEventLoop, with_stack: bool) -> Sample | None:
        tid = self.loop_thread_id
        if tid is None:
            return None
        try:
            task = asyncio.current_task(loop)
        except Exception:  # pragma: no cover - loop without task support
            task = None
        top = sys._current_frames().get(tid)
        stack: list[Frame] = []
        depth = self.max_stack_depth if with_stack else 0
        frame = top
        while frame is not None and len(stack) < depth:
            code = frame.f_code
            stack.append((code.co_filename, frame.f_lineno or 0, code.co_name))
            frame = frame.f_back
        del frame
        stack.reverse()
        task_name: str | None = None
        owner, operation, span = self._resolve_owner(task, top)
        del top
        if task is not None:
            try:
                task_name = task.get_name()
            except Exception:  # pragma: no cover - exotic task
                task_name = None
        return Sample(owner, task_name, operation, tuple(stack), span)
