"""Exactly one SERVER span per request, whoever else instruments the app."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import fastprof
from fastprof.testing import SpanRecorder as Spans

pytestmark = pytest.mark.anyio

HAS_NATIVE = "telemetry" in FastAPI.__init__.__code__.co_varnames
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="FastAPI < 0.142 has no native telemetry")


def make_app(native_provider: Any = None) -> FastAPI:
    kwargs: dict[str, Any] = {}
    if HAS_NATIVE:
        kwargs["telemetry"] = (
            {"tracer_provider": native_provider} if native_provider else {"tracing": False}
        )
    app = FastAPI(**kwargs)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/boom")
    async def boom() -> None:
        raise ValueError("boom")

    return app


async def hit(app: Any, path: str = "/items/1") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(path)


def assert_one_server_span(spans: Spans, scope_name: str) -> Any:
    servers = spans.server()
    assert len(servers) == 1, [(s.name, s.instrumentation_scope) for s in servers]
    (span,) = servers
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == scope_name
    assert span.attributes is not None
    assert "fastprof.request_id" in span.attributes
    return span


async def test_fastprof_alone_owns_the_span(spans: Spans) -> None:
    app = fastprof.instrument(make_app(), tracer_provider=spans.provider)
    await hit(app)
    span = assert_one_server_span(spans, "fastprof")
    assert span.name == "GET /items/{item_id}"


async def test_plain_starlette(spans: Spans) -> None:
    app = Starlette(routes=[Route("/x/{y}", lambda r: PlainTextResponse("x"))])
    fastprof.instrument(app, tracer_provider=spans.provider)
    await hit(app, "/x/1")
    span = assert_one_server_span(spans, "fastprof")
    assert span.name == "GET /x/{y}"


@needs_native
async def test_fastapi_native_telemetry_owns_and_fastprof_enriches(spans: Spans) -> None:
    app = fastprof.instrument(make_app(spans.provider), tracer_provider=spans.provider)
    await hit(app)
    span = assert_one_server_span(spans, "fastapi")
    assert span.name == "GET /items/{item_id}"
    assert "fastprof.time_to_response_start_s" in span.attributes
    # FastAPI's own operation spans still nest under its request span.
    endpoint = spans.named("fastapi.endpoint")
    assert endpoint and endpoint[0].parent.span_id == span.context.span_id


@needs_native
async def test_native_error_still_one_span(spans: Spans) -> None:
    app = fastprof.instrument(make_app(spans.provider), tracer_provider=spans.provider)
    assert (await hit(app, "/boom")).status_code == 500
    span = assert_one_server_span(spans, "fastapi")
    assert span.attributes["error.type"] == "ValueError"


@pytest.mark.parametrize("order", ["fastprof-first", "contrib-first"])
async def test_otel_contrib_owns_and_fastprof_enriches(spans: Spans, order: str) -> None:
    app = make_app()
    if order == "fastprof-first":
        fastprof.instrument(app, tracer_provider=spans.provider)
        FastAPIInstrumentor.instrument_app(app, tracer_provider=spans.provider)
    else:
        FastAPIInstrumentor.instrument_app(app, tracer_provider=spans.provider)
        fastprof.instrument(app, tracer_provider=spans.provider)
    try:
        await hit(app)
        span = assert_one_server_span(spans, "opentelemetry.instrumentation.fastapi")
        assert span.name == "GET /items/{item_id}"
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


@needs_native
async def test_native_and_contrib_and_fastprof(spans: Spans) -> None:
    app = make_app(spans.provider)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=spans.provider)
    fastprof.instrument(app, tracer_provider=spans.provider)
    try:
        await hit(app)
        assert_one_server_span(spans, "opentelemetry.instrumentation.fastapi")
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


GLOBAL_PROVIDER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, httpx
    from fastapi import FastAPI
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import fastprof

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        return {"item_id": item_id}

    fastprof.instrument(app)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/items/1")

    asyncio.run(main())
    print(json.dumps([
        [s.name, s.kind.name, s.instrumentation_scope.name]
        for s in exporter.get_finished_spans()
    ]))
    """
)


def test_default_setup_with_global_provider_has_one_server_span() -> None:
    """The common production setup: a global provider, FastAPI defaults, instrument(app)."""
    out = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    import json

    spans = json.loads(out.strip().splitlines()[-1])
    servers = [s for s in spans if s[1] == SpanKind.SERVER.name]
    assert len(servers) == 1, spans
    assert servers[0][0] == "GET /items/{item_id}"


@needs_native
async def test_hooks_can_annotate_a_foreign_span_before_it_ends(spans: Spans) -> None:
    """FastAPI native ends its span as the last message passes; hooks run before that."""

    class Tagger(fastprof.RequestHooks):
        def on_request_end(self, state: Any) -> None:
            state.span.set_attribute("test.tagged", state.span.is_recording())

    app = fastprof.instrument(
        make_app(spans.provider), tracer_provider=spans.provider, hooks=[Tagger()]
    )
    await hit(app)
    span = assert_one_server_span(spans, "fastapi")
    assert span.attributes["test.tagged"] is True


@needs_native
async def test_request_excluded_by_native_telemetry_is_left_alone(spans: Spans) -> None:
    """Native telemetry's ``exclude`` excludes the request from fastprof too, and an
    in-process request it excludes keeps the outer request's span as the current one."""
    def excluded(scope: Any) -> bool:
        return bool(scope["path"] == "/inner")

    app = FastAPI(telemetry={"tracer_provider": spans.provider, "exclude": excluded})
    tracer = spans.provider.get_tracer("app")

    @app.get("/inner")
    async def inner() -> str:
        with tracer.start_as_current_span("inner work"):
            return "inner"

    @app.get("/outer")
    async def outer() -> str:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client:
            return (await client.get("/inner")).json()  # type: ignore[no-any-return]

    fastprof.instrument(app, tracer_provider=spans.provider)
    response = await hit(app, "/outer")
    assert response.json() == "inner"
    server = assert_one_server_span(spans, "fastapi")  # the outer request only
    assert server.name == "GET /outer"
    (work,) = spans.named("inner work")
    (endpoint,) = spans.named("fastapi.endpoint")
    assert work.parent is not None and work.parent.span_id == endpoint.context.span_id
    assert work.context.trace_id == server.context.trace_id
    # Top-level: an excluded request gets no span from fastprof either.
    spans.clear()
    assert (await hit(app, "/inner")).json() == "inner"
    assert spans.server() == []
