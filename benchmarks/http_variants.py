"""The configurations the HTTP benchmark (``python -m benchmarks.http_mode``) serves with uvicorn.

Each entry of :data:`HTTP_VARIANTS` builds the ASGI app one server process serves. Every
tracer provider here is an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` feeding an
exporter that discards the spans (how production exports, without the network), and none
is installed as the global provider (FastAPI's native telemetry stays off except in
``native-sampled``).

Samplers: "unsampled" is ``ParentBased(ALWAYS_OFF)`` (nothing head-sampled, the incoming
``traceparent`` still honoured), "1pct" is ``ParentBased(TraceIdRatioBased(0.01))`` (how
production would run it), "sampled" is ``ALWAYS_ON``.

``sdk-floor`` is the OpenTelemetry SDK's own floor for the spans fastprof records: at start
it records (once, in memory) the spans ``fastprof.instrument(app)`` makes for each endpoint,
then serves the bare app behind a pure-ASGI middleware that starts and ends the same spans
(names, kinds, parents, attributes) through the SDK's public API and does nothing else.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from benchmarks.app import create_app

__all__ = ["HTTP_VARIANTS", "HttpVariant", "Skip", "build"]

PROFILING_SECRET = "benchmark-secret-" + "x" * 32


class Skip(Exception):
    """The variant cannot run with the installed versions; the message says why."""


@dataclass(frozen=True)
class HttpVariant:
    name: str
    description: str
    setup: Callable[[], ASGIApp]
    default: bool = True


HTTP_VARIANTS: dict[str, HttpVariant] = {}


def _variant(
    name: str, description: str, *, default: bool = True
) -> Callable[[Callable[[], ASGIApp]], Callable[[], ASGIApp]]:
    def register(setup: Callable[[], ASGIApp]) -> Callable[[], ASGIApp]:
        HTTP_VARIANTS[name] = HttpVariant(name, description, setup, default)
        return setup

    return register


def build(name: str) -> ASGIApp:
    """The app of variant ``name`` (raises :class:`Skip` when it cannot run here)."""
    return HTTP_VARIANTS[name].setup()


# --- span processing ---------------------------------------------------------------------


def tracer_provider(sampler: str) -> Any:
    """An SDK provider (``"off"``, ``"1pct"``, ``"10pct"`` or ``"on"``) whose spans go nowhere."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased,
        TraceIdRatioBased,
    )

    class DiscardExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    samplers = {
        "off": ParentBased(ALWAYS_OFF),
        "1pct": ParentBased(TraceIdRatioBased(0.01)),
        "10pct": ParentBased(TraceIdRatioBased(0.10)),
        "on": ALWAYS_ON,
    }
    provider = TracerProvider(sampler=samplers[sampler])
    provider.add_span_processor(BatchSpanProcessor(DiscardExporter()))
    return provider


def _native_telemetry() -> bool:
    from fastapi import FastAPI

    return "telemetry" in inspect.signature(FastAPI.__init__).parameters


def _instrumented(
    sampler: str,
    *,
    loop: bool = False,
    slowlog: bool = False,
    profiling: bool = False,
    slowlog_dependencies: str | None = None,
) -> ASGIApp:
    import fastprof

    options: dict[str, Any] = {}
    if loop:
        # Raised by the instructions mode (a server under valgrind runs ~50x slower).
        threshold = float(os.environ.get("FASTPROF_BENCH_LOOP_THRESHOLD_S", "0.1"))
        options["loop_monitor"] = fastprof.LoopMonitor(threshold_s=threshold)
    if slowlog:
        options["slow_requests"] = fastprof.SlowRequestLog(
            threshold_s=1.0, **_slowlog_options(slowlog_dependencies)
        )
    if profiling:
        options["profiling"] = fastprof.Profiling(secret=PROFILING_SECRET)
    return fastprof.instrument(create_app(), tracer_provider=tracer_provider(sampler), **options)


def _slowlog_options(dependencies: str | None) -> dict[str, Any]:
    """``dependencies=`` when asked for (``None``: the default of the fastprof measured)."""
    if dependencies is None:
        return {}
    import fastprof

    if "dependencies" not in inspect.signature(fastprof.SlowRequestLog).parameters:
        raise Skip("SlowRequestLog has no dependencies= option in this fastprof")
    return {"dependencies": dependencies}


# --- the variants ------------------------------------------------------------------------


@_variant("bare", "FastAPI app, no instrumentation")
def _bare() -> ASGIApp:
    return create_app()


@_variant("bare-AA", "a second bare app: the A/A control (its distance from 1.00 is the noise)")
def _bare_aa() -> ASGIApp:
    return create_app()


@_variant("default", "instrument(app), nothing head-sampled (ParentBased(ALWAYS_OFF))")
def _default() -> ASGIApp:
    return _instrumented("off")


@_variant("loop", "default + LoopMonitor(threshold_s=0.1)")
def _loop() -> ASGIApp:
    return _instrumented("off", loop=True)


@_variant("slowlog", "default + SlowRequestLog(threshold_s=1.0) (never logs here)")
def _slowlog() -> ASGIApp:
    return _instrumented("off", slowlog=True)


@_variant(
    "slowlog-alldeps",
    "default + SlowRequestLog(threshold_s=1.0, dependencies='all') (never logs here)",
)
def _slowlog_alldeps() -> ASGIApp:
    return _instrumented("off", slowlog=True, slowlog_dependencies="all")


@_variant("profiling-idle", "default + Profiling(secret=...), never triggered")
def _profiling_idle() -> ASGIApp:
    return _instrumented("off", profiling=True)


@_variant("all-unsampled", "loop monitor + slow-request log + profiling, ParentBased(ALWAYS_OFF)")
def _all_unsampled() -> ASGIApp:
    return _instrumented("off", loop=True, slowlog=True, profiling=True)


@_variant("all-1pct", "all three, ParentBased(TraceIdRatioBased(0.01))")
def _all_1pct() -> ASGIApp:
    return _instrumented("1pct", loop=True, slowlog=True, profiling=True)


@_variant(
    "all-alldeps-1pct",
    "all three, slow-request log dependencies='all', ParentBased(TraceIdRatioBased(0.01))",
)
def _all_alldeps_1pct() -> ASGIApp:
    return _instrumented(
        "1pct", loop=True, slowlog=True, profiling=True, slowlog_dependencies="all"
    )


@_variant("all-10pct", "all three, ParentBased(TraceIdRatioBased(0.10))", default=False)
def _all_10pct() -> ASGIApp:
    return _instrumented("10pct", loop=True, slowlog=True, profiling=True)


@_variant("all-sampled", "all three, ALWAYS_ON")
def _all_sampled() -> ASGIApp:
    return _instrumented("on", loop=True, slowlog=True, profiling=True)


@_variant("sampled", "instrument(app), ALWAYS_ON (route, phase and dependency spans)")
def _sampled() -> ASGIApp:
    return _instrumented("on")


@_variant("native-sampled", "FastAPI native telemetry, defaults, ALWAYS_ON")
def _native_sampled() -> ASGIApp:
    if not _native_telemetry():
        import fastapi

        raise Skip(f"FastAPI {fastapi.__version__} has no native telemetry (needs >= 0.142)")
    return create_app(telemetry={"tracer_provider": tracer_provider("on")})


@_variant("sdk-floor", "the SDK alone starting and ending the spans `sampled` records, ALWAYS_ON")
def _sdk_floor() -> ASGIApp:
    # Recorded in a child process: instrument() patches FastAPI process-wide, and the
    # floor must run FastAPI unpatched.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.http_variants", "--record-spans"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    templates = {
        path: _template_from_json(tree)
        for path, tree in json.loads(proc.stdout.strip().splitlines()[-1]).items()
    }
    tracer = tracer_provider("on").get_tracer("sdk-floor")
    return SpanFloor(create_app(), tracer, templates)


# --- the SDK floor -----------------------------------------------------------------------


@dataclass
class SpanTemplate:
    """One recorded span: what the floor starts and ends again, and its children."""

    name: str
    kind: Any
    attributes: dict[str, Any]
    children: list[SpanTemplate]


def record_spans(paths: Sequence[str] = ("/plain", "/deps", "/items")) -> dict[str, SpanTemplate]:
    """The span tree ``instrument(app)`` (ALWAYS_ON) records for one request to each path."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import fastprof

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = fastprof.instrument(create_app(), tracer_provider=provider)
    out: dict[str, SpanTemplate] = {}
    for path in paths:
        exporter.clear()
        asyncio.run(_one_request(app, path))
        spans = exporter.get_finished_spans()
        nodes = {
            s.context.span_id: SpanTemplate(s.name, s.kind, dict(s.attributes or {}), [])  # type: ignore[union-attr]
            for s in spans
        }
        roots = []
        for s in sorted(spans, key=lambda s: s.start_time or 0):
            node = nodes[s.context.span_id]  # type: ignore[union-attr]
            parent = s.parent.span_id if s.parent is not None else None
            if parent in nodes:
                nodes[parent].children.append(node)
            else:
                roots.append(node)
        if len(roots) != 1:
            raise Skip(f"expected one root span for {path}, got {len(roots)}")
        out[path] = roots[0]
    return out


async def _one_request(app: ASGIApp, path: str) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    await app(scope, receive, send)


def _template_to_json(t: SpanTemplate) -> dict[str, Any]:
    return {
        "name": t.name,
        "kind": t.kind.name,
        "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in t.attributes.items()},
        "children": [_template_to_json(c) for c in t.children],
    }


def _template_from_json(data: dict[str, Any]) -> SpanTemplate:
    from opentelemetry.trace import SpanKind

    return SpanTemplate(
        data["name"],
        SpanKind[data["kind"]],
        data["attributes"],
        [_template_from_json(c) for c in data["children"]],
    )


def count_spans(template: SpanTemplate) -> int:
    return 1 + sum(count_spans(c) for c in template.children)


class SpanFloor:
    """Pure-ASGI middleware: the recorded spans of the path, started and ended, nothing else.

    The root span is current while the app runs (as any instrumentation's would be); the
    other spans are started and ended as children before the app is called.
    """

    def __init__(self, app: ASGIApp, tracer: Any, templates: dict[str, SpanTemplate]) -> None:
        from opentelemetry import context, trace

        self.app = app
        self.tracer = tracer
        self.templates = templates
        self._attach = context.attach
        self._detach = context.detach
        self._with_span = trace.set_span_in_context

    def _children(self, template: SpanTemplate, ctx: Any) -> None:
        for child in template.children:
            span = self.tracer.start_span(
                child.name, context=ctx, kind=child.kind, attributes=child.attributes
            )
            if child.children:
                self._children(child, self._with_span(span, ctx))
            span.end()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        template = self.templates.get(scope.get("path", "")) if scope["type"] == "http" else None
        if template is None:
            await self.app(scope, receive, send)
            return
        span = self.tracer.start_span(
            template.name, kind=template.kind, attributes=template.attributes
        )
        ctx = self._with_span(span)
        token = self._attach(ctx)
        try:
            self._children(template, ctx)
            await self.app(scope, receive, send)
        finally:
            self._detach(token)
            span.end()


if __name__ == "__main__":  # ``python -m benchmarks.http_variants --record-spans``
    if sys.argv[1:] != ["--record-spans"]:
        raise SystemExit("usage: python -m benchmarks.http_variants --record-spans")
    recorded = {path: _template_to_json(t) for path, t in record_spans().items()}
    print(json.dumps(recorded))
