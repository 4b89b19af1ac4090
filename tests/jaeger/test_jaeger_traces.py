"""End to end: every fastprof feature, exported over OTLP/HTTP into a real Jaeger, read back
through Jaeger's query API (what its UI renders).

One app, one uvicorn server and one batch of requests for the module (``recorded``); each test
checks one thing the issue lists against the traces Jaeger returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from structlog.testing import capture_logs

import fastprof
from fastprof.exporters import setup_tracing
from fastprof.profiling import mint_token, viewer_token
from tests._jaeger import (
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    Jaeger,
    JaegerSpan,
)
from tests._server import free_port, serve

pytestmark = [pytest.mark.jaeger, pytest.mark.server]

SERVICE = f"fastprof-e2e-{os.getpid()}"
SECRET = secrets.token_hex(32)
CLIENT_TRACE_ID = secrets.token_hex(16)
CLIENT_PARENT_ID = secrets.token_hex(8)
BLOCK_S = 0.3
RESOURCE_ATTRIBUTES = "deployment.environment.name=e2e,service.version=1.2.3"


# -- the app: module-level callables, so span names are `dependency get_db` etc. ------------


def get_settings() -> dict[str, str]:
    """Sync: FastAPI runs it in a worker thread."""
    time.sleep(0.005)
    return {"region": "eu"}


async def get_db() -> AsyncIterator[str]:
    """A yield dependency: setup, then a teardown after the response."""
    await asyncio.sleep(0.005)
    yield "session"
    await asyncio.sleep(0.010)


async def current_user(db: Annotated[str, Depends(get_db)]) -> str:
    await asyncio.sleep(0.002)
    return "alice"


def deny() -> None:
    raise HTTPException(status_code=401, detail="no")


def explode() -> None:
    raise RuntimeError("dependency broke")


def _block_the_loop() -> None:
    time.sleep(BLOCK_S)  # the line the blocked-loop event must name


BLOCK_LINE = _block_the_loop.__code__.co_firstlineno + 1


def _busy(seconds: float) -> int:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/orders/{oid}")
    async def read_order(
        oid: int,
        user: Annotated[str, Depends(current_user)],
        settings: Annotated[dict[str, str], Depends(get_settings)],
    ) -> dict[str, Any]:
        await asyncio.sleep(0.002)
        return {"oid": oid, "user": user}

    @app.get("/reports/{rid}")
    async def report(rid: int) -> dict[str, int]:
        return {"rid": rid, "n": _busy(0.05)}

    @app.get("/block")
    async def block() -> dict[str, bool]:
        _block_the_loop()
        return {"blocked": True}

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("endpoint broke")

    @app.get("/denied", dependencies=[Depends(deny)])
    async def denied() -> None:
        return None

    @app.get("/broken", dependencies=[Depends(explode)])
    async def broken() -> None:
        return None

    return app


# -- one recorded run ---------------------------------------------------------------------


@dataclass
class Recorded:
    jaeger: Jaeger
    base_url: str
    profile_base_url: str
    profile_id: str
    traces: dict[str, list[JaegerSpan]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)

    def only(self, operation: str, *, exclude: str | None = None) -> list[JaegerSpan]:
        """The spans of the one trace whose root is ``operation`` (waiting for all of them)."""
        found = {
            tid: spans
            for tid, spans in self.jaeger.find_traces(SERVICE, operation=operation).items()
            if tid != exclude
        }
        assert len(found) == 1, f"{operation}: traces {list(found)}"
        return self.traces[next(iter(found))]


def server_span(spans: list[JaegerSpan]) -> JaegerSpan:
    found = [s for s in spans if s.kind == SPAN_KIND_SERVER]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def named(spans: list[JaegerSpan], name: str) -> JaegerSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {sorted(s.name for s in spans)}"
    return found[0]


# Spans each request's trace must reach before the module's checks run.
EXPECTED_SPANS = {
    "GET /orders/{oid}": 8,  # server, 3 phases, 3 dependencies, 1 teardown
    "GET /reports/{rid}": 4,
    "GET /block": 4,
    "GET /fail": 3,  # server, dependencies, endpoint (raised)
    "GET /denied": 3,  # server, dependencies, dependency deny
    "GET /broken": 3,
}


@pytest.fixture(scope="module")
def recorded(jaeger: Jaeger) -> Iterator[Recorded]:
    with pytest.MonkeyPatch.context() as env:  # read once, by the SDK's Resource.create()
        env.setenv("OTEL_RESOURCE_ATTRIBUTES", RESOURCE_ATTRIBUTES)
        provider = setup_tracing(SERVICE, otlp_endpoint=jaeger.otlp_http_endpoint, set_global=False)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    profile_base_url = f"{base_url}/_fastprof/profiles"
    profiling = fastprof.Profiling(secret=SECRET, base_url=profile_base_url)
    app = make_app()
    app.mount("/_fastprof/profiles", profiling.viewer())
    fastprof.instrument(
        app,
        tracer_provider=provider,
        exclude=r"^/_fastprof/",
        profiling=profiling,
        loop_monitor=fastprof.LoopMonitor(threshold_s=0.1),
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.25),
    )
    try:
        with serve(app, port=port), capture_logs() as logs:
            # No keep-alive: uvicorn closes the connection after an unhandled exception.
            no_keepalive = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(base_url=base_url, timeout=10, limits=no_keepalive) as client:
                assert client.get("/orders/1").status_code == 200
                traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_PARENT_ID}-01"
                assert client.get("/orders/2", headers={"traceparent": traceparent}).is_success
                token = mint_token(SECRET, ttl_s=60)
                response = client.get("/reports/3", headers={"X-Fastprof-Profile": token})
                assert response.status_code == 200
                profile_id = response.headers["x-fastprof-profile-id"]
                assert client.get("/block").status_code == 200
                assert client.get("/fail").status_code == 500
                assert client.get("/denied").status_code == 401
                assert client.get("/broken").status_code == 500
            profiling.flush()
            time.sleep(0.1)  # teardowns end after their response
            assert provider.force_flush(10_000)
            run = Recorded(jaeger, base_url, profile_base_url, profile_id, logs=logs)
            for operation, count in EXPECTED_SPANS.items():
                for tid in _wait_for_operation(jaeger, operation):
                    run.traces[tid] = jaeger.wait_for_spans(tid, count=count)
            yield run
    finally:
        provider.shutdown()


def _wait_for_operation(jaeger: Jaeger, operation: str, timeout_s: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = jaeger.find_traces(SERVICE, operation=operation)
        if found:
            return list(found)
        assert time.monotonic() < deadline, f"no trace for {operation} in Jaeger"
        time.sleep(0.1)


# -- the checks ---------------------------------------------------------------------------


def test_service_and_operations_are_listed(recorded: Recorded) -> None:
    """/api/v3/services lists the app's service.name; each route is an operation."""
    assert SERVICE in recorded.jaeger.services()
    assert "jaeger" not in recorded.jaeger.services()  # enable_tracing: false in the config
    operations = recorded.jaeger.operations(SERVICE)
    server_ops = {op["name"] for op in operations if op.get("spanKind") == "server"}
    assert server_ops == set(EXPECTED_SPANS)


def test_one_server_span_per_request_named_by_route(recorded: Recorded) -> None:
    """Seven requests: seven traces, each with exactly one SERVER span named by its route."""
    assert len(recorded.traces) == 7
    names = sorted(server_span(spans).name for spans in recorded.traces.values())
    assert names == sorted([*EXPECTED_SPANS, "GET /orders/{oid}"])
    order = server_span(recorded.only("GET /orders/{oid}", exclude=CLIENT_TRACE_ID))
    assert order.attributes["http.route"] == "/orders/{oid}"
    assert order.attributes["http.request.method"] == "GET"
    assert order.attributes["http.response.status_code"] == 200
    assert order.attributes["url.path"] == "/orders/1"


def test_resource_carries_service_name_and_resource_attributes(recorded: Recorded) -> None:
    """service.name, OTEL_RESOURCE_ATTRIBUTES and the SDK's attributes reach Jaeger."""
    for spans in recorded.traces.values():
        for span in spans:
            assert span.resource["service.name"] == SERVICE
            assert span.resource["deployment.environment.name"] == "e2e"
            assert span.resource["service.version"] == "1.2.3"
            assert span.resource["telemetry.sdk.language"] == "python"
            assert span.scope.startswith("fastprof")


def test_phase_and_dependency_spans_have_the_right_parents_and_order(recorded: Recorded) -> None:
    spans = recorded.only("GET /orders/{oid}", exclude=CLIENT_TRACE_ID)
    assert len(spans) == 8
    root = server_span(spans)
    phases = named(spans, "fastprof.dependencies")
    endpoint = named(spans, "fastprof.endpoint")
    serialization = named(spans, "fastprof.serialization")
    user = named(spans, "dependency current_user")
    db = named(spans, "dependency get_db")
    settings = named(spans, "dependency get_settings")
    for span in (phases, endpoint, serialization):
        assert span.parent_span_id == root.span_id
        assert span.kind == SPAN_KIND_INTERNAL
    assert phases.attributes["fastprof.phase"] == "dependencies"
    assert endpoint.attributes["fastprof.phase"] == "endpoint"
    assert serialization.attributes["fastprof.phase"] == "serialization"
    # The dependency tree: current_user needs get_db; get_settings is a sibling.
    assert user.parent_span_id == phases.span_id
    assert settings.parent_span_id == phases.span_id
    assert db.parent_span_id == user.span_id
    assert user.attributes["fastprof.dependency.kind"] == "async"
    assert db.attributes["fastprof.dependency.kind"] == "async_generator"
    assert settings.attributes["fastprof.dependency.kind"] == "sync"
    assert settings.attributes["fastprof.threadpool.wait_s"] >= 0
    assert db.attributes["code.function.name"].endswith("get_db")
    # Order in time, as the UI draws it.
    assert root.start_ns <= phases.start_ns <= user.start_ns <= db.start_ns
    assert db.end_ns <= user.end_ns <= settings.start_ns <= settings.end_ns <= phases.end_ns
    assert phases.end_ns <= endpoint.start_ns <= endpoint.end_ns <= serialization.start_ns
    assert serialization.end_ns <= root.end_ns


def test_teardown_span_is_linked_to_its_setup_span(recorded: Recorded) -> None:
    spans = recorded.only("GET /orders/{oid}", exclude=CLIENT_TRACE_ID)
    root = server_span(spans)
    setup = named(spans, "dependency get_db")
    teardown = named(spans, "teardown get_db")
    assert teardown.parent_span_id == root.span_id
    assert teardown.attributes["fastprof.dependency.phase"] == "teardown"
    assert [(tid, sid) for tid, sid, _ in teardown.links] == [(setup.trace_id, setup.span_id)]
    # After the endpoint and the serialization; the 10 ms after `yield` are its duration.
    assert teardown.start_ns >= named(spans, "fastprof.serialization").end_ns
    assert teardown.end_ns - teardown.start_ns >= 9_000_000


def test_client_traceparent_is_continued(recorded: Recorded) -> None:
    spans = recorded.traces[CLIENT_TRACE_ID]
    root = server_span(spans)
    assert root.name == "GET /orders/{oid}"
    assert root.parent_span_id == CLIENT_PARENT_ID
    assert {s.trace_id for s in spans} == {CLIENT_TRACE_ID}
    assert len(spans) == 8


def test_blocked_loop_event_names_file_and_line(recorded: Recorded) -> None:
    root = server_span(recorded.only("GET /block"))
    event = root.event("fastprof.loop.blocked")
    assert Path(event["code.file.path"]).resolve() == Path(__file__).resolve()
    assert event["code.line.number"] == BLOCK_LINE
    assert event["code.function.name"].endswith("_block_the_loop")
    assert event["fastprof.loop.blocked_s"] >= 0.1
    innermost = event["code.stacktrace"].splitlines()[-1]
    assert innermost.endswith(f"line {BLOCK_LINE}, in _block_the_loop"), innermost


def test_profile_id_and_url_attributes_and_the_ui_link(recorded: Recorded) -> None:
    """The span carries the profile's id and URL; the UI's linkPattern turns the URL into a link
    that opens the profile (followed here as the browser would, with the viewer's auth)."""
    root = server_span(recorded.only("GET /reports/{rid}"))
    profile_id = root.attributes["fastprof.profile.id"]
    assert profile_id == recorded.profile_id
    assert root.attributes["fastprof.profile.url"] == f"{recorded.profile_base_url}/{profile_id}"
    assert root.attributes["fastprof.profile.trigger"] == "header"
    assert root.event("fastprof.profile")  # the hottest lines
    # The UI configuration Jaeger serves (the placeholder page shows the injected config).
    page = recorded.jaeger.get_text("/")
    match = re.search(r"JAEGER_CONFIG = (\{.*?\});", page, re.DOTALL)
    assert match, page[:500]
    ui_config = json.loads(match.group(1))
    assert ui_config["criticalPathEnabled"] is True
    (pattern,) = [p for p in ui_config["linkPatterns"] if p["key"] == "fastprof.profile.url"]
    assert pattern["type"] == "tags"
    url = root.attributes["fastprof.profile.url"]
    link = pattern["url"].replace("#{fastprof.profile.url}", url)
    request = urllib.request.Request(
        link, headers={"Authorization": f"Bearer {viewer_token(SECRET)}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert "html" in response.headers["content-type"]
        assert b"pyinstrument" in response.read().lower()


def test_slow_request_log_points_at_the_trace_in_jaeger(recorded: Recorded) -> None:
    root = server_span(recorded.only("GET /block"))
    slow = [e for e in recorded.logs if e["event"] == "slow request" and e["route"] == "/block"]
    (line,) = slow
    assert line["trace_id"] == root.trace_id
    assert line["span_id"] == root.span_id
    assert line["loop_blocked_s"] >= 0.1


def test_unhandled_exception_is_an_error_span(recorded: Recorded) -> None:
    spans = recorded.only("GET /fail")
    root = server_span(spans)
    assert root.status_code == STATUS_ERROR
    assert root.attributes["http.response.status_code"] == 500
    assert root.attributes["error.type"] == "RuntimeError"
    exception = root.event("exception")
    assert exception["exception.type"] == "RuntimeError"
    assert exception["exception.message"] == "endpoint broke"
    endpoint = named(spans, "fastprof.endpoint")  # the span that raised
    assert endpoint.status_code == STATUS_ERROR
    assert endpoint.event("exception")["exception.message"] == "endpoint broke"


def test_http_exception_from_a_dependency_is_not_an_error(recorded: Recorded) -> None:
    spans = recorded.only("GET /denied")
    root = server_span(spans)
    dependency = named(spans, "dependency deny")
    assert root.attributes["http.response.status_code"] == 401
    assert root.status_code != STATUS_ERROR
    assert dependency.attributes["http.response.status_code"] == 401
    assert dependency.status_code != STATUS_ERROR


def test_failing_dependency_is_an_error_span(recorded: Recorded) -> None:
    spans = recorded.only("GET /broken")
    dependency = named(spans, "dependency explode")
    assert dependency.status_code == STATUS_ERROR
    assert dependency.attributes["error.type"] == "RuntimeError"
    assert dependency.event("exception")["exception.message"] == "dependency broke"
    assert server_span(spans).status_code == STATUS_ERROR
