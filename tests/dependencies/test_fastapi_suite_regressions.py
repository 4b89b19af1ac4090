"""Transparency bugs found by running FastAPI's own test suite under fastprof.

See ``docs/fastapi-test-suite.md``; each test names the FastAPI test that found it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

import fastprof
from tests._client import get

pytestmark = pytest.mark.anyio


async def _get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    return await get(app, path, raise_app_exceptions=True, **kwargs)


@pytest.mark.parametrize("instrumented", [False, True])
@pytest.mark.parametrize("dependencies", ["all", "marked"])
async def test_override_installed_by_an_earlier_dependency_applies(
    spans: Any, instrumented: bool, dependencies: Any
) -> None:
    """tests/test_dependency_concurrency.py::test_override_installed_by_earlier_dependency_...

    FastAPI reads ``app.dependency_overrides`` again for every sub-dependency, so an
    override installed during the request (while the dict was empty when solving
    began) applies to the dependencies solved after it.
    """
    app = FastAPI()

    def original() -> str:
        return "original"

    def replacement() -> str:
        return "replacement"

    def configure() -> None:
        app.dependency_overrides[original] = replacement

    @app.get("/")
    def endpoint(_: None = Depends(configure), value: str = Depends(original)) -> str:
        return value

    if instrumented:
        fastprof.instrument(
            app,
            tracer_provider=spans.provider,
            dependencies=fastprof.DependencySpans(mode=dependencies),
        )
    assert (await _get(app, "/")).json() == "replacement"
    names = {s.name for s in spans.all()}
    if instrumented and dependencies == "all":
        assert any(n.endswith(".replacement") for n in names), names
    else:  # nothing marked, or not instrumented: no dependency span
        assert not any(n.startswith("dependency ") for n in names), names


async def test_override_replaced_dict_is_read_live(spans: Any) -> None:
    """Assigning a new ``dependency_overrides`` dict mid-request is seen too."""
    app = FastAPI()

    def original() -> str:
        return "original"

    def replacement() -> str:
        return "replacement"

    def configure() -> None:
        app.dependency_overrides = {original: replacement}

    @app.get("/")
    def endpoint(_: None = Depends(configure), value: str = Depends(original)) -> str:
        return value

    fastprof.instrument(app, tracer_provider=spans.provider)
    assert (await _get(app, "/")).json() == "replacement"


_KEY = otel_context.create_key("fastprof-test.ambient")


@pytest.mark.parametrize("instrumented", [False, True])
@pytest.mark.parametrize("traceparent", [False, True])
async def test_ambient_context_values_reach_the_app(
    spans: Any, instrumented: bool, traceparent: bool
) -> None:
    """tests/test_telemetry/test_data.py::test_excluded_request_does_not_use_outer_telemetry
    and ::test_validation_data_without_tracing.

    fastprof replaces only the current span: baggage and other values already in
    the OpenTelemetry context (an outer in-process request's, FastAPI's native
    telemetry data when native tracing is off) stay visible to the app. The span's
    parent still never comes from the ambient context.
    """
    seen: dict[str, Any] = {}
    app = FastAPI()

    @app.get("/")
    def endpoint() -> str:
        seen["value"] = otel_context.get_value(_KEY)
        seen["baggage"] = baggage.get_all()
        seen["span"] = trace.get_current_span()
        return "ok"

    if instrumented:
        fastprof.instrument(app, tracer_provider=spans.provider)
    headers = {"baggage": "from_header=1"}
    if traceparent:
        headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    outer = spans.provider.get_tracer("outer").start_span("outer request")
    ctx = baggage.set_baggage("ambient", "a", otel_context.set_value(_KEY, "kept"))
    token = otel_context.attach(trace.set_span_in_context(outer, ctx))
    try:
        assert (await _get(app, "/", headers=headers)).json() == "ok"
    finally:
        otel_context.detach(token)
        outer.end()
    assert seen["value"] == "kept"
    if not instrumented:
        assert seen["baggage"] == {"ambient": "a"}
        assert seen["span"] is outer
        return
    # fastprof adds the header's baggage, and its spans (the endpoint phase span
    # inside the SERVER span) replace the outer one as current.
    assert seen["baggage"] == {"ambient": "a", "from_header": "1"}
    (server,) = spans.server()
    assert seen["span"] is not outer
    assert seen["span"].get_span_context().trace_id == server.context.trace_id
    if traceparent:
        assert server.parent is not None
        assert server.parent.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    else:
        assert server.parent is None
