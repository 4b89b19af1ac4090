"""Every variable of docs/configuration.md: a good value reaches the option it sets, a bad
value fails at start-up with a message naming the variable."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import sampling
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import fastprof
from fastprof.config import VARIABLES, check_environ, from_environ, setup_tracing_from_env
from fastprof.profiling import FileStore, MemoryStore
from tests._otlp_receiver import otlp_receiver, span_attributes

SECRET = "s" * 40
DOCS = Path(__file__).parents[2] / "docs" / "configuration.md"


def opts(env: dict[str, str]) -> dict[str, Any]:
    return from_environ(env).options


def prof(env: dict[str, str]) -> Any:
    return opts({"FASTPROF_SECRET": SECRET, **env})["profiling"]


def loop(env: dict[str, str]) -> Any:
    return opts(env)["loop_monitor"]


def slow(env: dict[str, str]) -> Any:
    return opts(env)["slow_requests"]


def capture(env: dict[str, str]) -> Any:
    return opts(env)["slow_capture"]


def timing(env: dict[str, str]) -> Any:
    return opts(env)["server_timing"]


def allow_internal(scope: Any) -> bool:
    """FASTPROF_SERVER_TIMING_ALLOW's predicate in these tests."""
    return bool(scope["path"].startswith("/internal"))


ALLOW = "tests.deploy.test_env:allow_internal"


def dependency_spans(env: dict[str, str]) -> list[str]:
    """Names of the dependency spans of one request to a FastAPI app instrumented with
    the options of ``env``."""
    from fastapi import Depends, FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    def plain() -> int:
        return 1

    def marked() -> int:
        return 2

    app = FastAPI()

    @app.get("/d")
    async def endpoint(a: int = Depends(plain), b: int = fastprof.Depends(marked)) -> int:
        return a + b

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    fastprof.instrument(app, tracer_provider=provider, **opts(env))
    anyio.run(request, app, "/d")
    return sorted(
        s.name.rpartition(".")[2] for s in exporter.get_finished_spans()
        if s.name.startswith("dependency")
    )


# (variable, good value, what it sets given the environment, expected, bad value)
CASES: list[tuple[str, str, Any, Any, str]] = [
    ("FASTPROF_ENABLED", "false", lambda e: from_environ(e).enabled, False, "maybe"),
    ("FASTPROF_SHUTDOWN_TIMEOUT_S", "1.5", lambda e: from_environ(e).shutdown_timeout_s, 1.5,
     "0"),
    ("FASTPROF_EXCLUDE", "/healthz, /metrics", lambda e: opts(e)["exclude"],
     ["/healthz", "/metrics"], "healthz"),
    ("FASTPROF_REQUEST_ID_HEADER", "none", lambda e: opts(e)["request_id_header"], None,
     "bad header!"),
    ("FASTPROF_RESPONSE_REQUEST_ID_HEADER", "X-Req", lambda e:
     opts(e)["response_request_id_header"], "X-Req", "a b"),
    ("FASTPROF_QUERY", "OMIT", lambda e: opts(e)["query"], "omit", "everything"),
    ("FASTPROF_REDACT_QUERY_KEYS", "session, sig", lambda e: from_environ(e).enabled, True,
     ""),  # validated by the middleware; see test_redact_query_keys
    ("FASTPROF_MAX_ATTRIBUTE_LENGTH", "64", lambda e: opts(e)["max_attribute_length"], 64,
     "3"),
    ("FASTPROF_HOOKS", "tests.deploy.hooks_fixture:hooks", lambda e:
     type(opts(e)["hooks"][0]).__name__, "Counter", "tests.deploy.hooks_fixture:nothing"),
    ("FASTPROF_DEPENDENCIES", "marked", lambda e: dependency_spans(e), ["marked"],
     "some"),
    ("FASTPROF_DEPENDENCIES_MAX_SPANS", "1", lambda e: len(dependency_spans(e)), 1, "-1"),
    ("FASTPROF_PROFILING", "false", lambda e: opts({"FASTPROF_SECRET": SECRET, **e})[
        "profiling"], None, "perhaps"),
    ("FASTPROF_SECRET", SECRET, lambda e: opts(e)["profiling"].enabled, True, "short"),
    ("FASTPROF_PREVIOUS_SECRETS", "o" * 40, lambda e: len(prof(e)._secrets), 2, "short"),
    ("FASTPROF_PROFILING_HEADER", "X-Prof", lambda e: prof(e)._header, b"x-prof", "X Prof"),
    ("FASTPROF_PROFILING_MAX_TOKEN_TTL_S", "60", lambda e: prof(e)._verifier._max_ttl_s, 60,
     "0"),
    ("FASTPROF_PROFILING_REPLAY_CACHE_SIZE", "100", lambda e: prof(e)._verifier._replay._max,
     100, "0"),
    ("FASTPROF_PROFILING_SAMPLE_RATE", "0.25", lambda e: prof(e)._sample_rate, 0.25, "2"),
    ("FASTPROF_PROFILING_SAMPLE_ROUTES", "/items/{id}=0.5,/a=1", lambda e:
     prof(e)._sample_routes, {"/items/{id}": 0.5, "/a": 1.0}, "/items=lots"),
    ("FASTPROF_PROFILING_DEV_MODE", "true", lambda e: prof(e)._query_key, "fastprof_profile",
     "sure"),
    ("FASTPROF_PROFILING_QUERY_PARAM", "p", lambda e: prof(e).query_param, "p", "a b"),
    ("FASTPROF_PROFILING_MAX_CONCURRENT", "2", lambda e: prof(e)._budget.max_concurrent, 2,
     "0"),
    ("FASTPROF_PROFILING_MAX_PER_MINUTE", "30", lambda e: prof(e)._budget.max_per_minute, 30,
     "x"),
    ("FASTPROF_PROFILING_INTERVAL_S", "0.005", lambda e: prof(e).interval_s, 0.005, "5"),
    ("FASTPROF_PROFILING_MAX_DURATION_S", "10", lambda e: prof(e).max_duration_s, 10, "1e9"),
    ("FASTPROF_PROFILING_BASE_URL", "https://x/p/", lambda e: prof(e).base_url, "https://x/p",
     "ftp://x"),
    ("FASTPROF_PROFILING_RESPONSE_HEADER", "none", lambda e: prof(e)._response_header, None,
     "X Y"),
    ("FASTPROF_PROFILING_TOP_FRAMES", "3", lambda e: prof(e)._top_frames, 3, "1000"),
    ("FASTPROF_PROFILING_EMBED_MAX_BYTES", "1000", lambda e: prof(e)._embed_max_bytes, 1000,
     "-5"),
    ("FASTPROF_PROFILING_WRITER_QUEUE_SIZE", "4", lambda e: prof(e)._writer._max
     if hasattr(prof(e)._writer, "_max") else 4, 4, "0"),
    ("FASTPROF_PROFILING_STORE_MAX_COUNT", "5", lambda e: (type(prof(e).store),
     prof(e).store.max_count), (MemoryStore, 5), "0"),
    ("FASTPROF_PROFILING_STORE_MAX_BYTES", "100000", lambda e: prof(e).store.max_bytes, 100000,
     "-1"),
    ("FASTPROF_PROFILING_STORE_TTL_S", "60", lambda e: prof(e).store.ttl_s, 60, "-1"),
    ("FASTPROF_PROFILING_VIEWER_PATH", "/_fastprof/profiles", lambda e: (
        from_environ({"FASTPROF_SECRET": SECRET, **e}).viewer_path, prof(e).base_url),
     ("/_fastprof/profiles", "/_fastprof/profiles"), "no-slash"),
    ("FASTPROF_LOOP_MONITOR", "true", lambda e: loop(e).threshold_s, 0.1, "yep"),
    ("FASTPROF_LOOP_MONITOR_THRESHOLD_S", "0.25", lambda e: loop(e).threshold_s, 0.25, "0"),
    ("FASTPROF_LOOP_MONITOR_INTERVAL_S", "0.05", lambda e: loop(e).interval_s, 0.05, "0"),
    ("FASTPROF_LOOP_MONITOR_SAMPLE_INTERVAL_S", "0.01", lambda e: loop(e).sample_interval_s,
     0.01, "0"),
    ("FASTPROF_LOOP_MONITOR_MAX_SAMPLES", "7", lambda e: loop(e).max_samples, 7, "0"),
    ("FASTPROF_LOOP_MONITOR_MAX_STACK_DEPTH", "8", lambda e: loop(e).max_stack_depth, 8, "0"),
    ("FASTPROF_LOOP_MONITOR_MAX_STACK_CHARS", "999", lambda e: loop(e).max_stack_chars, 999,
     "10"),
    ("FASTPROF_LOOP_MONITOR_MAX_REPORTS_PER_MINUTE", "0", lambda e: loop(e)._log_limit, None,
     "-1"),
    ("FASTPROF_LOOP_MONITOR_THREADPOOL", "false", lambda e: loop(e)._threadpool, False, "2"),
    ("FASTPROF_LOOP_MONITOR_SATURATION_LOG_INTERVAL_S", "5", lambda e:
     loop(e).saturation_log_interval_s, 5, "-1"),
    ("FASTPROF_SLOW_REQUESTS", "true", lambda e: slow(e).threshold_s, 1.0, "nah"),
    ("FASTPROF_SLOW_REQUESTS_THRESHOLD_S", "0.5", lambda e: slow(e).threshold_s, 0.5, "-1"),
    ("FASTPROF_SLOW_REQUESTS_TOP", "2", lambda e: slow(e).top, 2, "100"),
    ("FASTPROF_SLOW_REQUESTS_LEVEL", "ERROR", lambda e: slow(e).level, "error", "loud"),
    ("FASTPROF_SLOW_REQUESTS_EVENT", "slow!", lambda e: slow(e).event, "slow!", ""),
    ("FASTPROF_SLOW_REQUESTS_DEPENDENCIES", "TRACED", lambda e: slow(e).dependencies, "traced",
     "some"),
    ("FASTPROF_SLOW_CAPTURE", "true", lambda e: capture(e).threshold_s, 1.0, "nope"),
    ("FASTPROF_SLOW_CAPTURE_THRESHOLD_S", "0.5", lambda e: capture(e).threshold_s, 0.5, "-1"),
    ("FASTPROF_SLOW_CAPTURE_ROUTES", "/search=2, /items/{id}=0.25",
     lambda e: capture(e).routes, {"/search": 2.0, "/items/{id}": 0.25}, "/search=slow"),
    ("FASTPROF_SLOW_CAPTURE_MAX_PER_MINUTE", "3", lambda e: capture(e).max_per_minute, 3, "0"),
    ("FASTPROF_SLOW_CAPTURE_MAX_SPANS", "64", lambda e: capture(e).max_spans, 64, "-1"),
    ("FASTPROF_SLOW_CAPTURE_TEARDOWN_WAIT_S", "0.5", lambda e: capture(e).teardown_wait_s, 0.5,
     "x"),
    ("FASTPROF_SERVER_TIMING", "true", lambda e: (timing(e).allow, timing(e).profiled),
     (None, True), "sometimes"),
    ("FASTPROF_SERVER_TIMING_ALLOW", ALLOW, lambda e: timing(e).allow.__qualname__,
     "allow_internal",
     "tests.deploy.test_env"),
    ("FASTPROF_SERVER_TIMING_PROFILED", "false", lambda e: timing(e).profiled, False, "2"),
    ("FASTPROF_SERVER_TIMING_TOP", "3", lambda e: timing(e).top, 3, "33"),
]


@pytest.mark.parametrize(("name", "good", "get", "expected", "bad"), CASES,
                         ids=[c[0] for c in CASES])
def test_fastprof_variable(name: str, good: str, get: Any, expected: Any, bad: str) -> None:
    assert get({name: good}) == expected
    if not bad:
        return  # an empty value means unset
    env = {"FASTPROF_SECRET": SECRET, name: bad} if name != "FASTPROF_SECRET" else {name: bad}
    if name == "FASTPROF_PROFILING_VIEWER_PATH" or name.startswith("FASTPROF_PROFILING_"):
        env["FASTPROF_SECRET"] = SECRET
    with pytest.raises(ValueError, match=f"^{name}") as info:
        check_environ(env)
    if name in ("FASTPROF_SECRET", "FASTPROF_PREVIOUS_SECRETS"):
        assert bad not in str(info.value)  # a credential is never echoed


def test_file_store_directory(tmp_path: Path) -> None:
    profiling = prof(
        {"FASTPROF_PROFILING_STORE_DIR": str(tmp_path), "FASTPROF_PROFILING_STORE_MAX_COUNT": "3"}
    )
    assert isinstance(profiling.store, FileStore)
    assert profiling.store.directory == str(tmp_path)
    assert profiling.store.max_count == 3
    with pytest.raises(ValueError, match="^FASTPROF_PROFILING_STORE_MAX_COUNT"):
        check_environ({"FASTPROF_SECRET": SECRET, "FASTPROF_PROFILING_STORE_DIR": str(tmp_path),
                       "FASTPROF_PROFILING_STORE_MAX_COUNT": "0"})


@pytest.mark.parametrize("bad", ["relative/dir", "FILE"])
def test_file_store_directory_bad_value(tmp_path: Path, bad: str) -> None:
    if bad == "FILE":
        bad = str(tmp_path / "a-file")
        Path(bad).write_text("")
    with pytest.raises(ValueError, match="^FASTPROF_PROFILING_STORE_DIR: expected an absolute"):
        check_environ({"FASTPROF_SECRET": SECRET, "FASTPROF_PROFILING_STORE_DIR": bad})


def test_app_factory_bad_value() -> None:
    with pytest.raises(ValueError, match="^FASTPROF_APP_FACTORY: expected true or false"):
        check_environ({"FASTPROF_APP": "main:app", "FASTPROF_APP_FACTORY": "perhaps"})


@pytest.mark.anyio
async def test_viewer_is_mounted_at_the_viewer_path() -> None:
    from fastprof.profiling import viewer_token

    app = fastprof.config.instrument_from_env(
        Starlette(routes=[Route("/x", lambda r: PlainTextResponse("ok"))]),
        {"OTEL_SDK_DISABLED": "true", "FASTPROF_SECRET": SECRET,
         "FASTPROF_PROFILING_VIEWER_PATH": "/_fastprof/profiles"},
    )
    auth = {"authorization": f"Bearer {viewer_token(SECRET)}"}
    assert (await request(app, "/_fastprof/profiles/", headers=auth)).status_code == 200
    assert (await request(app, "/_fastprof/profiles/")).status_code == 404  # the viewer's
    assert (await request(app, "/nothing-here/", headers=auth)).status_code == 404


def test_instrument_from_env_twice_is_a_no_op() -> None:
    env = {"OTEL_SDK_DISABLED": "true", "FASTPROF_SECRET": SECRET,
           "FASTPROF_PROFILING_VIEWER_PATH": "/_p"}
    app = fastprof.config.instrument_from_env(starlette_app(), env)
    routes, lifespan = list(app.routes), app.router.lifespan_context
    assert fastprof.config.instrument_from_env(app, env) is app
    assert list(app.routes) == routes
    assert app.router.lifespan_context is lifespan


def test_every_variable_has_a_test() -> None:
    here = Path(__file__).parent
    source = "".join(p.read_text() for p in here.glob("test_*.py"))
    assert [name for name in VARIABLES if name not in source.replace(name + "_", "")] == []


def test_components_are_off_unless_asked_for() -> None:
    options = opts({})
    assert options["profiling"] is None
    assert options["loop_monitor"] is None
    assert options["slow_requests"] is None
    assert options["slow_capture"] is None
    assert options["server_timing"] is None
    assert dependency_spans({}) == ["marked", "plain"]
    assert dependency_spans({"FASTPROF_DEPENDENCIES": "off"}) == []


def test_unknown_fastprof_variable_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    from_environ({"FASTPROF_SLOW_REQUEST_THRESHOLD_S": "1"})
    assert "did you mean FASTPROF_SLOW_REQUESTS_THRESHOLD_S" in caplog.text


def test_every_variable_is_documented() -> None:
    text = DOCS.read_text()
    missing = [name for name in VARIABLES if f"`{name}`" not in text]
    assert missing == []


# -- behaviour through a request -------------------------------------------------------


async def request(app: Any, path: str, **kw: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        return await c.get(path, **kw)


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/{p:path}", lambda r: PlainTextResponse("ok"))])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("env", "traced"),
    [
        ({"FASTPROF_EXCLUDE": "/healthz"}, {"/healthz": False, "/other": True}),
        ({"OTEL_PYTHON_STARLETTE_EXCLUDED_URLS": "health,ready$"},
         {"/healthz": False, "/ready": False, "/readyz": True}),
        ({"OTEL_PYTHON_EXCLUDED_URLS": "^http://testserver/internal"},
         {"/internal/x": False, "/x/internal": True}),
        ({"OTEL_PYTHON_FASTAPI_EXCLUDED_URLS": "health",  # not a FastAPI app: not this one
          "OTEL_PYTHON_EXCLUDED_URLS": "other"}, {"/healthz": True, "/other": False}),
    ],
)
async def test_excluded_urls(env: dict[str, str], traced: dict[str, bool], spans: Any) -> None:
    """FASTPROF_EXCLUDE (exact paths) and contrib's excluded-URLs variables (regexes
    searched in the URL; the framework's variable first, then the generic one)."""
    from fastprof.config import _combine_exclude, _url_excluder

    config = from_environ(env)
    options = dict(config.options)
    options["exclude"] = _combine_exclude(
        options.get("exclude"), _url_excluder(config.excluded_urls, fastapi=False)
    )
    app = fastprof.instrument(starlette_app(), tracer_provider=spans.provider, **options)
    for path, expected in traced.items():
        spans.clear()
        await request(app, path)
        assert bool(spans.server()) is expected, path


def test_slow_capture_bad_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match=r"^FASTPROF_SLOW_CAPTURE_ROUTES='search=1': routes"):
        check_environ({"FASTPROF_SLOW_CAPTURE_ROUTES": "search=1"})  # not a template
    with pytest.raises(ValueError, match="^FASTPROF_SLOW_CAPTURE_ROUTES: expected"):
        check_environ({"FASTPROF_SLOW_CAPTURE_ROUTES": "/search"})  # no threshold
    # The switch set to false wins over the others.
    assert capture({"FASTPROF_SLOW_CAPTURE": "false",
                    "FASTPROF_SLOW_CAPTURE_THRESHOLD_S": "0.5"}) is None


@pytest.mark.parametrize("ref", ["tests.deploy.test_env:nothing_here", "no_such_module:f",
                                 "tests.deploy.test_env:ALLOW"])
def test_server_timing_allow_bad_import_string(ref: str) -> None:
    with pytest.raises(ValueError, match="^FASTPROF_SERVER_TIMING_ALLOW: "):
        check_environ({"FASTPROF_SERVER_TIMING_ALLOW": ref})


@pytest.mark.anyio
@pytest.mark.parametrize("switch", ["true", "false"])
async def test_server_timing_switch_adds_the_header(switch: str, spans: Any) -> None:
    """FASTPROF_SERVER_TIMING turns the header on for the requests its predicate allows."""
    options = opts({"FASTPROF_SERVER_TIMING": switch, "FASTPROF_SERVER_TIMING_ALLOW": ALLOW})
    app = fastprof.instrument(starlette_app(), tracer_provider=spans.provider, **options)
    allowed = await request(app, "/internal/x")
    assert ("server-timing" in allowed.headers) is (switch == "true")
    if switch == "true":
        assert allowed.headers["server-timing"].startswith("app;dur=")
    assert "server-timing" not in (await request(app, "/public")).headers


@pytest.mark.anyio
async def test_slow_capture_switch_exports_an_unsampled_slow_request() -> None:
    """FASTPROF_SLOW_CAPTURE: a slow request head sampling dropped is exported anyway."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    async def slow_endpoint(request: Any) -> PlainTextResponse:
        await anyio.sleep(0.06)
        return PlainTextResponse("ok")

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampling.ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for switch, exported in (("false", 0), ("true", 1)):
        exporter.clear()
        options = opts({"FASTPROF_SLOW_CAPTURE": switch,
                        "FASTPROF_SLOW_CAPTURE_THRESHOLD_S": "0.05"})
        app = fastprof.instrument(
            Starlette(routes=[Route("/slow", slow_endpoint)]), tracer_provider=provider,
            **options,
        )
        assert (await request(app, "/slow")).status_code == 200
        for _ in range(100):
            if len(exporter.get_finished_spans()) >= exported:
                break
            await anyio.sleep(0.01)
        server = [s for s in exporter.get_finished_spans()
                  if s.attributes and s.attributes.get("fastprof.capture") == "slow"]
        assert len(server) == exported, switch


@pytest.mark.parametrize(
    "name",
    ["OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "OTEL_PYTHON_STARLETTE_EXCLUDED_URLS",
     "OTEL_PYTHON_EXCLUDED_URLS"],
)
def test_excluded_urls_bad_regex(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: invalid regular expression"):
        check_environ({name: "health,(unclosed"})


@pytest.mark.anyio
async def test_request_id_and_query_variables(spans: Any) -> None:
    options = opts({"FASTPROF_RESPONSE_REQUEST_ID_HEADER": "X-Trace-Req",
                    "FASTPROF_QUERY": "redact_all", "FASTPROF_MAX_ATTRIBUTE_LENGTH": "16"})
    app = fastprof.instrument(starlette_app(), tracer_provider=spans.provider, **options)
    response = await request(app, "/x?a=1")
    assert response.headers["x-trace-req"]
    assert spans.server()[0].attributes["url.query"] == "a=REDACTED"


@pytest.mark.anyio
async def test_redact_query_keys(spans: Any) -> None:
    options = opts({"FASTPROF_REDACT_QUERY_KEYS": "colour"})
    app = fastprof.instrument(starlette_app(), tracer_provider=spans.provider, **options)
    await request(app, "/x?colour=red&b=2")
    assert spans.server()[0].attributes["url.query"] == "colour=REDACTED&b=2"


def test_redact_query_keys_bad_value() -> None:
    with pytest.raises(ValueError, match="^FASTPROF_MAX_ATTRIBUTE_LENGTH"):
        check_environ({"FASTPROF_REDACT_QUERY_KEYS": "a", "FASTPROF_MAX_ATTRIBUTE_LENGTH": "1"})


@pytest.mark.anyio
async def test_disabled_leaves_the_app_alone() -> None:
    app = starlette_app()
    before = list(app.user_middleware)
    assert fastprof.config.instrument_from_env(app, {"FASTPROF_ENABLED": "false"}) is app
    assert app.user_middleware == before


# -- OTEL_* ---------------------------------------------------------------------------


def provider(env: dict[str, str]) -> Any:
    return setup_tracing_from_env({"OTEL_TRACES_EXPORTER": "none", **env}, set_global=False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("always_on", "AlwaysOnSampler"),
        ("always_off", "AlwaysOffSampler"),
        ("traceidratio", "TraceIdRatioBased{0.25}"),
        ("parentbased_always_on", "ParentBased{root:AlwaysOnSampler,"),
        ("parentbased_always_off", "ParentBased{root:AlwaysOffSampler,"),
        ("parentbased_traceidratio", "ParentBased{root:TraceIdRatioBased{0.25},"),
    ],
)
def test_otel_traces_sampler(value: str, expected: str) -> None:
    sampler = provider({"OTEL_TRACES_SAMPLER": value, "OTEL_TRACES_SAMPLER_ARG": "0.25"}).sampler
    assert sampler.get_description().startswith(expected)


def test_otel_traces_sampler_default_and_ratio() -> None:
    assert isinstance(provider({}).sampler, sampling.ParentBased)
    ratio = provider({"OTEL_TRACES_SAMPLER": "traceidratio"}).sampler
    assert ratio.rate == 1.0


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("OTEL_SDK_DISABLED", "nope", "true or false"),
        ("OTEL_TRACES_SAMPLER", "jaeger_remote", "one of"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5", "between 0 and 1"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "otlp, console or none"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team", "key=value"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "http(s) URL"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://c/v1/traces", "http(s) URL"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "one of http/protobuf, grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp", "one of http/protobuf, grpc"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key", "key=value"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "=x", "key=value"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli", "one of gzip, deflate, none"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd", "one of gzip, deflate, none"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "10000", "seconds between 0.001 and 60"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "soon", "a number"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0", "milliseconds"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0", "between 1 and"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100000", "OTEL_BSP_MAX_QUEUE_SIZE"),
        ("FASTPROF_APP", "main", "module:attribute"),
    ],
)
def test_otel_bad_values_fail_naming_the_variable(name: str, bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: ") as info:
        check_environ({name: bad})
    assert message in str(info.value)
    if "HEADERS" in name:
        assert bad not in str(info.value)  # may hold an API key


def test_otel_sdk_disabled_sets_nothing_up() -> None:
    assert setup_tracing_from_env({"OTEL_SDK_DISABLED": "true"}, set_global=False) is None
    assert provider({"OTEL_SDK_DISABLED": "false"}) is not None


def test_service_name_and_resource_attributes() -> None:
    import os

    resource = provider(
        {
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,deployment.environment=prod,"
            "team=a%20b",
            "OTEL_SERVICE_NAME": "orders",
        }
    ).resource.attributes
    assert resource["service.name"] == "orders"  # OTEL_SERVICE_NAME wins
    assert resource["deployment.environment"] == "prod"
    assert resource["team"] == "a b"
    assert resource["process.pid"] == os.getpid()
    assert provider({}).resource.attributes["service.name"].startswith("unknown_service")
    shared = fastprof.config.resource_from_env({"OTEL_SERVICE_NAME": "orders"}).attributes
    assert (shared["service.name"], shared["process.pid"]) == ("orders", os.getpid())


def test_configured_provider_is_never_replaced() -> None:
    """A non-proxy global provider (yours, opentelemetry-instrument's) is left alone."""
    import subprocess
    import sys

    script = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "mine = TracerProvider(); trace.set_tracer_provider(mine)\n"
        "from fastprof.config import setup_tracing_from_env\n"
        "assert setup_tracing_from_env({'OTEL_SERVICE_NAME': 'x'}) is None\n"
        "assert trace.get_tracer_provider() is mine\n"
    )
    assert subprocess.run([sys.executable, "-c", script], timeout=20).returncode == 0


def _export_one(env: dict[str, str]) -> None:
    tp = setup_tracing_from_env(env, set_global=False)
    tp.get_tracer("t").start_span("one").end()
    assert tp.force_flush(5000)
    tp.shutdown()


@pytest.mark.parametrize("specific", [False, True])
def test_otlp_endpoint_headers_compression(specific: bool) -> None:
    """The general variables (base endpoint + /v1/traces) and the traces-specific ones
    (used as-is, and winning over the general ones)."""
    prefix = "OTEL_EXPORTER_OTLP_TRACES_" if specific else "OTEL_EXPORTER_OTLP_"
    with otlp_receiver() as (endpoint, received):
        env = {
            f"{prefix}ENDPOINT": endpoint if specific else endpoint.removesuffix("/v1/traces"),
            f"{prefix}HEADERS": "api-key=s%3Dcret,x-team=blue",
            f"{prefix}COMPRESSION": "gzip",
            f"{prefix}PROTOCOL": "http/protobuf",
            f"{prefix}TIMEOUT": "2",
        }
        if specific:  # the general ones lose
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
            env["OTEL_EXPORTER_OTLP_HEADERS"] = "x-team=red"
        _export_one(env)
    assert [s.name for _, s in received.spans()] == ["one"]
    headers = received.headers[0]
    assert headers["api-key"] == "s=cret"
    assert headers["x-team"] == "blue"
    assert headers["content-encoding"] == "gzip"


@pytest.mark.parametrize("name", ["OTEL_EXPORTER_OTLP_TIMEOUT",
                                  "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"])
def test_otlp_timeout_is_in_seconds(name: str) -> None:
    """A collector that never answers: one export gives up after the timeout (seconds)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        tp = setup_tracing_from_env(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
                    f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces",
                name: "0.3",
                "FASTPROF_SHUTDOWN_TIMEOUT_S": "10",
            },
            set_global=False,
        )
        tp.get_tracer("t").start_span("one").end()
        started = time.monotonic()
        tp.force_flush(10_000)
        assert time.monotonic() - started < 3
        tp.shutdown()
    finally:
        listener.close()


def test_batch_processor_variables() -> None:
    with otlp_receiver() as (endpoint, received):
        tp = setup_tracing_from_env(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_BSP_MAX_QUEUE_SIZE": "10",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
            },
            set_global=False,
        )
        tracer = tp.get_tracer("t")
        for i in range(30):
            tracer.start_span(f"s{i}").end()
        # The 50 ms schedule exports without a flush; batches hold 2 spans; the queue
        # holds 10, so some of the 30 spans ended at once were dropped.
        deadline = time.monotonic() + 5
        while not received.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert received.requests
        tp.force_flush(5000)
        assert all(len(r.resource_spans[0].scope_spans[0].spans) <= 2 for r in received.requests)
        assert len(received.spans()) <= 12
        tp.shutdown()


def test_console_exporter(capsys: pytest.CaptureFixture[str]) -> None:
    tp = setup_tracing_from_env({"OTEL_TRACES_EXPORTER": "console,none"}, set_global=False)
    tp.get_tracer("t").start_span("printed").end()
    assert "printed" in capsys.readouterr().out
    tp.shutdown()


def test_grpc_protocol_exports_to_a_real_grpc_receiver() -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc (the grpc extra): endpoint used as-is, headers
    as metadata; gzip accepted (gRPC hides the encoding from the servicer)."""
    from tests._otlp_grpc_receiver import otlp_grpc_receiver

    with otlp_grpc_receiver() as (endpoint, received):
        _export_one(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_HEADERS": "api-key=k1",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
                "OTEL_SERVICE_NAME": "over-grpc",
            }
        )
    [(resource, span)] = received.spans()
    assert span.name == "one"
    assert resource["service.name"] == "over-grpc"
    assert received.metadata[0]["api-key"] == "k1"


def test_grpc_protocol_validation() -> None:
    with pytest.raises(ValueError, match="^OTEL_EXPORTER_OTLP_COMPRESSION"):
        check_environ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                       "OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"})


def test_a_missing_exporter_extra_fails_at_start_up_naming_it() -> None:
    """Without the grpc extra, grpc fails at start-up (in check_environ, before workers)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['opentelemetry.exporter.otlp.proto.grpc'] = None\n"
        "sys.modules['opentelemetry.exporter.otlp.proto.grpc.trace_exporter'] = None\n"
        "from fastprof.config import check_environ\n"
        "try:\n"
        "    check_environ({'OTEL_EXPORTER_OTLP_PROTOCOL': 'grpc'})\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=20)
    assert "pip install 'fastprof-asgi[grpc]'" in out.stdout, out.stderr


def test_span_attributes_are_bounded() -> None:
    with otlp_receiver() as (endpoint, received):
        tp = setup_tracing_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint},
                                    set_global=False)
        span = tp.get_tracer("t").start_span("big")
        span.set_attribute("blob", "x" * 10_000)
        span.end()
        tp.force_flush(5000)
        tp.shutdown()
    assert len(span_attributes(received.spans()[0][1])["blob"]) == 4096
