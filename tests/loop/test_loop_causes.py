"""Why the loop was blocked (CPU and GC time of the loop thread, a cause), asyncio and uvloop."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _loop_support import BACKENDS, blocked_events, blocked_logs, line_of
from fastapi import Depends, FastAPI
from structlog.testing import capture_logs

import fastprof
from tests._client import client


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(scope="module")
def large_heap() -> Iterator[list[dict[str, list[int]]]]:
    """Many objects the collector tracks, so that a full collection takes a while
    (no cycles: they are freed without the collector)."""
    heap = [{"x": [1]} for _ in range(400_000)]
    yield heap
    heap.clear()


async def sleeping_dependency() -> int:
    time.sleep(0.3)  # CAUSE-DEP
    return 1


def _app(monitor: fastprof.LoopMonitor, spans: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/sleep")
    async def sleep() -> dict[str, str]:
        time.sleep(0.3)  # CAUSE-SLEEP
        return {}

    @app.get("/busy")
    async def busy() -> dict[str, str]:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # CAUSE-BUSY
            pass
        return {}

    @app.get("/collect")
    async def collect() -> dict[str, str]:
        # Full collections of the large heap for at least 0.3 s: a block well past the
        # threshold however fast the machine is, most of it in the collector. A
        # collection holds the GIL throughout, so the watchdog samples between them
        # only; the short sleep after them lets it see the block before the request
        # ends (its report then lands on the still-open span).
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            gc.collect()  # CAUSE-GC
        time.sleep(0.05)
        return {}

    @app.get("/dependency")
    async def dependency(value: int = Depends(sleeping_dependency)) -> dict[str, int]:
        return {"value": value}

    fastprof.instrument(app, tracer_provider=spans.provider, loop_monitor=monitor)
    return app


async def _get(app: FastAPI, path: str) -> None:
    async with client(app) as c:
        assert (await c.get(path)).status_code == 200


def _event(spans: Any, route: str) -> Any:
    [server] = [s for s in spans.server() if s.attributes["http.route"] == route]
    [event] = blocked_events(server)
    return event.attributes


@pytest.mark.anyio
async def test_sleep_is_a_wait(spans: Any, make_monitor: Any, metrics: Any) -> None:
    app = _app(make_monitor(threshold_s=0.05), spans)
    with capture_logs() as logs:
        await _get(app, "/sleep")
    attrs = _event(spans, "/sleep")
    assert attrs["code.line.number"] == line_of("# CAUSE-SLEEP", __file__)
    assert attrs["fastprof.loop.cause"] == "wait"
    assert attrs["fastprof.loop.cpu_s"] < 0.5 * attrs["fastprof.loop.blocked_s"]
    assert attrs["fastprof.loop.gc_s"] < 0.05
    [log] = blocked_logs(logs)
    assert log["cause"] == "wait"
    assert log["cpu_s"] >= 0 and log["gc_s"] >= 0
    [point] = metrics.points("fastprof.loop.blocks")
    assert point.attributes["fastprof.loop.cause"] == "wait"


@pytest.mark.anyio
async def test_busy_loop_is_cpu(spans: Any, make_monitor: Any) -> None:
    app = _app(make_monitor(threshold_s=0.05), spans)
    await _get(app, "/busy")
    attrs = _event(spans, "/busy")
    assert attrs["code.line.number"] == line_of("# CAUSE-BUSY", __file__)
    assert attrs["fastprof.loop.cause"] == "cpu"
    assert attrs["fastprof.loop.cpu_s"] > 0.0


@pytest.mark.anyio
async def test_collecting_a_large_heap_is_gc(
    spans: Any, make_monitor: Any, large_heap: list[dict[str, list[int]]]
) -> None:
    app = _app(make_monitor(threshold_s=0.05), spans)
    await _get(app, "/collect")
    attrs = _event(spans, "/collect")
    assert attrs["fastprof.loop.cause"] == "gc"
    assert attrs["fastprof.loop.gc_s"] >= 0.5 * attrs["fastprof.loop.blocked_s"]
    assert attrs["code.function.name"] == "collect"


@pytest.mark.anyio
async def test_block_in_a_dependency_is_an_event_on_its_span(
    spans: Any, make_monitor: Any
) -> None:
    app = _app(make_monitor(threshold_s=0.05), spans)
    await _get(app, "/dependency")
    [server] = spans.server()
    [dependency] = spans.named("dependency sleeping_dependency")
    assert dependency.parent is not None
    assert blocked_events(server) == []
    [event] = blocked_events(dependency)
    attrs = event.attributes
    assert attrs["code.line.number"] == line_of("# CAUSE-DEP", __file__)
    assert attrs["fastprof.loop.cause"] == "wait"
    # Timed inside the dependency's span.
    assert dependency.start_time <= event.timestamp <= dependency.end_time
