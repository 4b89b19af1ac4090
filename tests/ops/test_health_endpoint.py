"""fastprof.health: 200/503 from the loop monitor's lag and thread-pool view, never traced."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI

import fastprof
from fastprof.health import HealthCheck


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def build(spans: Any, monitor: fastprof.LoopMonitor, health: HealthCheck) -> FastAPI:
    app = FastAPI()
    release = threading.Event()
    app.state.release = release

    @app.get("/block")
    async def block() -> dict[str, str]:
        time.sleep(0.2)  # blocks the event loop
        return {}

    @app.get("/sync")
    def sync() -> dict[str, str]:  # holds a worker thread until released
        release.wait(10)
        return {}

    app.add_route("/healthz", health.app(), include_in_schema=False)
    return fastprof.instrument(
        app, tracer_provider=spans.provider, loop_monitor=monitor, exclude=["/healthz"]
    )


@pytest.mark.anyio
async def test_a_lagging_loop_is_unhealthy_until_the_window_passes(spans) -> None:
    monitor = fastprof.LoopMonitor(threshold_s=0.05, max_reports_per_minute=0)
    health = HealthCheck(monitor, max_lag_s=0.1, window_s=0.5)
    app = build(spans, monitor, health)
    try:
        async with client(app) as c:
            first = await c.get("/healthz")  # starts nothing: excluded from fastprof
            assert first.status_code == 200
            assert first.json()["loop"]["monitoring"] is False  # no heartbeat yet
            await c.get("/block")  # the first traced request starts the monitor
            await asyncio.sleep(0.1)
            sick = await c.get("/healthz")
            assert sick.status_code == 503
            body = sick.json()
            assert body["status"] == "unhealthy"
            assert body["reasons"] == ["event_loop_lag"]
            assert body["loop"]["max_lag_s"] >= 0.15
            assert body["loop"]["monitoring"] is True
            await asyncio.sleep(0.7)  # the lag leaves the window
            well = await c.get("/healthz")
            assert well.status_code == 200
            assert well.json()["status"] == "ok"
            assert well.json()["loop"]["max_lag_s"] < 0.1
            assert well.headers["content-type"] == "application/json"
            assert well.headers["cache-control"] == "no-store"
    finally:
        monitor.stop()
    # Health checks never create a span; only /block was traced.
    assert [s.attributes["url.path"] for s in spans.server()] == ["/block"]


@pytest.mark.anyio
async def test_a_saturated_thread_pool_is_unhealthy(spans) -> None:
    """Every worker thread busy and a call queued: 503 with ``threadpool_saturated``."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    original = limiter.total_tokens
    limiter.total_tokens = 1
    monitor = fastprof.LoopMonitor(threshold_s=0.5, max_reports_per_minute=0)
    health = HealthCheck(monitor)
    app = build(spans, monitor, health)
    try:
        async with client(app) as c:
            requests = [asyncio.ensure_future(c.get("/sync")) for _ in range(2)]
            await asyncio.sleep(0.2)
            sick = await c.get("/healthz")
            app.state.release.set()
            assert [r.status_code for r in await asyncio.gather(*requests)] == [200, 200]
            well = await c.get("/healthz")
    finally:
        app.state.release.set()
        limiter.total_tokens = original
        monitor.stop()
    assert sick.status_code == 503
    assert sick.json()["reasons"] == ["threadpool_saturated"]
    assert sick.json()["threadpool"] == {"used": 1, "limit": 1, "waiting": 1}
    assert well.status_code == 200
    assert well.json()["threadpool"] == {"used": 0, "limit": 1, "waiting": 0}


@pytest.mark.anyio
async def test_thread_pool_can_be_ignored_and_methods_are_limited(spans) -> None:
    monitor = fastprof.LoopMonitor(max_reports_per_minute=0)
    health = HealthCheck(monitor, max_threadpool_waiting=None)
    app = build(spans, monitor, health)
    async with client(app) as c:
        head = await c.head("/healthz")
        post = await c.post("/healthz")
    assert head.status_code == 200 and head.content == b""
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


def test_bad_options_fail_at_start_up_naming_the_option() -> None:
    monitor = fastprof.LoopMonitor()
    with pytest.raises(ValueError, match="loop_monitor"):
        HealthCheck(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_lag_s"):
        HealthCheck(monitor, max_lag_s=0)
    with pytest.raises(ValueError, match="window_s"):
        HealthCheck(monitor, window_s=-1)
    with pytest.raises(ValueError, match="max_threadpool_waiting"):
        HealthCheck(monitor, max_threadpool_waiting=-1)


@pytest.mark.anyio
async def test_a_failing_beat_listener_is_contained(spans) -> None:
    """A listener that raises is counted as an internal error; the others still run and
    the monitor keeps beating."""
    from fastprof import _internal_errors

    monitor = fastprof.LoopMonitor(threshold_s=0.02, max_reports_per_minute=0)
    seen: list[float] = []

    def broken(lag: float) -> None:
        raise RuntimeError("listener bug")

    monitor.add_beat_listener(broken)
    monitor.add_beat_listener(seen.append)
    monitor.start()
    try:
        await asyncio.sleep(0.1)
    finally:
        monitor.stop()
    assert len(seen) >= 2
    assert monitor.lag_s == seen[-1]
    assert _internal_errors.counts()["loop.beat_listener"] == len(seen)
