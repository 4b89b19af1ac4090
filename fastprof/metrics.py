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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from fastprof.__about__ import __version__

__all__ = ["DURATION_BUCKETS_S", "METER_NAME", "LoopMetrics", "ThreadpoolSnapshot"]

METER_NAME: Final = "fastprof"

DURATION_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

ThreadpoolSnapshot = tuple[int, int, int]
"""``(tokens used, tokens total, tasks waiting)``."""


class LoopMetrics:
    """The instruments, created once per monitor from a meter provider.

    ``threadpool`` is called by the metric reader (any thread) to observe the
    thread-pool gauges; it returns ``None`` when nothing is known yet.
    """

    __slots__ = ("blocked_duration", "blocks", "lag", "threadpool_wait")

    def __init__(
        self,
        meter_provider: MeterProvider | None,
        threadpool: Callable[[], ThreadpoolSnapshot | None] | None = None,
    ) -> None:
        meter = metrics.get_meter(METER_NAME, __version__, meter_provider=meter_provider)
        buckets = list(DURATION_BUCKETS_S)
        self.lag = meter.create_histogram(
            "fastprof.loop.lag",
            unit="s",
            description="Scheduling lag of the event loop: how late a timer callback ran.",
            explicit_bucket_boundaries_advisory=buckets,
        )
        self.blocks = meter.create_counter(
            "fastprof.loop.blocks",
            unit="{block}",
            description="Times the event loop was blocked longer than the threshold.",
        )
        self.blocked_duration = meter.create_histogram(
            "fastprof.loop.blocked.duration",
            unit="s",
            description="Duration of each reported event-loop block.",
            explicit_bucket_boundaries_advisory=buckets,
        )
        self.threadpool_wait = meter.create_histogram(
            "fastprof.threadpool.wait.duration",
            unit="s",
            description="Time a sync call waited for a worker thread (anyio thread limiter).",
            explicit_bucket_boundaries_advisory=buckets,
        )
        if threadpool is not None:
            read = threadpool

            def observe(index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
                def callback(options: CallbackOptions) -> Iterable[Observation]:
                    snapshot = read()
                    if snapshot is None:
                        return ()
                    return (Observation(snapshot[index]),)

                return callback

            meter.create_observable_gauge(
                "fastprof.threadpool.tokens.used",
                callbacks=[observe(0)],
                unit="{token}",
                description="Tokens of anyio's default thread limiter in use (busy threads).",
            )
            meter.create_observable_gauge(
                "fastprof.threadpool.tokens.limit",
                callbacks=[observe(1)],
                unit="{token}",
                description="Total tokens of anyio's default thread limiter.",
            )
            meter.create_observable_gauge(
                "fastprof.threadpool.waiting",
                callbacks=[observe(2)],
                unit="{task}",
                description="Tasks waiting for a token of anyio's default thread limiter.",
            )
