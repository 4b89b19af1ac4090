"""The SERVER span: naming, semantic-convention attributes, propagation, errors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Host, Mount, Route

import fastprof
from fastprof import _internal_errors
from fastprof.testing import SpanRecorder as Spans
from tests._transparency import drive_http

pytestmark = pytest.mark.anyio

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def native_off() -> dict[str, Any]:
    if "telemetry" in FastAPI.__init__.__code__.co_varnames:
        return {"telemetry": {"tracing": False}}
    return {}


def build_app(spans: Spans, **options: Any) -> FastAPI:
    app = FastAPI(**native_off())
    router = APIRouter(prefix="/api")

    @router.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    app.include_router(router)

    @app.get("/boom")
    async def boom() -> None:
        raise ValueError("boom")

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(status_code=418)

    @app.get("/unavailable")
    async def unavailable() -> Response:
        return PlainTextResponse("no", status_code=503)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            for _ in range(3):
                await asyncio.sleep(0.02)
                yield b"x"

        return StreamingResponse(gen())

    sub = FastAPI(**native_off())

    @sub.get("/deep/{name}")
    def deep(name: str) -> str:
        return name

    app.mount("/sub", sub)
    app.mount("/plain", Starlette(routes=[Route("/p/{x}", lambda r: PlainTextResponse("p"))]))
    fastprof.instrument(app, tracer_provider=spans.provider, **options)
    return app


async def get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(path, **kwargs)


async def test_span_named_after_route_template_with_semconv_attributes(spans: Spans) -> None:
    app = build_app(spans)
    response = await get(app, "/api/items/42?x=1&token=s3cret", headers={"user-agent": "probe/1.0"})
    assert response.status_code == 200
    (span,) = spans.server()
    assert span.name == "GET /api/items/{item_id}"
    assert span.kind == SpanKind.SERVER
    attrs = dict(span.attributes or {})
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.route"] == "/api/items/{item_id}"
    assert attrs["url.path"] == "/api/items/42"
    assert attrs["url.scheme"] == "http"
    assert attrs["url.query"] == "x=1&token=REDACTED"
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == "testserver"
    assert attrs["server.port"] == 80
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["user_agent.original"] == "probe/1.0"
    assert attrs["network.protocol.version"] == "1.1"
    assert re.fullmatch(r"[0-9a-f]{16}", str(attrs["fastprof.request_id"]))
    assert 0 <= float(attrs["fastprof.time_to_response_start_s"]) < 5  # type: ignore[arg-type]
    assert span.status.status_code == StatusCode.UNSET
    assert "s3cret" not in str(attrs)


async def test_profiling_tokens_and_configured_keys_are_redacted_from_url_query(
    spans: Spans,
) -> None:
    """A dev-mode profiling token (default or custom parameter name) is a credential."""
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    profiling = fastprof.Profiling(secret="s" * 32, dev_mode=True, query_param="pt")
    fastprof.instrument(app, tracer_provider=spans.provider, profiling=profiling)
    assert (await get(app, "/?pt=tok1&fastprof_profile=tok2&a=1")).status_code == 200
    plain = fastprof.FastprofMiddleware(
        Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))]),
        tracer_provider=spans.provider,
        redact_query_keys=["Session_Key"],
    )
    assert (await get(plain, "/?session_key=tok3&b=2")).status_code == 200
    first, second = (dict(s.attributes or {}) for s in spans.server())
    assert first["url.query"] == "pt=REDACTED&fastprof_profile=REDACTED&a=1"
    assert second["url.query"] == "session_key=REDACTED&b=2"
    with pytest.raises(ValueError, match="redact_query_keys"):
        fastprof.FastprofMiddleware(plain, redact_query_keys="token")


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/sub/deep/x", "/sub/deep/{name}"),
        ("/plain/p/1", "/plain/p/{x}"),
    ],
)
async def test_route_template_through_mounts(spans: Spans, path: str, route: str) -> None:
    app = build_app(spans)
    assert (await get(app, path)).status_code == 200
    (span,) = spans.server()
    assert span.attributes is not None
    assert span.attributes["http.route"] == route
    assert span.name == f"GET {route}"


async def test_unmatched_route_named_after_method_only(spans: Spans) -> None:
    app = build_app(spans)
    assert (await get(app, "/no/such/thing")).status_code == 404
    (span,) = spans.server()
    assert span.name == "GET"
    assert span.attributes is not None
    assert "http.route" not in span.attributes
    assert span.status.status_code == StatusCode.UNSET


async def test_starlette_host_and_mount_routes(spans: Spans) -> None:
    inner = Starlette(routes=[Route("/users/{uid}", lambda r: PlainTextResponse("u"))])
    app = Starlette(
        routes=[
            Host("api.example.com", app=Starlette(routes=[Mount("/v1", app=inner)])),
            Route("/", lambda r: PlainTextResponse("root")),
        ]
    )
    fastprof.instrument(app, tracer_provider=spans.provider)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.example.com") as c:
        assert (await c.get("/v1/users/7")).status_code == 200
    (span,) = spans.server()
    assert span.name == "GET /v1/users/{uid}"


async def test_incoming_traceparent_is_the_parent(spans: Spans) -> None:
    app = build_app(spans)
    await get(app, "/api/items/1", headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    (span,) = spans.server()
    assert span.parent is not None
    assert span.parent.is_remote
    assert format(span.context.trace_id, "032x") == TRACE_ID  # type: ignore[union-attr]
    assert format(span.parent.span_id, "016x") == PARENT_ID


MALFORMED_TRACEPARENTS = [
    "garbage",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    TRACEPARENT + "," + TRACEPARENT,
    "00-" + "a" * 9000,
    "",
]


@pytest.mark.parametrize("value", MALFORMED_TRACEPARENTS)
async def test_malformed_traceparent_starts_a_new_root(spans: Spans, value: str) -> None:
    app = build_app(spans)
    response = await get(app, "/api/items/1", headers={"traceparent": value})
    assert response.status_code == 200
    (span,) = spans.server()
    assert span.parent is None
    assert _internal_errors.counts() == {}


async def test_oversized_and_non_utf8_headers_never_fail(spans: Spans) -> None:
    app = build_app(spans)
    headers = [
        (b"host", b"testserver"),
        (b"traceparent", TRACEPARENT.encode()),
        (b"tracestate", b"k=" + b"v" * 70000),
        (b"baggage", b"a=" + b"b" * 70000),
        (b"user-agent", b"\xff\xfe bot " + b"u" * 10000),
        (b"x-request-id", b"\xe9\xe9"),
        (b"x-custom", b"\xe9"),
    ]
    rec = await drive_http(app, "GET", "/api/items/1", headers=headers)
    assert rec.sent[0]["status"] == 200
    (span,) = spans.server()
    assert span.attributes is not None
    assert len(str(span.attributes["user_agent.original"])) <= 2048
    assert span.parent is not None  # traceparent kept though tracestate was dropped
    assert _internal_errors.counts() == {}


async def test_incoming_request_id_is_reused_when_valid(spans: Spans) -> None:
    app = build_app(spans)
    await get(app, "/api/items/1", headers={"x-request-id": "req-123.abc"})
    await get(app, "/api/items/1", headers={"x-request-id": "bad id with spaces"})
    await get(app, "/api/items/1", headers={"x-request-id": "x" * 129})
    ids = [s.attributes["fastprof.request_id"] for s in spans.server()]  # type: ignore[index]
    assert ids[0] == "req-123.abc"
    assert ids[1] != "bad id with spaces" and re.fullmatch(r"[0-9a-f]{16}", str(ids[1]))
    assert re.fullmatch(r"[0-9a-f]{16}", str(ids[2]))


async def test_response_unchanged_unless_request_id_header_configured(spans: Spans) -> None:
    plain = await get(build_app(spans), "/api/items/1")
    assert "x-request-id" not in plain.headers
    app = build_app(spans, response_request_id_header="X-Request-ID")
    echoed = await get(app, "/api/items/1", headers={"x-request-id": "abc"})
    assert echoed.headers["x-request-id"] == "abc"


async def test_unhandled_exception_recorded_with_error_status(spans: Spans) -> None:
    app = build_app(spans)
    assert (await get(app, "/boom")).status_code == 500
    (span,) = spans.server()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "ValueError"
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["http.route"] == "/boom"
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "boom"


async def test_5xx_response_is_error_4xx_is_not(spans: Spans) -> None:
    app = build_app(spans)
    await get(app, "/unavailable")
    await get(app, "/teapot")
    unavailable, teapot = spans.server()
    assert unavailable.status.status_code == StatusCode.ERROR
    assert unavailable.attributes is not None
    assert unavailable.attributes["error.type"] == "503"
    assert teapot.status.status_code == StatusCode.UNSET
    assert teapot.attributes is not None
    assert "error.type" not in teapot.attributes


async def test_streaming_span_ends_after_last_chunk(spans: Spans) -> None:
    app = build_app(spans)
    response = await get(app, "/stream")
    assert response.content == b"xxx"
    (span,) = spans.server()
    assert span.end_time is not None and span.start_time is not None
    duration = (span.end_time - span.start_time) / 1e9
    assert span.attributes is not None
    ttfb = float(span.attributes["fastprof.time_to_response_start_s"])  # type: ignore[arg-type]
    assert duration >= 0.05  # three 20 ms chunks
    assert ttfb < duration


async def test_unknown_method_is_other(spans: Spans) -> None:
    app = build_app(spans)
    await drive_http(app, "FOO" * 400, "/api/items/1")
    (span,) = spans.server()
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "_OTHER"
    assert len(str(span.attributes["http.request.method_original"])) <= 64
    assert span.name.startswith("HTTP")


@pytest.mark.parametrize(
    "exclude",
    [["/api/items/1"], r"^/api/", re.compile("items"), lambda scope: "items" in scope["path"]],
    ids=["list", "regex-str", "pattern", "callable"],
)
async def test_excluded_paths_produce_no_span(spans: Spans, exclude: Any) -> None:
    app = build_app(spans, exclude=exclude)
    assert (await get(app, "/api/items/1")).status_code == 200
    assert spans.server() == []
    await get(app, "/boom")
    assert len(spans.server()) == 1


async def test_exclude_callable_that_raises_is_contained(spans: Spans) -> None:
    def broken(scope: Any) -> bool:
        raise RuntimeError("bug in user code")

    app = build_app(spans, exclude=broken)
    assert (await get(app, "/api/items/1")).status_code == 200
    assert len(spans.server()) == 1
    assert _internal_errors.counts() == {"exclude": 1}


async def test_client_disconnect_ends_span_once(spans: Spans) -> None:
    async def lost(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "http.request"
        message = await receive()  # the client went away
        assert message["type"] == "http.disconnect"

    app = Starlette(routes=[Mount("/lost", app=lost)])
    fastprof.instrument(app, tracer_provider=spans.provider)
    rec = await drive_http(app, "GET", "/lost/", hang_up=True)
    assert rec.sent == [] and rec.exception is None
    (span,) = spans.server()
    assert span.attributes is not None
    assert span.attributes["fastprof.client_disconnected"] is True
    assert "error.type" not in span.attributes


async def test_disconnect_after_a_complete_response_is_not_a_lost_client(spans: Spans) -> None:
    async def done_then_wait(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        assert (await receive())["type"] == "http.disconnect"  # the normal end

    app = fastprof.FastprofMiddleware(done_then_wait, tracer_provider=spans.provider)
    messages = iter([{"type": "http.request", "body": b""}, {"type": "http.disconnect"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        pass

    await app({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
    (span,) = spans.server()
    assert span.attributes is not None
    assert "fastprof.client_disconnected" not in span.attributes
    assert span.attributes["http.response.status_code"] == 200


async def test_no_response_at_all_is_an_error(spans: Spans) -> None:
    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None

    app = Starlette(routes=[Mount("/silent", app=silent)])
    fastprof.instrument(app, tracer_provider=spans.provider)
    await drive_http(app, "GET", "/silent/")
    (span,) = spans.server()
    assert span.attributes is not None
    assert span.attributes["error.type"] == "incomplete_response"


async def test_internal_failure_is_contained_and_reported(
    spans: Spans, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fastprof.middleware._request as server_span

    def explode(*args: Any) -> None:
        raise RuntimeError("fastprof bug")

    app = build_app(spans)
    bare = await drive_http(build_app(spans), "GET", "/api/items/1")
    monkeypatch.setattr(server_span, "resolve_route", explode)
    rec = await drive_http(app, "GET", "/api/items/1")
    assert rec.sent == bare.sent
    assert _internal_errors.counts() == {"request_end": 1}
    monkeypatch.setattr(server_span, "extract_context", explode)
    rec = await drive_http(app, "GET", "/api/items/1")
    assert rec.sent == bare.sent
    assert _internal_errors.counts()["request_start"] == 1


async def test_hook_failures_are_contained(spans: Spans) -> None:
    class Broken(fastprof.RequestHooks):
        def on_request_start(self, state: Any, scope: Any) -> None:
            raise RuntimeError("start")

        def on_response_start(self, state: Any, message: Any) -> None:
            raise RuntimeError("response")

        def on_request_end(self, state: Any) -> None:
            raise RuntimeError("end")

        def on_app_exit(self, state: Any) -> None:
            raise RuntimeError("exit")

    app = build_app(spans, hooks=[Broken()])
    assert (await get(app, "/api/items/1")).json() == {"item_id": 1}
    assert _internal_errors.counts() == {
        "hook.on_request_start": 1,
        "hook.on_response_start": 1,
        "hook.on_request_end": 1,
        "hook.on_app_exit": 1,
    }


async def test_request_state_is_visible_to_the_app_and_reset_after(spans: Spans) -> None:
    seen: list[Any] = []

    async def endpoint(request: Request) -> Response:
        state = fastprof.current_request.get()
        seen.append((state, request.scope.get("fastprof.request")))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    fastprof.instrument(app, tracer_provider=spans.provider)
    await get(app, "/")
    ((state, scoped),) = seen
    assert state is scoped and state is not None
    assert state.route == "/" and state.status_code == 200
    assert fastprof.current_request.get() is None


async def test_instrument_twice_is_idempotent(spans: Spans) -> None:
    app = build_app(spans)
    fastprof.instrument(app, tracer_provider=spans.provider)
    await get(app, "/api/items/1")
    assert len(spans.server()) == 1


async def test_middleware_added_twice_still_one_span(spans: Spans) -> None:
    app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))])
    app.add_middleware(fastprof.FastprofMiddleware, tracer_provider=spans.provider)
    app.add_middleware(fastprof.FastprofMiddleware, tracer_provider=spans.provider)
    await get(app, "/")
    assert len(spans.server()) == 1


async def test_wrapping_any_asgi_app(spans: Spans) -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"raw"})

    app = fastprof.FastprofMiddleware(raw, tracer_provider=spans.provider)
    rec = await drive_http(app, "GET", "/anything")
    assert rec.sent[1]["body"] == b"raw"
    (span,) = spans.server()
    assert span.name == "GET"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"exclude": 42}, "exclude"),
        ({"exclude": "("}, "exclude"),
        ({"exclude": ["no-slash"]}, "exclude"),
        ({"query": "everything"}, "query"),
        ({"max_attribute_length": 3}, "max_attribute_length"),
        ({"request_id_header": "bad header!"}, "request_id_header"),
        ({"response_request_id_header": ""}, "response_request_id_header"),
        ({"tracer_provider": object()}, "tracer_provider"),
        ({"hooks": [object()]}, "hooks"),
    ],
)
def test_bad_configuration_fails_at_startup(options: dict[str, Any], message: str) -> None:
    app = Starlette()
    with pytest.raises(ValueError, match=message):
        fastprof.instrument(app, **options)


def test_instrument_rejects_non_starlette_apps() -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(ValueError, match="FastprofMiddleware"):
        fastprof.instrument(raw)  # type: ignore[type-var]


async def test_unsampled_requests_record_nothing_but_propagate(spans: Spans) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    seen: list[Any] = []

    async def endpoint(request: Request) -> Response:
        seen.append(trace.get_current_span().get_span_context())
        return PlainTextResponse("ok")

    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Starlette(routes=[Route("/", endpoint)])
    fastprof.instrument(app, tracer_provider=provider)
    await get(app, "/", headers={"traceparent": TRACEPARENT.replace("-01", "-00")})
    (ctx,) = seen
    assert format(ctx.trace_id, "032x") == TRACE_ID
    assert format(ctx.span_id, "016x") != PARENT_ID  # a span of its own, not the caller's
    assert not ctx.trace_flags.sampled
    assert exporter.get_finished_spans() == ()


async def test_hooks_run_in_order_with_span_state(spans: Spans) -> None:
    """on_request_end sees the live span; on_app_exit runs after background tasks."""
    calls: list[tuple[str, Any]] = []

    class Recorder(fastprof.RequestHooks):
        def on_request_start(self, state: Any, scope: Any) -> None:
            calls.append(("start", state.span.is_recording()))

        def on_response_start(self, state: Any, message: Any) -> None:
            calls.append(("response_start", message["status"]))

        def on_request_end(self, state: Any) -> None:
            calls.append(("end", state.span.is_recording()))

        def on_app_exit(self, state: Any) -> None:
            calls.append(("exit", state.span.is_recording()))

    from starlette.background import BackgroundTask

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(calls.append, ("bg", None)))

    app = Starlette(routes=[Route("/", endpoint)])
    fastprof.instrument(app, tracer_provider=spans.provider, hooks=[Recorder()])
    await get(app, "/")
    assert calls == [
        ("start", True),
        ("response_start", 200),
        ("end", True),
        ("bg", None),
        ("exit", False),
    ]


@pytest.mark.parametrize("traceparent", [None, "garbage"])
async def test_ambient_context_is_never_the_parent(spans: Spans, traceparent: str | None) -> None:
    """A span leaked into the ambient context (not a SERVER span) is ignored."""
    app = build_app(spans)
    tracer = spans.provider.get_tracer("leak")
    headers = [(b"traceparent", traceparent.encode())] if traceparent else []
    with tracer.start_as_current_span("leaked from another request"):
        await drive_http(app, "GET", "/api/items/1", headers=headers)
    (server,) = spans.server()
    assert server.parent is None
