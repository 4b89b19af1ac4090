"""Thread-pool polling: anyio's default thread limiter, read cheaply from any thread."""

from __future__ import annotations

import time
from typing import Any, Final

import structlog

from fastprof.metrics import ThreadpoolSnapshot

__all__ = ["ThreadpoolWatch"]

_LIMITER_REFRESH_S: Final = 1.0

logger = structlog.get_logger("fastprof.loop")


class ThreadpoolWatch:
    """Caches anyio's default thread limiter of the monitored loop and reads it.

    anyio's limiter is per event loop and can only be looked up from a task on
    that loop, so the request path refreshes the cached object at most once per
    second (:meth:`maybe_refresh`); the metric reader (any thread) and the
    heartbeat only read it.
    """

    __slots__ = ("_checked", "_last_saturation_log", "limiter", "saturation_log_interval_s")

    def __init__(self, saturation_log_interval_s: float) -> None:
        self.saturation_log_interval_s = saturation_log_interval_s
        self.limiter: Any = None
        self._checked = 0.0
        self._last_saturation_log: float | None = None

    def reset(self) -> None:
        self.limiter = None
        self._checked = 0.0

    def maybe_refresh(self) -> None:
        """Loop thread (a request's task): refresh the cached limiter at most once a second."""
        if time.monotonic() - self._checked > _LIMITER_REFRESH_S:
            self.refresh()

    def refresh(self) -> None:
        """Loop thread: cache anyio's default thread limiter of this loop."""
        self._checked = time.monotonic()
        try:
            from anyio.to_thread import current_default_thread_limiter

            self.limiter = current_default_thread_limiter()
        except Exception:
            self.limiter = None

    def snapshot(self) -> ThreadpoolSnapshot | None:
        """``(tokens used, tokens total, tasks waiting)``; ``None`` before the first request."""
        limiter = self.limiter
        if limiter is None:
            return None
        stats = limiter.statistics()
        return stats.borrowed_tokens, int(stats.total_tokens), stats.tasks_waiting

    def check_saturation(self) -> None:
        """Heartbeat: warn (rate-limited) when every token is taken and tasks are queuing."""
        snapshot = self.snapshot()
        if snapshot is None:
            return
        used, total, waiting = snapshot
        if used < total or waiting == 0:
            return
        now = time.monotonic()
        last = self._last_saturation_log
        if last is not None and now - last < self.saturation_log_interval_s:
            return
        self._last_saturation_log = now
        logger.warning(
            "thread pool saturated",
            tokens_used=used,
            tokens_limit=total,
            waiting=waiting,
            hint="sync dependencies/endpoints are queuing for a worker thread",
        )
