"""Package surface: optional dependencies stay optional, typing marker ships."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import fastprof

STARLETTE_ONLY = textwrap.dedent(
    """
    import sys
    sys.modules["fastapi"] = None  # as if FastAPI were not installed
    import asyncio, httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import fastprof, fastprof.exporters

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = fastprof.instrument(
        Starlette(routes=[Route("/a/{b}", lambda r: PlainTextResponse("ok"))]),
        tracer_provider=provider,
    )

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/a/1")).text == "ok"

    asyncio.run(main())
    print([s.name for s in exporter.get_finished_spans()])
    """
)

NO_OTLP = textwrap.dedent(
    """
    import sys
    sys.modules["opentelemetry.exporter.otlp.proto.http.trace_exporter"] = None
    from fastprof.exporters import otlp_span_processor
    try:
        otlp_span_processor("http://127.0.0.1:4318/v1/traces")
    except ImportError as exc:
        print(exc)
    """
)


def run(script: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_starlette_only_apps_do_not_need_fastapi() -> None:
    assert run(STARLETTE_ONLY).strip() == "['GET /a/{b}']"


def test_missing_otlp_extra_says_what_to_install() -> None:
    assert "pip install 'fastprof-asgi[otlp]'" in run(NO_OTLP)


def test_py_typed_marker_ships() -> None:
    assert (Path(fastprof.__file__).parent / "py.typed").is_file()


def test_public_names_are_exported() -> None:
    for name in fastprof.__all__:
        assert hasattr(fastprof, name), name
