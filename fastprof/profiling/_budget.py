"""A process-wide profile budget: concurrent slots and a per-minute rate.

Acquisition never waits: over budget, the caller gets the reason and runs the
request unprofiled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Budget"]

WINDOW_S = 60.0


class Budget:
    """At most ``max_concurrent`` profiles at once and ``max_per_minute`` started per minute."""

    def __init__(
        self,
        max_concurrent: int,
        max_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_per_minute = max_per_minute
        self._clock = clock
        self._active = 0
        self._starts: deque[float] = deque(maxlen=max(max_per_minute, 1))
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def try_acquire(self) -> str | None:
        """Take a slot; return ``None`` on success or the reason it was refused."""
        now = self._clock()
        with self._lock:
            if self._active >= self.max_concurrent:
                return "concurrency_limit"
            starts = self._starts
            if len(starts) >= self.max_per_minute and now - starts[0] < WINDOW_S:
                return "rate_limit"
            starts.append(now)
            self._active += 1
            return None

    def release(self) -> None:
        with self._lock:
            if self._active > 0:
                self._active -= 1
