"""Slow-request capture: the span tree of slow requests head sampling dropped."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode, TracerProvider

import fastprof
from fastprof.attributes import CAPTURE
from fastprof.testing import SpanRecorder
from tests._client import client
from tests._server import serve

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
UNSAMPLED_PARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"

seen_contexts: list[trace.SpanContext] = []


def sync_dep() -> int:
    time.sleep(0.01)
    return 1


async def yield_dep() -> AsyncIterator[int]:
    yield 2
    await asyncio.sleep(0.02)  # teardown, after the response


async def outer_dep(value: int = Depends(sync_dep)) -> int:
    return value + 1


async def failing_dep() -> int:
    raise HTTPException(status_code=503, detail="down")


async def first(n: int) -> int:
    await asyncio.sleep(0.05 * (n % 3))
    return n


async def second(n: int, value: int = Depends(first)) -> int:
    await asyncio.sleep(0.05)
    return value


async def blocking() -> int:
    time.sleep(0.2)
    return 1


_release: list[asyncio.Event] = [asyncio.Event()]


async def lingering() -> AsyncIterator[int]:
    yield 1
    await _release[0].wait()


def _app(spans: SpanRecorder, capture: fastprof.SlowRequestCapture, **options: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/slow")
    async def slow(
        a: int = Depends(outer_dep), b: int = Depends(yield_dep)
    ) -> dict[str, int]:
        seen_contexts.append(trace.get_current_span().get_span_context())
        await asyncio.sleep(0.2)
        return {"a": a, "b": b}

    @app.get("/fast")
    async def fast(a: int = Depends(outer_dep)) -> dict[str, int]:
        return {"a": a}

    @app.get("/report")
    async def report() -> dict[str, str]:
        await asyncio.sleep(0.2)
        return {}

    @app.get("/failing")
    async def failing(value: int = Depends(failing_dep)) -> dict[str, int]:
        return {}

    @app.get("/crash")
    async def crash() -> None:
        await asyncio.sleep(0.15)
        raise ValueError("boom")

    fastprof.instrument(app, tracer_provider=spans.provider, slow_capture=capture, **options)
    return app


def _tree(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    by_name = {s.name: s for s in spans}
    assert len(by_name) == len(spans), [s.name for s in spans]
    return by_name


def _within(child: ReadableSpan, parent: ReadableSpan) -> bool:
    assert child.start_time is not None and child.end_time is not None
    assert parent.start_time is not None and parent.end_time is not None
    return parent.start_time <= child.start_time <= child.end_time <= parent.end_time


@pytest.mark.anyio
async def test_slow_unsampled_request_exports_its_whole_tree() -> None:
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    seen_contexts.clear()
    app = _app(spans, fastprof.SlowRequestCapture(threshold_s=0.18))
    async with client(app) as c:
        response = await c.get("/fast")
        assert response.status_code == 200
        assert spans.all() == []  # a fast request exports nothing
        response = await c.get("/slow?x=1", headers={"traceparent": UNSAMPLED_PARENT})
        assert response.status_code == 200
    tree = _tree(spans.all())
    assert set(tree) == {
        "GET /slow",
        "fastprof.dependencies",
        "dependency outer_dep",
        "dependency sync_dep",
        "dependency yield_dep",
        "fastprof.endpoint",
        "fastprof.serialization",
        "teardown yield_dep",
    }
    server = tree["GET /slow"]
    # The trace id and span id the request had and propagated (the app saw them).
    [seen] = seen_contexts
    assert not seen.trace_flags.sampled
    assert (server.context.trace_id, server.context.span_id) == (TRACE_ID, seen.span_id)
    assert server.parent is not None and server.parent.span_id == PARENT_ID
    assert server.kind == SpanKind.SERVER
    assert server.attributes[CAPTURE] == "slow"
    assert server.attributes["http.route"] == "/slow"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.query"] == "x=1"
    assert server.attributes["http.request.method"] == "GET"
    assert server.end_time - server.start_time >= 0.2e9

    def parent_of(name: str) -> str:
        span = tree[name]
        assert span.parent is not None and span.context.trace_id == TRACE_ID
        [parent] = [s for s in tree.values() if s.context.span_id == span.parent.span_id]
        return parent.name

    assert parent_of("fastprof.dependencies") == "GET /slow"
    assert parent_of("dependency outer_dep") == "fastprof.dependencies"
    assert parent_of("dependency sync_dep") == "dependency outer_dep"
    assert parent_of("dependency yield_dep") == "fastprof.dependencies"
    assert parent_of("fastprof.endpoint") == "GET /slow"
    assert parent_of("fastprof.serialization") == "GET /slow"
    assert parent_of("teardown yield_dep") == "GET /slow"
    [link] = tree["teardown yield_dep"].links
    assert link.context.span_id == tree["dependency yield_dep"].context.span_id
    # Real times: children inside their parents, in order, the endpoint's 200 ms.
    for name in ("dependency outer_dep", "dependency yield_dep", "fastprof.endpoint"):
        assert _within(tree[name], server)
    assert _within(tree["dependency sync_dep"], tree["dependency outer_dep"])
    assert tree["fastprof.endpoint"].start_time >= tree["fastprof.dependencies"].end_time
    assert tree["fastprof.endpoint"].end_time - tree["fastprof.endpoint"].start_time >= 0.19e9
    teardown = tree["teardown yield_dep"]
    assert teardown.start_time >= tree["fastprof.endpoint"].end_time
    assert teardown.end_time - teardown.start_time >= 0.015e9
    assert all(s.context.trace_flags.sampled for s in tree.values())


@pytest.mark.anyio
async def test_capture_has_the_shape_of_a_sampled_request() -> None:
    """The same request, sampled without capture and unsampled with it: the same tree."""

    async def shape(spans: SpanRecorder, capture: fastprof.SlowRequestCapture | None) -> Any:
        app = FastAPI()

        @app.get("/slow")
        async def slow(a: int = Depends(outer_dep), b: int = Depends(yield_dep)) -> dict[str, int]:
            await asyncio.sleep(0.12)
            return {}

        fastprof.instrument(app, tracer_provider=spans.provider, slow_capture=capture)
        async with client(app) as c:
            await c.get("/slow")
        names = {s.context.span_id: s.name for s in spans.all()}
        return sorted(
            (s.name, names.get(s.parent.span_id) if s.parent else None, sorted(s.attributes))
            for s in spans.all()
        )

    sampled = await shape(SpanRecorder(sampler=ALWAYS_ON), None)
    captured = await shape(SpanRecorder(sampler=ALWAYS_OFF), fastprof.SlowRequestCapture(0.1))
    assert [(n, p) for n, p, _ in captured] == [(n, p) for n, p, _ in sampled]
    for (name, _, captured_keys), (_, _, sampled_keys) in zip(captured, sampled, strict=True):
        extra = {CAPTURE} if name == "GET /slow" else set()
        assert set(captured_keys) == set(sampled_keys) | extra, name


@pytest.mark.anyio
async def test_sampled_requests_are_unchanged() -> None:
    spans = SpanRecorder(sampler=ALWAYS_ON)
    app = _app(spans, fastprof.SlowRequestCapture(threshold_s=0.0))
    async with client(app) as c:
        await c.get("/slow")
    assert spans.all()
    assert all(CAPTURE not in s.attributes for s in spans.all())
    assert len(spans.server()) == 1


@pytest.mark.anyio
async def test_errors_are_exported_with_their_status() -> None:
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    app = _app(spans, fastprof.SlowRequestCapture(threshold_s=0.0))
    async with client(app) as c:
        assert (await c.get("/failing")).status_code == 503
    failing = _tree(spans.all())
    assert failing["dependency failing_dep"].attributes["http.response.status_code"] == 503
    assert failing["GET /failing"].attributes["http.response.status_code"] == 503
    spans.clear()
    async with client(app, raise_app_exceptions=False) as c:
        assert (await c.get("/crash")).status_code == 500
    crash = _tree(spans.all())
    server = crash["GET /crash"]
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "ValueError"
    assert crash["fastprof.endpoint"].status.status_code is StatusCode.ERROR
    [exception] = [e for e in crash["fastprof.endpoint"].events if e.name == "exception"]
    assert exception.attributes["exception.type"] == "ValueError"


@pytest.mark.anyio
async def test_per_route_thresholds() -> None:
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    capture = fastprof.SlowRequestCapture(threshold_s=0.1, routes={"/report": 5.0, "/fast": 0.0})
    app = _app(spans, capture)
    async with client(app) as c:
        await c.get("/report")  # 200 ms, under its own 5 s
        await c.get("/fast")  # instant, over its own 0 s
    assert [s.attributes["http.route"] for s in spans.server()] == ["/fast"]


@pytest.mark.anyio
async def test_rate_limit_per_process() -> None:
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    capture = fastprof.SlowRequestCapture(threshold_s=0.0, max_per_minute=2)
    app = _app(spans, capture)
    async with client(app) as c:
        for _ in range(5):
            await c.get("/fast")
    assert len(spans.server()) == 2
    assert capture.exported == 2
    assert capture.suppressed == 3


@pytest.mark.anyio
async def test_blocked_loop_event_lands_on_the_captured_dependency() -> None:
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    monitor = fastprof.LoopMonitor(threshold_s=0.05, meter_provider=NoOpMeterProvider())
    app = FastAPI()

    @app.get("/blocked")
    async def blocked(value: int = Depends(blocking)) -> dict[str, int]:
        return {}

    fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        slow_capture=fastprof.SlowRequestCapture(threshold_s=0.1),
        loop_monitor=monitor,
    )
    try:
        async with client(app) as c:
            await c.get("/blocked")
    finally:
        monitor.stop()
    tree = _tree(spans.all())
    [event] = [e for e in tree["dependency blocking"].events if e.name == "fastprof.loop.blocked"]
    assert event.attributes["fastprof.loop.cause"] == "wait"
    assert event.attributes["fastprof.loop.blocked_s"] >= 0.1


def _fastapi_at_least(major: int, minor: int) -> bool:
    import fastapi

    found = tuple(int(part) for part in fastapi.__version__.split(".")[:2])
    return found >= (major, minor)


@pytest.mark.skipif(
    not _fastapi_at_least(0, 118),
    reason="FastAPI < 0.118 runs yield teardowns before the response: nothing lingers after it",
)
@pytest.mark.anyio
async def test_teardown_past_the_wait_is_exported_without_waiting_for_the_app() -> None:
    release = _release[0] = asyncio.Event()
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    app = FastAPI()

    @app.get("/linger")
    async def linger(value: int = Depends(lingering)) -> dict[str, int]:
        return {}

    capture = fastprof.SlowRequestCapture(threshold_s=0.0, teardown_wait_s=0.1)
    fastprof.instrument(app, tracer_provider=spans.provider, slow_capture=capture)
    async with client(app) as c:
        request = asyncio.ensure_future(c.get("/linger"))
        deadline = time.monotonic() + 5
        while not spans.server() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not request.done()  # the app has not returned: its teardown waits
        tree = _tree(spans.all())
        release.set()
        await request
    assert tree["teardown lingering"].end_time >= tree["teardown lingering"].start_time
    assert capture.exported == 1


def test_without_an_sdk_provider_capture_is_disabled_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    capture = fastprof.SlowRequestCapture(threshold_s=0.0, tracer_provider=NoOpTracerProvider())
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {}

    fastprof.instrument(app, tracer_provider=NoOpTracerProvider(), slow_capture=capture)

    async def run() -> None:
        async with client(app) as c:
            for _ in range(3):
                assert (await c.get("/")).status_code == 200

    with caplog.at_level(logging.WARNING, logger="fastprof"):
        asyncio.run(run())
    warnings = [r for r in caplog.records if "slow-request capture is disabled" in r.message]
    assert len(warnings) == 1
    assert not capture.enabled


class _WrappedProvider(TracerProvider):
    """A provider of the user's own making, around an SDK one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_tracer(*args, **kwargs)


def test_a_span_processor_for_a_provider_fastprof_cannot_use() -> None:
    recorder = SpanRecorder()
    provider = _WrappedProvider(SpanRecorder(sampler=ALWAYS_OFF).provider)
    processor = SimpleSpanProcessor(recorder.exporter)
    capture = fastprof.SlowRequestCapture(threshold_s=0.0, span_processor=processor)
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {}

    fastprof.instrument(app, tracer_provider=provider, slow_capture=capture)

    async def run() -> None:
        async with client(app) as c:
            assert (await c.get("/")).status_code == 200

    asyncio.run(run())
    [server] = recorder.server()
    assert server.attributes[CAPTURE] == "slow"
    recorder.shutdown()


@pytest.mark.server
def test_concurrent_slow_requests_on_uvicorn_do_not_mix() -> None:
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    app = FastAPI()

    @app.get("/work/{n}")
    async def work(n: int, value: int = Depends(second)) -> dict[str, int]:
        await asyncio.sleep(0.1)
        return {"n": value}

    fastprof.instrument(
        app, tracer_provider=spans.provider, slow_capture=fastprof.SlowRequestCapture(0.1)
    )
    with serve(app) as url:

        def get(n: int) -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                assert http.get(f"/work/{n}").json() == {"n": n}

        threads = [threading.Thread(target=get, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    servers = spans.server()
    assert len(servers) == 6
    assert len({s.context.trace_id for s in servers}) == 6
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans.all():
        by_trace.setdefault(span.context.trace_id, []).append(span)
    for server in servers:
        tree = _tree(by_trace[server.context.trace_id])
        n = int(server.attributes["url.path"].rsplit("/", 1)[1])
        assert set(tree) == {
            server.name,
            "fastprof.dependencies",
            "dependency first",
            "dependency second",
            "fastprof.endpoint",
            "fastprof.serialization",
        }
        ids = {s.context.span_id for s in tree.values()}
        for span in tree.values():
            if span is not server:
                assert span.parent is not None and span.parent.span_id in ids
        first_span = tree["dependency first"]
        assert first_span.end_time - first_span.start_time >= 0.05e9 * (n % 3) * 0.9


@pytest.mark.anyio
async def test_with_fastapi_native_telemetry_the_dropped_native_span_is_the_root() -> None:
    if "telemetry" not in FastAPI.__init__.__code__.co_varnames:
        pytest.skip("FastAPI < 0.142 has no native telemetry")
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    app = FastAPI(telemetry={"tracer_provider": spans.provider})
    seen_contexts.clear()

    @app.get("/native/{n}")
    async def native(n: int, a: int = Depends(outer_dep)) -> dict[str, int]:
        seen_contexts.append(trace.get_current_span().get_span_context())
        await asyncio.sleep(0.12)
        return {}

    fastprof.instrument(
        app, tracer_provider=spans.provider, slow_capture=fastprof.SlowRequestCapture(0.1)
    )
    async with client(app) as c:
        assert (await c.get("/native/1")).status_code == 200
    [server] = spans.server()
    assert server.name == "GET /native/{n}"
    assert server.attributes["http.route"] == "/native/{n}"
    assert server.attributes[CAPTURE] == "slow"
    [seen] = seen_contexts
    assert server.context.trace_id == seen.trace_id
    names = {s.name for s in spans.all()}
    assert {"dependency outer_dep", "dependency sync_dep"} <= names
