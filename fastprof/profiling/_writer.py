"""fastprof's own profile writer: one daemon thread and a bounded queue.

Encoding (JSON + gzip) and storing happen here, never on the event loop and
never on anyio's default thread limiter. When the queue is full the job is
dropped and counted. The thread starts lazily on the first job and is started
again in a forked child.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from fastprof import _internal_errors

__all__ = ["Writer"]


class Writer:
    def __init__(self, max_queue: int) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self.dropped = 0
        self.failed = 0

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; ``False`` (and counted) if the queue is full."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._thread is not None and self._pid == pid and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == pid and self._thread.is_alive():
                return
            if self._pid != pid:
                # A forked child inherits the queue object but not the thread.
                self._queue = queue.Queue(maxsize=self._queue.maxsize)
            self._pid = pid
            self._thread = threading.Thread(
                target=self._run, name="fastprof-profile-writer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        q = self._queue
        while True:
            job = q.get()
            try:
                if job is None:
                    return
                job()
            except Exception as exc:
                self.failed += 1
                _internal_errors.report("profile.write", exc)
            finally:
                q.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued jobs are done (for tests and shutdown); ``True`` if they are."""
        done = threading.Event()

        def mark() -> None:
            done.set()

        self._ensure_thread()
        try:
            self._queue.put(mark, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive() or self._pid != os.getpid():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)
