"""The loop monitor's OpenTelemetry instruments (listed in :mod:`fastprof.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from fastprof.__about__ import __version__
from fastprof.metrics import DURATION_BUCKETS_S, METER_NAME, ThreadpoolSnapshot

__all__ = ["LoopMetrics"]


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
