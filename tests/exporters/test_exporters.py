"""Export: OTLP/HTTP to a real receiver, the console tree, and setup validation."""

from __future__ import annotations

import io
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import fastprof
from fastprof.exporters import SpanTreePrinter, otlp_span_processor, setup_tracing
from tests._otlp_receiver import otlp_receiver, span_attributes

pytestmark = pytest.mark.anyio


def make_app(provider: Any) -> Starlette:
    app = Starlette(routes=[Route("/orders/{oid}", lambda r: PlainTextResponse("ok"))])
    return fastprof.instrument(app, tracer_provider=provider)


async def hit(app: Any, n: int = 1) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for i in range(n):
            assert (await client.get(f"/orders/{i}")).status_code == 200


async def test_otlp_export_reaches_a_real_receiver() -> None:
    with otlp_receiver() as (endpoint, received):
        provider = setup_tracing("orders-api", otlp_endpoint=endpoint, set_global=False)
        await hit(make_app(provider), 3)
        assert provider.force_flush(10_000)
        provider.shutdown()
    got = received.spans()
    assert len(got) == 3
    resource, span = got[0]
    assert resource["service.name"] == "orders-api"
    assert span.kind == ProtoSpan.SPAN_KIND_SERVER
    assert span.name == "GET /orders/{oid}"
    attrs = span_attributes(span)
    assert attrs["http.route"] == "/orders/{oid}"
    assert attrs["http.response.status_code"] == 200


async def test_collector_black_hole_never_blocks_requests() -> None:
    """Spans are queued, not exported on the request path."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepts connections, never answers
    port = listener.getsockname()[1]
    try:
        provider = setup_tracing(
            "svc", otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces", set_global=False
        )
        started = time.monotonic()
        await hit(make_app(provider), 50)
        elapsed = time.monotonic() - started
        # The export timeout is 5 s; a blocking exporter would take >= 5 s per span.
        assert elapsed < 4.0
        done = threading.Thread(target=provider.shutdown, daemon=True)
        done.start()
    finally:
        listener.close()


async def test_console_printer_prints_a_tree() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    out = io.StringIO()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SpanTreePrinter(out)))
    tracer = provider.get_tracer("t")

    async def endpoint(request: Any) -> PlainTextResponse:
        with tracer.start_as_current_span("child work"):
            pass
        return PlainTextResponse("ok")

    app = fastprof.instrument(
        Starlette(routes=[Route("/t/{x}", endpoint)]), tracer_provider=provider
    )
    await hit_path(app, "/t/1")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("GET /t/{x}  ")
    assert lines[1].startswith("  child work  ")


async def hit_path(app: Any, path: str) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await client.get(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint": "not a url"}, "endpoint"),
        ({"endpoint": "ftp://x/v1/traces"}, "endpoint"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_queue_size": 10, "max_export_batch_size": 100}, "max_queue_size"),
    ],
)
def test_otlp_processor_validates_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        otlp_span_processor(**kwargs)


def test_setup_tracing_needs_an_exporter() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint or console"):
        setup_tracing("svc", set_global=False)
    with pytest.raises(ValueError, match="service_name"):
        setup_tracing("", console=True, set_global=False)


def test_console_printer_prints_spans_that_end_after_their_trace() -> None:
    """A yield dependency's teardown can end after the request span: it is still shown."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    out = io.StringIO()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SpanTreePrinter(out)))
    tracer = provider.get_tracer("t")
    root = tracer.start_span("GET /x")
    late = tracer.start_span("teardown get_db", context=trace.set_span_in_context(root))
    root.end()
    late.end()
    text = out.getvalue()
    assert text.startswith("GET /x  ")
    assert "(ended after the request span) teardown get_db  " in text


@pytest.mark.parametrize("how", ["shutdown", "force_flush"])
def test_flush_and_shutdown_are_bounded_when_the_collector_never_answers(how: str) -> None:
    """The SDK's processor took 30 s here (every queued batch waits out the export
    timeout in turn); fastprof's returns within shutdown_timeout_s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepts connections, never answers
    try:
        provider = setup_tracing(
            "svc", otlp_endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces",
            set_global=False,
        )
        tracer = provider.get_tracer("t")
        for _ in range(2000):  # 4 batches of 512: 4 x 5 s export timeouts unbounded
            tracer.start_span("s").end()
        started = time.monotonic()
        if how == "shutdown":
            provider.shutdown()
        else:
            assert provider.force_flush(500) is False
        assert time.monotonic() - started < 4.0
        if how == "force_flush":
            threading.Thread(target=provider.shutdown, daemon=True).start()
    finally:
        listener.close()


def test_otlp_processor_validates_its_new_options() -> None:
    with pytest.raises(ValueError, match="protocol"):
        otlp_span_processor(protocol="http/json")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compression"):
        otlp_span_processor(compression="br")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shutdown_timeout_s"):
        otlp_span_processor(shutdown_timeout_s=0)
