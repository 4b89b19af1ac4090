"""fastprof.prometheus in one process: what /metrics exposes, bounded labels, the endpoint."""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from prometheus_client.parser import text_string_to_metric_families

import fastprof
from fastprof import _internal_errors
from fastprof.profiling import bearer_auth, mint_token
from fastprof.prometheus import PrometheusMetrics

SECRET = "prometheus-test-secret-" + "y" * 32


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def build(metrics: PrometheusMetrics, spans: Any, **options: Any) -> FastAPI:
    app = FastAPI()

    def user_id() -> int:  # sync: runs in the thread pool
        return 7

    @app.get("/items/{item_id}")
    async def item(item_id: int, user: int = Depends(user_id)) -> dict[str, int]:
        return {"item": item_id, "user": user}

    @app.get("/block")
    async def block() -> dict[str, str]:
        time.sleep(0.15)  # blocks the event loop
        return {}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.add_route("/metrics", metrics.app(), include_in_schema=False)
    return fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        metrics=metrics,
        exclude=["/metrics"],
        **options,
    )


@pytest.mark.anyio
async def test_requests_dependencies_loop_threadpool_and_profiles_are_exposed(spans) -> None:
    """One scrape shows request durations by route template (404s as ``_unmatched``,
    unhandled exceptions as status ``none``), dependency durations by dependency, the
    time requests spent with the loop blocked, loop lag, thread-pool gauges, profiles
    taken and refused by reason and fastprof's internal errors; /metrics itself is
    not traced."""
    monitor = fastprof.LoopMonitor(threshold_s=0.05, max_reports_per_minute=0)
    profiling = fastprof.Profiling(secret=SECRET)
    metrics = PrometheusMetrics(sync_interval_s=0.0)
    app = build(metrics, spans, loop_monitor=monitor, profiling=profiling)
    async with client(app) as c:
        for item_id in (1, 2, 3):
            assert (await c.get(f"/items/{item_id}")).status_code == 200
        assert (await c.get("/nowhere")).status_code == 404
        assert (await c.get("/boom")).status_code == 500
        assert (await c.get("/block")).status_code == 200
        taken = await c.get("/items/4", headers={"X-Fastprof-Profile": mint_token(SECRET)})
        assert "x-fastprof-profile-id" in taken.headers
        forged = mint_token("another-secret-" + "z" * 32)
        assert (await c.get("/items/5", headers={"X-Fastprof-Profile": forged})).status_code == 200
        _internal_errors.report("test.phase", RuntimeError("counted"))
        await anyio.sleep(0.1)  # a few heartbeats
        response = await c.get("/metrics")
    monitor.stop()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = parse(response.text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    count = "fastprof_http_request_duration_seconds_count"
    assert value(count, method="GET", route="/items/{item_id}", status="200") == 5
    assert value(count, method="GET", route="_unmatched", status="404") == 1
    assert value(count, method="GET", route="/boom", status="none") == 1
    dependency = "fastprof_dependency_duration_seconds_count"
    # Dependencies are named by their qualified name (as their spans are).
    assert value(dependency, dependency="build.<locals>.user_id", kind="dependency") == 5
    assert value(dependency, dependency="build.<locals>.item", kind="endpoint") == 5
    assert value("fastprof_loop_blocked_seconds_total", route="/block") >= 0.1
    assert value("fastprof_loop_lag_seconds_count") >= 1
    assert value("fastprof_loop_lag_seconds_sum") >= 0.1  # the 150 ms block shows as lag
    assert value("fastprof_threadpool_tokens_limit") == 40  # anyio's default
    assert value("fastprof_threadpool_tokens_used") == 0
    assert value("fastprof_profiles_total", outcome="started") == 1
    assert value("fastprof_profiles_refused_total", reason="forged") == 1
    assert value("fastprof_internal_errors_total", phase="test.phase") == 1
    assert ("fastprof_threadpool_wait_seconds_count", (("kind", "dependency"),)) in samples
    assert not [s for s in spans.server() if "/metrics" in str(s.attributes.get("url.path"))]
    assert len(spans.server()) == 8


@pytest.mark.anyio
async def test_label_values_are_bounded(spans) -> None:
    """Past ``max_routes`` a new route is ``_other``; a non-standard method is ``_OTHER``."""
    metrics = PrometheusMetrics(max_routes=1)
    app = build(metrics, spans)
    async with client(app) as c:
        await c.get("/items/1")
        await c.get("/block")
        await c.request("BREW", "/items/2")
        samples = parse((await c.get("/metrics")).text)
    routes = {
        (dict(labels)["method"], dict(labels)["route"])
        for name, labels in samples
        if name == "fastprof_http_request_duration_seconds_count"
    }
    assert routes == {
        ("GET", "/items/{item_id}"),
        ("GET", "_other"),
        ("_OTHER", "/items/{item_id}"),
    }


@pytest.mark.anyio
async def test_endpoint_auth_methods_and_openmetrics(spans) -> None:
    metrics = PrometheusMetrics(auth=bearer_auth("scrape-token"))
    app = build(metrics, spans)
    good = {"Authorization": "Bearer scrape-token"}
    async with client(app) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"Authorization": "Bearer no"})).status_code == 401
        assert (await c.post("/metrics", headers=good)).status_code == 405
        head = await c.head("/metrics", headers=good)
        assert head.status_code == 200 and head.content == b""
        open_metrics = await c.get(
            "/metrics", headers={**good, "Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")


def test_bad_options_fail_at_start_up_naming_the_option() -> None:
    with pytest.raises(ValueError, match="namespace"):
        PrometheusMetrics(namespace="not a name")
    with pytest.raises(ValueError, match="buckets"):
        PrometheusMetrics(buckets=(1.0, 0.5))
    with pytest.raises(ValueError, match="max_routes"):
        PrometheusMetrics(max_routes=0)
    with pytest.raises(ValueError, match="auth"):
        PrometheusMetrics(auth="token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metrics"):
        fastprof.instrument(FastAPI(), metrics=object())  # type: ignore[arg-type]


def test_without_the_extra_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"fastprof-asgi\[prometheus\]"):
        PrometheusMetrics()


def test_importing_fastprof_does_not_import_prometheus_client() -> None:
    """prometheus_client picks its multi-process mode when first imported: fastprof must
    not import it before the application creates a PrometheusMetrics."""
    import subprocess

    script = "import sys, fastprof, fastprof.prometheus; print('prometheus_client' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
