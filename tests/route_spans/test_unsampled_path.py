"""Unsampled requests: the dropped-span fast path and the lean middleware path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import fastprof
from fastprof._sampling import drop_fast_path

pytestmark = pytest.mark.anyio

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331


def _tracer(sampler: Sampler) -> Any:
    return TracerProvider(sampler=sampler).get_tracer("fastprof")


def _remote(sampled: bool) -> Context:
    parent = SpanContext(
        TRACE_ID,
        PARENT_ID,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
        trace_state=TraceState([("vendor", "v1")]),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


def _same_as_sdk(tracer: Any, parent: Context) -> None:
    fast = drop_fast_path(tracer)
    assert fast is not None
    mine = fast(parent)
    assert mine is not None
    theirs = tracer.start_span("GET", context=parent, kind=SpanKind.SERVER)
    assert type(mine) is type(theirs) is NonRecordingSpan
    a, b = mine.get_span_context(), theirs.get_span_context()
    assert (a.is_remote, a.trace_flags, a.trace_state) == (
        b.is_remote,
        b.trace_flags,
        b.trace_state,
    )
    assert a.is_valid and a.span_id != b.span_id
    if parent:
        assert a.trace_id == b.trace_id == TRACE_ID
    else:
        assert a.trace_id != b.trace_id  # a fresh root trace id each time


def test_always_off_roots_and_parents_match_the_sdk() -> None:
    tracer = _tracer(ALWAYS_OFF)
    for parent in (Context(), _remote(False), _remote(True)):
        _same_as_sdk(tracer, parent)


def test_fast_constructions_hold_on_the_installed_api() -> None:
    """The fast path builds span contexts as tuples and dropped spans without their
    ``__init__`` only because the installed API checks out; on it, what it builds is
    what the public constructors build, for roots and remote parents alike."""
    from fastprof._sampling import _bare_span_construction, _context_layout

    assert _context_layout() is not None and _bare_span_construction()
    tracer = _tracer(ALWAYS_OFF)
    fast = drop_fast_path(tracer)
    assert fast is not None
    for parent in (Context(), _remote(False), _remote(True)):
        span = fast(parent)
        assert type(span) is NonRecordingSpan and vars(span).keys() == {"_context"}
        built = span.get_span_context()
        remote = trace.get_current_span(parent).get_span_context() if parent else None
        public = SpanContext(
            built.trace_id,
            built.span_id,
            is_remote=False,
            trace_flags=built.trace_flags,
            # A root's state is the SDK's default; a remote parent's is passed on.
            trace_state=remote.trace_state if remote is not None else None,
        )
        assert built == public and built.is_valid and not built.is_remote
        assert built.trace_state is public.trace_state
        if remote is not None:
            assert built.trace_id == remote.trace_id and built.span_id != remote.span_id
            assert dict(built.trace_state) == dict(remote.trace_state) != {}


def test_parent_based_fast_path_only_for_the_dropping_branch() -> None:
    tracer = _tracer(ParentBased(ALWAYS_ON))
    fast = drop_fast_path(tracer)
    assert fast is not None
    assert fast(Context()) is None  # root: ALWAYS_ON decides, through the SDK
    assert fast(_remote(True)) is None  # sampled parent: recorded, through the SDK
    _same_as_sdk(tracer, _remote(False))  # keeps the parent's trace id and tracestate


def test_ratio_roots_are_decided_once_from_the_trace_id() -> None:
    """ParentBased(TraceIdRatioBased): the fast path drops what the ratio drops; a root
    it samples goes through the SDK with the same trace id, so the rate stays the rate
    (not its square) and every trace is decided once."""
    import random

    assert drop_fast_path(_tracer(TraceIdRatioBased(0.5))) is None  # not ParentBased
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.25)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("fastprof")
    fast = drop_fast_path(tracer)
    assert fast is not None
    assert exporter.get_finished_spans() == ()  # the start-up probe records nothing
    assert type(provider.id_generator).__name__ == "RandomIdGenerator"  # only fastprof's tracer
    bound = 1 << 62  # 0.25 * 2**64
    random.seed(11)
    sampled: list[int] = []
    for _ in range(4000):
        span = fast(Context())
        if span is None:
            span = tracer.start_span("GET", context=Context(), kind=SpanKind.SERVER)
            assert span.is_recording()
            sampled.append(span.get_span_context().trace_id)
            span.end()
        else:
            ctx = span.get_span_context()
            assert type(span) is NonRecordingSpan and ctx.is_valid and not ctx.trace_flags.sampled
            assert ctx.trace_id & ((1 << 64) - 1) >= bound
    assert 850 < len(sampled) < 1150  # 25% of 4000
    finished = [s.context.trace_id for s in exporter.get_finished_spans()]  # type: ignore[union-attr]
    assert finished == sampled
    assert all(t & ((1 << 64) - 1) < bound for t in finished)
    # The seed is used once: a root started without the fast path gets a fresh id.
    assert tracer.start_span("x").get_span_context().trace_id not in sampled
    # Remote parents keep their branches: unsampled dropped here, sampled through the SDK.
    _same_as_sdk(tracer, _remote(False))
    assert fast(_remote(True)) is None


def test_unknown_samplers_and_tracers_have_no_fast_path() -> None:
    class Custom(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            return SamplingResult(Decision.DROP)

        def get_description(self) -> str:
            return "custom"

    class CustomParentBased(ParentBased):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            return SamplingResult(Decision.RECORD_AND_SAMPLE)

    assert drop_fast_path(_tracer(Custom())) is None
    assert drop_fast_path(_tracer(CustomParentBased(ALWAYS_OFF))) is None
    assert drop_fast_path(_tracer(ALWAYS_ON)) is None
    assert drop_fast_path(trace.ProxyTracer("x")) is None
    assert drop_fast_path(object()) is None


class _CountingRoot(Sampler):
    """A root sampler that samples every other root and counts its decisions."""

    def __init__(self) -> None:
        self.calls = 0

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Any] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        self.calls += 1
        decision = Decision.RECORD_AND_SAMPLE if self.calls % 2 else Decision.DROP
        return SamplingResult(decision)

    def get_description(self) -> str:
        return "counting"


def _app(provider: TracerProvider, seen: list[SpanContext], **options: Any) -> Starlette:
    async def endpoint(request: Request) -> Response:
        seen.append(trace.get_current_span().get_span_context())
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    fastprof.instrument(app, tracer_provider=provider, **options)
    return app


async def _get(app: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/", headers=headers)


async def test_each_request_is_sampled_once_and_unsampled_parents_propagate() -> None:
    root = _CountingRoot()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(root))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[SpanContext] = []
    app = _app(provider, seen)

    for _ in range(4):
        assert (await _get(app)).text == "ok"
    assert root.calls == 4  # one decision per root request, none made twice
    assert len(exporter.get_finished_spans()) == 2  # every other root sampled

    unsampled = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"
    response = await _get(app, {"traceparent": unsampled, "tracestate": "vendor=v1"})
    assert response.text == "ok"
    assert root.calls == 4  # the parent's decision: the root sampler isn't asked
    ctx = seen[-1]
    assert (ctx.trace_id, ctx.trace_flags.sampled) == (TRACE_ID, False)
    assert ctx.span_id != PARENT_ID and not ctx.is_remote
    assert ctx.trace_state.get("vendor") == "v1"
    assert len(exporter.get_finished_spans()) == 2


class _Recorder(fastprof.RequestHooks):
    def __init__(self, unsampled: bool) -> None:
        self.unsampled_requests = unsampled
        self.calls: list[tuple[str, bool]] = []

    def on_request_start(self, state: Any, scope: Any) -> None:
        self.calls.append(("start", state.span.is_recording()))

    def on_response_start(self, state: Any, message: Any) -> None:
        self.calls.append(("response", state.span.is_recording()))

    def on_request_end(self, state: Any) -> None:
        self.calls.append(("end", state.span.is_recording()))

    def on_app_exit(self, state: Any) -> None:
        self.calls.append(("exit", state.span.is_recording()))


@pytest.mark.parametrize("sampled", [True, False])
async def test_hooks_opting_out_of_unsampled_requests_are_skipped(sampled: bool) -> None:
    provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    opted_out, default = _Recorder(False), _Recorder(True)
    seen: list[SpanContext] = []
    app = _app(provider, seen, hooks=[opted_out, default])
    assert (await _get(app)).text == "ok"
    # on_app_exit: the span fastprof owns has ended by then.
    expected = [("start", sampled), ("response", sampled), ("end", sampled), ("exit", False)]
    assert default.calls == expected
    assert opted_out.calls == (expected if sampled else [])


async def test_lean_unsampled_request_keeps_request_state() -> None:
    """Without any hook, an unsampled request still publishes its state and context."""
    states: list[Any] = []

    async def endpoint(request: Request) -> Response:
        state = fastprof.current_request.get()
        states.append((state, trace.get_current_span()))
        return PlainTextResponse(state.request_id if state else "none")

    provider = TracerProvider(sampler=ALWAYS_OFF)
    app = Starlette(routes=[Route("/r/{x}", endpoint)])
    fastprof.instrument(app, tracer_provider=provider, dependencies=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        given = await client.get("/r/1", headers={"x-request-id": "abc-123"})
        generated = await client.get("/r/2", headers={"x-request-id": "bad id!"})
    assert given.text == "abc-123"
    assert len(generated.text) == 16 and generated.text != "bad id!"
    (state, span), _ = states
    assert state.route == "/r/{x}" and state.span is span and not span.is_recording()
    assert fastprof.current_request.get() is None  # reset after the request


async def test_disabled_components_are_never_called_and_keep_the_lean_path() -> None:
    """A hook with ``enabled = False`` (e.g. profiling without a trigger) costs nothing."""
    received: list[tuple[object, object]] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        received.append((receive, send))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    class Off(_Recorder):
        enabled = False

    off = Off(True)
    profiling = fastprof.Profiling(secret="s" * 32, header=None)  # no trigger at all
    assert not profiling.enabled
    for sampled in (True, False):
        provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
        app = fastprof.FastprofMiddleware(raw_app, tracer_provider=provider, hooks=[off, profiling])
        scope = {"type": "http", "method": "GET", "path": "/", "headers": []}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            pass

        await app(scope, receive, send)
        if not sampled:  # the lean path: the app gets the server's own callables
            assert received[-1][0] is receive and received[-1][1] is send
        assert fastprof._context.SCOPE_KEY not in scope
    assert off.calls == []


async def test_never_triggered_profiling_keeps_unsampled_requests_lean() -> None:
    """Profiling with a secret but no token in the request: the unsampled request takes the
    lean path (the app gets the server's own callables); with a token it is profiled."""
    received: list[tuple[object, object]] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        received.append((receive, send))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    secret = "s" * 32
    profiling = fastprof.Profiling(secret=secret)
    provider = TracerProvider(sampler=ALWAYS_OFF)
    deps = fastprof.DependencySpans(tracer_provider=provider, profiled_requests=True)
    app = fastprof.FastprofMiddleware(raw_app, tracer_provider=provider, hooks=[profiling, deps])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    plain = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await app(plain, receive, send)
    assert received[-1][0] is receive and received[-1][1] is send
    token = fastprof.profiling.mint_token(secret).encode()
    headers = [(b"x-fastprof-profile", token)]
    profiled = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    await app(profiled, receive, send)
    assert received[-1][1] is not send  # the full path: profiling's hooks ran
    response_headers = dict(sent[-2]["headers"])
    assert b"x-fastprof-profile-id" in response_headers
    assert profiling.flush(10)


async def test_loop_monitor_keeps_unsampled_requests_lean() -> None:
    """The loop monitor finds a blocking request on the stack: once it monitors the loop
    (started at lifespan or by the first request), unsampled requests take the lean path."""
    received: list[tuple[object, object]] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        received.append((receive, send))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    monitor = fastprof.LoopMonitor(threshold_s=0.5)
    provider = TracerProvider(sampler=ALWAYS_OFF)
    app = fastprof.FastprofMiddleware(raw_app, tracer_provider=provider, hooks=[monitor])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    try:
        for _ in range(2):
            await app({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
        assert monitor.running  # started by the first request (no lifespan here)
        assert received[0][1] is not send  # the first one ran the monitor's hooks
        assert received[1][0] is receive and received[1][1] is send  # then: lean
    finally:
        monitor.stop()


async def test_profiling_hooks_skip_unsampled_requests_without_a_token() -> None:
    """Another component wants every unsampled request (the slow-request log): profiling's
    hooks still run only for the ones it could profile (those with a token)."""
    starts: list[str | None] = []

    class Counted(fastprof.Profiling):
        def on_request_start(self, state: fastprof.RequestState, scope: Any) -> None:
            super().on_request_start(state, scope)
            starts.append(state.profile_id)

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    secret = "s" * 32
    profiling = Counted(secret=secret)
    slow = fastprof.SlowRequestLog(threshold_s=10.0)
    provider = TracerProvider(sampler=ALWAYS_OFF)
    app = fastprof.FastprofMiddleware(raw_app, tracer_provider=provider, hooks=[profiling, slow])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
    assert starts == []  # no token: profiling's phases did not run at all
    token = fastprof.profiling.mint_token(secret).encode()
    headers = [(b"x-fastprof-profile", token)]
    await app({"type": "http", "method": "GET", "path": "/", "headers": headers}, receive, send)
    assert len(starts) == 1 and starts[0] is not None  # with one: profiled
    assert profiling.flush(10)


async def test_hooks_told_only_of_slow_unsampled_requests_keep_them_lean() -> None:
    """A hook with ``unsampled_end_threshold_s`` (the slow-request log's ``"traced"``
    default): an unsampled request keeps the lean path but for one ``send`` wrapper (the
    server's own ``receive``), no other phase of the hook runs, and its
    ``on_request_end`` is called only for a request that took the threshold or longer,
    measured to the response's last message (work after it is not counted), with the
    status and route known; a failure is told too and propagates untouched."""
    import asyncio

    class Watcher(fastprof.RequestHooks):
        unsampled_end_threshold_s = 0.05

        def __init__(self) -> None:
            self.ends: list[tuple[str, int | None, float, str | None]] = []
            self.others: list[str] = []

        def on_request_start(self, state: Any, scope: Any) -> None:
            self.others.append("start")

        def on_response_start(self, state: Any, message: Any) -> None:
            self.others.append("response")

        def on_app_exit(self, state: Any) -> None:
            self.others.append("exit")

        def on_request_end(self, state: Any) -> None:
            self.ends.append((state.path, state.status_code, state.elapsed_s(), state.route))

    received: list[tuple[object, object]] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        received.append((receive, send))
        path = scope["path"]
        if path == "/slow":
            await asyncio.sleep(0.08)
        if path == "/fails":
            await asyncio.sleep(0.06)
            raise LookupError("the app's own")
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        if path == "/after":
            await asyncio.sleep(0.08)  # a background task: after the last message

    watcher = Watcher()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    app = fastprof.FastprofMiddleware(raw_app, tracer_provider=provider, hooks=[watcher])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for path in ("/fast", "/slow", "/after"):
        await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
        assert received[-1][0] is receive and received[-1][1] is not send
    with pytest.raises(LookupError, match="the app's own"):
        await app({"type": "http", "method": "GET", "path": "/fails", "headers": []}, receive, send)
    assert len(sent) == 9 and [m.get("body") for m in sent[1:3]] == [b"a", b"b"]
    assert watcher.others == []
    (slow, status, duration, route), (failed, no_status, failed_after, _) = watcher.ends
    assert (slow, status, route) == ("/slow", 201, None)  # a raw app: no route template
    assert 0.08 <= duration < 0.5
    assert (failed, no_status) == ("/fails", None) and failed_after >= 0.06


async def test_slow_watchers_see_every_phase_when_another_hook_wants_the_request() -> None:
    """When another hook wants the unsampled request, every phase runs as before (the
    watcher's ``on_request_end`` included), and a failing watcher is reported, not raised."""

    class Watcher(fastprof.RequestHooks):
        unsampled_end_threshold_s = 0.0

        def __init__(self) -> None:
            self.calls: list[str] = []

        def on_request_start(self, state: Any, scope: Any) -> None:
            self.calls.append("start")

        def on_request_end(self, state: Any) -> None:
            self.calls.append("end")
            raise RuntimeError("the watcher's own bug")

    watcher, everything = Watcher(), _Recorder(True)
    seen: list[SpanContext] = []
    app = _app(TracerProvider(sampler=ALWAYS_OFF), seen, hooks=[watcher, everything])
    assert (await _get(app)).text == "ok"
    assert watcher.calls == ["start", "end"]
    assert [c[0] for c in everything.calls] == ["start", "response", "end", "exit"]

    alone = Watcher()
    app = _app(TracerProvider(sampler=ALWAYS_OFF), seen, hooks=[alone])
    assert (await _get(app)).text == "ok"  # the watcher's failure stays inside fastprof
    assert alone.calls == ["end"]


async def test_following_hooks_are_not_asked_and_run_when_another_hook_wants_the_request() -> None:
    """``follows_unsampled`` (dependency timings for profiled requests): the hook's
    ``wants_unsampled`` is never asked; it runs for the unsampled requests another hook
    wants, and a request nobody wants stays lean."""

    class Follower(_Recorder):
        follows_unsampled = True

        def wants_unsampled(self, scope: Any) -> bool:
            raise AssertionError("a following hook is not asked")

    class Gate(_Recorder):
        def wants_unsampled(self, scope: Any) -> bool:
            return any(k == b"x-want" for k, _ in scope["headers"])

    follower, gate = Follower(True), Gate(True)
    seen: list[SpanContext] = []
    app = _app(TracerProvider(sampler=ALWAYS_OFF), seen, hooks=[follower, gate])
    assert (await _get(app)).text == "ok"
    assert follower.calls == gate.calls == []
    assert (await _get(app, {"x-want": "1"})).text == "ok"
    assert [c[0] for c in follower.calls] == ["start", "response", "end", "exit"]


async def test_each_slow_watcher_is_told_only_past_its_own_threshold() -> None:
    """Two hooks told of slow unsampled requests, with different thresholds: a request
    between the two reaches the shorter one only; one past both reaches both."""
    import asyncio

    class Watcher(fastprof.RequestHooks):
        def __init__(self, threshold_s: float) -> None:
            self.unsampled_end_threshold_s = threshold_s
            self.paths: list[str] = []

        def on_request_end(self, state: Any) -> None:
            self.paths.append(state.path)

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep({"/fast": 0.0, "/middle": 0.06, "/slow": 0.25}[scope["path"]])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    short, long = Watcher(0.05), Watcher(0.2)
    provider = TracerProvider(sampler=ALWAYS_OFF)
    app = fastprof.FastprofMiddleware(raw_app, tracer_provider=provider, hooks=[long, short])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    for path in ("/fast", "/middle", "/slow"):
        await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    assert short.paths == ["/middle", "/slow"]
    assert long.paths == ["/slow"]
