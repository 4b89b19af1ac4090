"""fastprof's own profile writer: one daemon thread and a bounded queue.

Encoding (JSON + gzip) and storing happen here, never on the event loop and
never on anyio's default thread limiter. When the queue is full the job is
dropped and counted. The thread starts lazily on the first job and is started
again in a forked child.

The queue is a C ``queue.SimpleQueue`` plus a counter of waiting jobs under a
lock: :meth:`Writer.submit` runs on the event loop once per profile, and
``queue.Queue`` (pure Python, a condition variable per put) costs several
times more there.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from fastprof import _internal_errors

__all__ = ["Writer"]

_Item = Callable[[], None] | threading.Event | None


class Writer:
    #: Pause after a batch of jobs (see ``_run``).
    GATHER_S: float = 0.05

    def __init__(self, max_queue: int) -> None:
        self._max = max_queue
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._waiting = 0  # jobs queued and not yet taken by the thread
        self._waiting_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._nudge = threading.Event()
        self.dropped = 0
        self.failed = 0

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; ``False`` (and counted) if the queue is full."""
        self._ensure_thread()
        with self._waiting_lock:
            if self._waiting >= self._max:
                self.dropped += 1
                return False
            self._waiting += 1
        self._queue.put(job)
        return True

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            return
        with self._lock:
            pid = os.getpid()
            if self._thread is not None and self._pid == pid and self._thread.is_alive():
                return
            if self._pid != pid:
                # A forked child inherits the queue object but not the thread.
                self._queue = queue.SimpleQueue()
                self._waiting = 0
                self._waiting_lock = threading.Lock()
                self._nudge = threading.Event()
            self._pid = pid
            self._thread = threading.Thread(
                target=self._run, name="fastprof-profile-writer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            while True:
                if item is None:
                    return
                if isinstance(item, threading.Event):  # a flush() marker
                    item.set()
                else:
                    self._do(item)
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            # Under a burst of profiles, wake at most once per GATHER_S and do every
            # job queued by then in one go: each wake-up has to win the GIL from
            # the event loop, which costs the loop a thread switch. A lone profile
            # is still written at once. flush() and close() cut the pause short.
            if self._nudge.wait(self.GATHER_S):
                self._nudge.clear()

    def _do(self, job: Callable[[], None]) -> None:
        with self._waiting_lock:
            self._waiting -= 1
        try:
            job()
        except Exception as exc:
            self.failed += 1
            _internal_errors.report("profile.write", exc)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued jobs are done (for tests and shutdown); ``True`` if they are."""
        done = threading.Event()
        self._ensure_thread()
        self._queue.put(done)
        self._nudge.set()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive() or self._pid != os.getpid():
            return
        self._queue.put(None)
        self._nudge.set()
        thread.join(timeout)
