"""OpenTelemetry metrics recorded by fastprof's event-loop and thread-pool monitoring.

Only the OpenTelemetry *metrics API* is used: the instruments come from the
``meter_provider`` you pass (or the global one), so they are exported with the
rest of your metrics by whatever reader/exporter you configured. Without an SDK
meter provider every instrument is a no-op.

Instruments (all durations in seconds):

| name                                  | kind      | meaning                                      |
|---------------------------------------|-----------|----------------------------------------------|
| ``fastprof.loop.lag``                 | histogram | how late the heartbeat callback ran          |
| ``fastprof.loop.blocks``              | counter   | blocks longer than the threshold             |
| ``fastprof.loop.blocked.duration``    | histogram | duration of each reported block              |
| ``fastprof.threadpool.wait.duration`` | histogram | per call: submit to start on a worker thread |
| ``fastprof.threadpool.tokens.used``   | gauge     | anyio default limiter: tokens borrowed       |
| ``fastprof.threadpool.tokens.limit``  | gauge     | anyio default limiter: total tokens          |
| ``fastprof.threadpool.waiting``       | gauge     | tasks queued for a token                     |

The two block instruments carry ``fastprof.loop.in_request``, ``http.route`` (for a
block in a request) and ``fastprof.loop.cause`` (``cpu``, ``wait`` or ``gc``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["DURATION_BUCKETS_S", "METER_NAME", "ThreadpoolSnapshot"]

METER_NAME: Final = "fastprof"

DURATION_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

ThreadpoolSnapshot = tuple[int, int, int]
"""``(tokens used, tokens total, tasks waiting)``."""
