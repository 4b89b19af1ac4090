"""Containment of fastprof's own failures.

fastprof must never fail a request. Every seam that runs inside a request calls
:func:`report` from an ``except Exception`` block: the failure is counted per
phase, the first traceback of a phase is logged, and later ones are logged at
most once per :data:`LOG_INTERVAL_S` seconds.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["LOG_INTERVAL_S", "counts", "logger", "report", "reset"]

logger = logging.getLogger("fastprof")

LOG_INTERVAL_S = 60.0

_lock = threading.Lock()
_counts: dict[str, int] = {}
_last_logged: dict[str, float] = {}


def report(phase: str, exc: BaseException | None = None) -> None:
    """Count an internal failure in ``phase`` and log it, rate-limited per phase."""
    now = time.monotonic()
    with _lock:
        _counts[phase] = _counts.get(phase, 0) + 1
        count = _counts[phase]
        last = _last_logged.get(phase)
        should_log = last is None or now - last >= LOG_INTERVAL_S
        if should_log:
            _last_logged[phase] = now
    if should_log:
        try:
            logger.warning(
                "fastprof internal error in %s (%d so far); the request is unaffected",
                phase,
                count,
                exc_info=exc if exc is not None else True,
            )
        except Exception:  # pragma: no cover - logging itself is broken
            pass


def counts() -> dict[str, int]:
    """Return a snapshot of internal error counts by phase."""
    with _lock:
        return dict(_counts)


def reset() -> None:
    """Forget counts and rate-limit state (for tests)."""
    with _lock:
        _counts.clear()
        _last_logged.clear()
