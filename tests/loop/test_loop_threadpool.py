"""Thread-pool monitoring: limiter gauges, saturation warning, per-call wait histogram."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio.to_thread
import pytest
from _loop_support import BACKENDS
from fastapi import FastAPI
from structlog.testing import capture_logs

import fastprof
from fastprof._context import Timing
from tests._client import client


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


class AddWaits(fastprof.RequestHooks):
    """Stands in for the dependency instrumentation: records per-call waits."""

    def on_request_end(self, state: fastprof.RequestState) -> None:
        state.add_timing(Timing("dependency get_db", "sync", 0.01, threadpool_wait_s=0.2))
        state.add_timing(Timing("endpoint", "endpoint", 0.5, threadpool_wait_s=0.3))
        state.add_timing(Timing("dependency auth", "async", 0.001))


@pytest.mark.anyio
async def test_exhausted_limiter_reads_full_and_warns(
    spans: Any, make_monitor: Any, metrics: Any
) -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    original = limiter.total_tokens
    limiter.total_tokens = 2
    try:
        monitor = make_monitor(threshold_s=0.1)
        app = FastAPI()

        @app.get("/sync")
        def sync_endpoint() -> dict[str, str]:
            time.sleep(0.5)
            return {}

        fastprof.instrument(
            app, tracer_provider=spans.provider, loop_monitor=monitor, hooks=[AddWaits()]
        )
        with capture_logs() as logs:
            async with client(app) as c:
                requests = [asyncio.ensure_future(c.get("/sync")) for _ in range(4)]
                await asyncio.sleep(0.25)
                used = [p.value for p in metrics.points("fastprof.threadpool.tokens.used")]
                limit = [p.value for p in metrics.points("fastprof.threadpool.tokens.limit")]
                waiting = [p.value for p in metrics.points("fastprof.threadpool.waiting")]
                assert all(r.status_code == 200 for r in await asyncio.gather(*requests))
        assert used == [2]
        assert limit == [2]
        assert waiting == [2]
        [warning] = [e for e in logs if e["event"] == "thread pool saturated"]
        assert warning["tokens_used"] == 2 and warning["tokens_limit"] == 2
        assert warning["waiting"] >= 1
        # Back to idle once the requests are done.
        assert [p.value for p in metrics.points("fastprof.threadpool.tokens.used")] == [0]
    finally:
        limiter.total_tokens = original

    points = {
        p.attributes["fastprof.operation.kind"]: p
        for p in metrics.points("fastprof.threadpool.wait.duration")
    }
    assert set(points) == {"sync", "endpoint"}  # async calls never wait for a thread
    assert points["sync"].count == 4 and points["sync"].sum == pytest.approx(0.8)
    # 4 stand-in entries (0.3 s each) plus the real waits measured by the dependency
    # instrumentation: two of the four sync endpoints queued ~0.5 s for a token.
    real = points["endpoint"]
    assert real.count == 8
    assert 1.2 + 0.8 <= real.sum <= 1.2 + 1.6


@pytest.mark.anyio
async def test_threadpool_monitoring_can_be_turned_off(spans: Any, make_monitor: Any, metrics: Any):
    monitor = make_monitor(threadpool=False)
    app = FastAPI()

    @app.get("/")
    def root() -> dict[str, str]:
        return {}

    fastprof.instrument(
        app, tracer_provider=spans.provider, loop_monitor=monitor, hooks=[AddWaits()]
    )
    async with client(app) as c:
        await c.get("/")
    assert monitor.threadpool_snapshot() is None
    assert metrics.points("fastprof.threadpool.tokens.used") == []
    assert metrics.points("fastprof.threadpool.wait.duration") == []


def test_options_are_validated() -> None:
    for kwargs, name in [
        ({"threshold_s": 0}, "threshold_s"),
        ({"threshold_s": "1"}, "threshold_s"),
        ({"interval_s": -1.0}, "interval_s"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_stack_depth": True}, "max_stack_depth"),
        ({"threadpool": 1}, "threadpool"),
        ({"meter_provider": object()}, "meter_provider"),
        ({"max_reports_per_minute": -1}, "max_reports_per_minute"),
    ]:
        with pytest.raises(ValueError, match=name):
            fastprof.LoopMonitor(**kwargs)
    with pytest.raises(ValueError, match="loop_monitor"):
        fastprof.instrument(FastAPI(), loop_monitor=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slow_requests"):
        fastprof.instrument(FastAPI(), slow_requests=object())  # type: ignore[arg-type]
