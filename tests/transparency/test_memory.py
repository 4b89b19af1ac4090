"""Requests leave nothing behind: no reference cycles, no growth."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

import fastprof
from tests._transparency import drive_http, garbage_after_requests

pytestmark = pytest.mark.anyio

HAS_NATIVE = "telemetry" in FastAPI.__init__.__code__.co_varnames


class Discard(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def provider(sampled: bool) -> TracerProvider:
    tp = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    tp.add_span_processor(SimpleSpanProcessor(Discard()))
    return tp


def make_app(config: str) -> FastAPI:
    native = config == "native"
    kwargs: dict[str, Any] = {}
    if HAS_NATIVE:
        kwargs["telemetry"] = {"tracer_provider": provider(True)} if native else {"tracing": False}
    app = FastAPI(**kwargs)

    async def get_db() -> AsyncIterator[str]:
        yield "db"

    def get_settings() -> str:
        return "settings"

    @app.get("/items/{item_id}")
    async def item(
        item_id: int, db: str = Depends(get_db), settings: str = Depends(get_settings)
    ) -> dict[str, Any]:
        return {"item_id": item_id, "db": db}

    options: dict[str, Any] = {"tracer_provider": provider(config != "unsampled")}
    if config == "everything":
        options.update(
            profiling=fastprof.Profiling(secret="s" * 32, sample_rate=0.0),
            loop_monitor=fastprof.LoopMonitor(threshold_s=1.0),
            slow_requests=fastprof.SlowRequestLog(threshold_s=10.0),
        )
    return fastprof.instrument(app, **options)


CONFIGS = ["unsampled", "sampled", "native", "everything"]


@pytest.mark.parametrize("config", CONFIGS)
async def test_requests_create_no_reference_cycles(config: str) -> None:
    """Cycles would keep each request's scope (and FastAPI's exit stacks) alive until a GC pass."""
    if config == "native" and not HAS_NATIVE:
        pytest.skip("FastAPI < 0.142 has no native telemetry")
    app = make_app(config)
    assert await garbage_after_requests(app, "/items/1") == 0


async def test_memory_does_not_grow_over_many_requests() -> None:
    app = make_app("everything")
    for _ in range(200):
        await drive_http(app, "GET", "/items/1")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(2000):
            await drive_http(app, "GET", "/items/1")
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    fastprof_growth = sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if "/fastprof/" in (stat.traceback[0].filename if stat.traceback else "")
    )
    assert fastprof_growth < 64 * 1024


@pytest.mark.server
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_finished_request_is_freed_while_its_connection_stays_open(loop: str) -> None:
    """uvicorn arms its keep-alive timer inside the request's last ``send``, so the timer
    holds a copy of the request's context until the connection's next request. What
    fastprof's context values (the request state, the dependency tracker) refer to must
    not stay alive through it: with the garbage collector off, the request's task (which
    the loop monitor records on the state) and the dependency tracker's nodes are freed
    at once, while the connection stays open."""
    import asyncio
    import time
    import weakref

    import httpx

    from tests._server import serve

    tasks: list[weakref.ref[asyncio.Task[Any]]] = []
    app = FastAPI()

    def dep() -> int:
        return 1

    @app.get("/")
    async def root(value: int = Depends(dep)) -> int:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(weakref.ref(task))
        return value

    fastprof.instrument(
        app,
        tracer_provider=provider(False),
        loop_monitor=fastprof.LoopMonitor(threshold_s=1.0),
        slow_requests=fastprof.SlowRequestLog(threshold_s=10.0),
    )
    gc.disable()
    try:
        with (
            serve(app, loop=loop, timeout_keep_alive=30) as url,
            httpx.Client(base_url=url) as client,
        ):
            assert client.get("/").json() == 1  # the connection stays open (keep-alive)
            deadline = time.monotonic() + 2
            while tasks[0]() is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert tasks[0]() is None
    finally:
        gc.enable()
