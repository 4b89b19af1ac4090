"""A health endpoint for orchestrators that reflects event-loop lag and thread-pool saturation.

Usage::

    monitor = fastprof.LoopMonitor()
    health = fastprof.health.HealthCheck(monitor, max_lag_s=0.5)
    fastprof.instrument(app, loop_monitor=monitor, exclude=["/healthz"])
    app.add_route("/healthz", health.app(), include_in_schema=False)

The answer is ``200`` with ``{"status": "ok", ...}`` or ``503`` with
``{"status": "unhealthy", "reasons": [...], ...}``. It is computed from data the
:class:`~fastprof.LoopMonitor` already has (no probe, no I/O): the largest
heartbeat lag over the last ``window_s`` seconds, and anyio's default thread
limiter (tokens in use, tasks waiting). A loop blocked right now cannot answer at
all: the orchestrator's probe timeout covers that case, this endpoint the loop
that keeps falling behind.

Keep it out of traces with ``instrument(..., exclude=["/healthz"])`` (an excluded
path costs fastprof one lookup and creates nothing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.types import Receive, Scope, Send

from fastprof import LoopMonitor
from fastprof._options import check_int, check_seconds

__all__ = ["HealthCheck"]

_SLOTS: Final = 8  # the window is kept as this many slices, each holding its largest lag


class HealthCheck:
    """Healthy while the event loop keeps up and the thread pool is not saturated.

    Args:
        loop_monitor: The monitor whose heartbeat and thread-pool view are used; it
            must be running (``instrument(app, loop_monitor=...)`` starts it).
        max_lag_s: Unhealthy when the largest heartbeat lag within ``window_s``
            exceeds this (a loop blocked for that long delays every request).
        window_s: How far back the lag is considered.
        max_threadpool_waiting: Unhealthy when every worker thread is busy and more
            than this many sync calls are queued for one; ``None`` ignores the
            thread pool.
        clock: Monotonic clock (tests inject one).
    """

    def __init__(
        self,
        loop_monitor: LoopMonitor,
        *,
        max_lag_s: float = 0.5,
        window_s: float = 30.0,
        max_threadpool_waiting: int | None = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(loop_monitor, LoopMonitor):
            raise ValueError(f"loop_monitor: expected a fastprof.LoopMonitor, got {loop_monitor!r}")
        self.max_lag_s = check_seconds("max_lag_s", max_lag_s, 0.001, 3600.0)
        self.window_s = check_seconds("window_s", window_s, 0.1, 86_400.0)
        self.max_threadpool_waiting = (
            None
            if max_threadpool_waiting is None
            else check_int("max_threadpool_waiting", max_threadpool_waiting, 0, 1_000_000)
        )
        self._monitor = loop_monitor
        self._clock = clock
        self._slot_s = self.window_s / _SLOTS
        # Per slice of the window: (slice number, largest lag seen in it).
        self._slots: list[tuple[int, float]] = [(-1, 0.0)] * _SLOTS
        self._last_beat: float | None = None
        loop_monitor.add_beat_listener(self._on_beat)

    def _on_beat(self, lag: float) -> None:
        """Loop thread, every heartbeat: a few arithmetic operations."""
        now = self._clock()
        self._last_beat = now
        number = int(now / self._slot_s)
        index = number % _SLOTS
        slot_number, slot_max = self._slots[index]
        if slot_number != number or lag > slot_max:
            self._slots[index] = (number, lag)

    def max_recent_lag_s(self) -> float | None:
        """The largest heartbeat lag within the window, or ``None`` without recent beats."""
        now = self._clock()
        last = self._last_beat
        if last is None or now - last > self.window_s:
            return None
        oldest = int((now - self.window_s) / self._slot_s)
        return max((lag for number, lag in self._slots if number >= oldest), default=0.0)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, details)``: what the endpoint answers, for custom endpoints."""
        reasons: list[str] = []
        lag = self.max_recent_lag_s()
        loop: dict[str, Any] = {
            "monitoring": lag is not None,
            "max_lag_s": round(lag, 6) if lag is not None else None,
            "threshold_s": self.max_lag_s,
            "window_s": self.window_s,
        }
        if lag is not None and lag > self.max_lag_s:
            reasons.append("event_loop_lag")
        details: dict[str, Any] = {"status": "ok", "loop": loop}
        snapshot = self._monitor.threadpool_snapshot()
        if snapshot is not None:
            used, total, waiting = snapshot
            details["threadpool"] = {"used": used, "limit": total, "waiting": waiting}
            limit = self.max_threadpool_waiting
            if limit is not None and used >= total and waiting > limit:
                reasons.append("threadpool_saturated")
        if reasons:
            details["status"] = "unhealthy"
            details["reasons"] = reasons
        return not reasons, details

    def app(self) -> Callable[[Scope, Receive, Send], Any]:
        """An ASGI app answering ``GET``/``HEAD`` with 200 or 503 and a small JSON body."""

        async def health_app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            method = scope.get("method")
            headers = [(b"cache-control", b"no-store")]
            if method not in ("GET", "HEAD"):
                status, body = 405, b'{"status":"method_not_allowed"}'
                headers.append((b"allow", b"GET, HEAD"))
            else:
                healthy, details = self.check()
                status = 200 if healthy else 503
                body = json.dumps(details, separators=(",", ":"), allow_nan=False).encode()
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(body)).encode("ascii")))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

        return _AsgiApp(health_app)


class _AsgiApp:
    """An ASGI callable that routers mount as an app (a plain function would be
    taken for a request handler by ``Route``)."""

    __slots__ = ("_call",)

    def __init__(self, call: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._call(scope, receive, send)
