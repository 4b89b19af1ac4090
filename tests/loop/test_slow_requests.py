"""The slow-request log: one line explaining where the time went."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from structlog.testing import capture_logs

import fastprof
from fastprof._context import Timing
from tests._client import client


class FakeDependencyTimings(fastprof.RequestHooks):
    """Stands in for the dependency instrumentation (it fills ``state.timings``)."""

    def on_request_end(self, state: fastprof.RequestState) -> None:
        for i in range(7):
            state.add_timing(Timing(f"dependency dep{i}", "async", 0.01 * (i + 1)))
        state.add_timing(Timing("dependency get_db", "sync", 0.2, threadpool_wait_s=0.15))
        state.add_timing(Timing("endpoint", "endpoint", 0.3))
        state.add_timing(Timing("serialize response", "serialization", 0.02))
        state.profile_id = "prof-123"


def _slow_logs(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "slow request"]


@pytest.mark.anyio
async def test_slow_request_logs_one_line_with_the_breakdown(spans: Any, make_monitor: Any) -> None:
    app = FastAPI()

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        time.sleep(0.2)  # blocks the loop: counted as loop_blocked_s
        await asyncio.sleep(0.05)
        return {"order_id": order_id}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {}

    fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        hooks=[FakeDependencyTimings()],
        dependencies=False,  # the stand-in provides every timing
        loop_monitor=make_monitor(threshold_s=0.1),
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.15),
    )
    with capture_logs() as logs:
        async with client(app) as c:
            assert (await c.get("/fast")).status_code == 200
            assert (await c.get("/orders/42")).status_code == 200
    [line] = _slow_logs(logs)
    server = next(s for s in spans.server() if s.attributes["http.route"] == "/orders/{order_id}")
    assert line["log_level"] == "warning"
    assert line["route"] == "/orders/{order_id}"
    assert line["method"] == "GET"
    assert line["status"] == 200
    assert 0.2 <= line["duration_s"] < 5
    assert line["request_id"] == server.attributes["fastprof.request_id"]
    assert line["trace_id"] == format(server.context.trace_id, "032x")
    assert line["span_id"] == format(server.context.span_id, "016x")
    assert [d["name"] for d in line["dependencies"]] == [
        "dependency get_db",
        "dependency dep6",
        "dependency dep5",
        "dependency dep4",
        "dependency dep3",
    ]
    assert line["dependencies"][0] == {
        "name": "dependency get_db",
        "kind": "sync",
        "duration_s": 0.2,
        "threadpool_wait_s": 0.15,
    }
    assert line["endpoint_s"] == 0.3
    assert line["serialization_s"] == 0.02
    assert line["threadpool_wait_s"] == 0.15
    assert 0.1 <= line["loop_blocked_s"] <= 2.0
    assert line["profile_id"] == "prof-123"


@pytest.mark.anyio
async def test_fast_requests_and_missing_timings(spans: Any) -> None:
    app = FastAPI()

    @app.get("/slowish")
    async def slowish() -> dict[str, str]:
        await asyncio.sleep(0.12)
        return {}

    fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        dependencies=False,
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.1, level="info", top=2),
    )
    with capture_logs() as logs:
        async with client(app) as c:
            await c.get("/slowish")
            await c.get("/missing")  # fast 404: no line
    [line] = _slow_logs(logs)
    assert line["log_level"] == "info"
    assert line["dependencies"] == []
    assert line["endpoint_s"] is None and line["serialization_s"] is None
    assert line["loop_blocked_s"] == 0.0 and line["profile_id"] is None


def test_slow_request_options_are_validated() -> None:
    for kwargs, name in [
        ({"threshold_s": -1}, "threshold_s"),
        ({"top": 100}, "top"),
        ({"level": "loud"}, "level"),
        ({"event": ""}, "event"),
        ({"dependencies": "some"}, "dependencies"),
    ]:
        with pytest.raises(ValueError, match=name):
            fastprof.SlowRequestLog(**kwargs)


def _report_app() -> FastAPI:
    from collections.abc import AsyncIterator

    from fastapi import Depends

    async def get_db() -> AsyncIterator[str]:
        await asyncio.sleep(0.08)
        yield "db"

    def get_settings() -> str:
        time.sleep(0.03)
        return "settings"

    app = FastAPI()

    @app.get("/report")
    def report(db: str = Depends(get_db), settings: str = Depends(get_settings)) -> dict[str, str]:
        time.sleep(0.05)
        return {"db": db, "settings": settings}

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "unsampled"])
async def test_breakdown_from_real_dependency_instrumentation(spans: Any, sampled: bool) -> None:
    """``dependencies="all"``: the log lists the real dependencies, also for requests
    whose trace is not sampled."""
    app = _report_app()
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    provider = spans.provider if sampled else TracerProvider(sampler=ALWAYS_OFF)
    fastprof.instrument(
        app,
        tracer_provider=provider,
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.1, dependencies="all"),
    )
    with capture_logs() as logs:
        async with client(app) as c:
            assert (await c.get("/report")).status_code == 200
    assert bool(spans.all()) is sampled  # no spans at all when unsampled
    [line] = _slow_logs(logs)
    names = [d["name"] for d in line["dependencies"]]
    assert names[0].endswith("get_db") and names[1].endswith("get_settings")
    assert line["dependencies"][0]["duration_s"] >= 0.07
    assert line["endpoint_s"] is not None and line["endpoint_s"] >= 0.04
    assert line["serialization_s"] is not None and line["serialization_s"] >= 0


@pytest.mark.anyio
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "unsampled"])
async def test_traced_breakdown_times_only_traced_requests(spans: Any, sampled: bool) -> None:
    """``dependencies="traced"``: a sampled slow request lists its dependencies; an
    unsampled one is still logged, with its status and totals, and nothing was timed."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    app = _report_app()
    provider = spans.provider if sampled else TracerProvider(sampler=ALWAYS_OFF)
    states: list[fastprof.RequestState] = []

    class Keep(fastprof.RequestHooks):
        def on_request_end(self, state: fastprof.RequestState) -> None:
            states.append(state)

    fastprof.instrument(
        app,
        tracer_provider=provider,
        hooks=[Keep()],
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.1, dependencies="traced"),
    )
    with capture_logs() as logs:
        async with client(app) as c:
            assert (await c.get("/report")).status_code == 200
    [line] = _slow_logs(logs)
    assert line["route"] == "/report" and line["status"] == 200
    assert line["duration_s"] >= 0.15
    [state] = states
    if sampled:
        names = [d["name"] for d in line["dependencies"]]
        assert names[0].endswith("get_db") and names[1].endswith("get_settings")
        assert line["endpoint_s"] is not None and line["endpoint_s"] >= 0.04
    else:
        assert line["dependencies"] == [] and state.timings == ()
        assert line["endpoint_s"] is None and line["serialization_s"] is None


@pytest.mark.server
def test_unsampled_slow_requests_are_logged_on_a_real_server(make_monitor: Any) -> None:
    """Production on uvicorn + uvloop: nothing sampled, every feature on, the log's default
    ``dependencies="traced"``. The slow request is logged with its route, status, the
    request and (unsampled, propagated) trace ids and the loop time it blocked; fast ones
    and one whose background task runs long after its response are not."""
    import httpx
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    from tests._server import serve

    app = FastAPI()

    @app.get("/slow/{n}")
    async def slow(n: int) -> dict[str, int]:
        time.sleep(0.15)  # blocks the loop: the monitor charges it to this request
        await asyncio.sleep(0.2)
        return {"n": n}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {}

    @app.get("/later")
    async def later(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(asyncio.sleep, 0.5)
        return {}

    fastprof.instrument(
        app,
        tracer_provider=TracerProvider(sampler=ParentBased(ALWAYS_OFF)),
        loop_monitor=make_monitor(threshold_s=0.1),
        profiling=fastprof.Profiling(secret="s" * 32),
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.3),
    )
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with capture_logs() as logs:
        with (
            serve(app, loop="uvloop", lifespan="on") as base,
            httpx.Client(base_url=base, timeout=5) as http,
        ):
            assert http.get("/fast").status_code == 200
            assert http.get("/later").status_code == 200
            response = http.get(
                "/slow/7",
                headers={
                    "x-request-id": "slow-7",
                    "traceparent": f"00-{trace_id}-00f067aa0ba902b7-00",
                },
            )
            assert response.json() == {"n": 7}
            time.sleep(0.6)  # /later's background task ends before the server stops
    [line] = _slow_logs(logs)
    assert line["route"] == "/slow/{n}" and line["method"] == "GET" and line["status"] == 200
    assert line["request_id"] == "slow-7" and line["trace_id"] == trace_id
    assert 0.35 <= line["duration_s"] < 5
    assert line["loop_blocked_s"] >= 0.1
    assert line["dependencies"] == [] and line["endpoint_s"] is None
