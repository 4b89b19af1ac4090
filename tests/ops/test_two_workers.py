"""Two real uvicorn worker processes on 127.0.0.1 sharing one profile directory and one
Prometheus multi-process directory, as ``--workers 2`` on one host would."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from _ops_support import SECRET, servers
from prometheus_client.parser import text_string_to_metric_families

from fastprof.profiling import mint_token, viewer_token

HEADER = "X-Fastprof-Profile"
VIEWER = {"Authorization": f"Bearer {viewer_token(SECRET)}"}


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> Iterator[list[str]]:
    base = tmp_path_factory.mktemp("workers")
    (base / "prom").mkdir()
    env = {"OPS_STORE_DIR": str(base / "profiles"), "PROMETHEUS_MULTIPROC_DIR": str(base / "prom")}
    with servers(env) as started:
        yield [url for url, _ in started]


def test_a_token_used_on_one_worker_is_refused_by_the_other(workers) -> None:
    """A token profiles once, on whichever worker sees it first; every later use, on
    either worker, is served unprofiled."""
    a, b = workers
    token = mint_token(SECRET)
    first = httpx.get(f"{a}/work/1", headers={HEADER: token})
    replay = httpx.get(f"{b}/work/2", headers={HEADER: token})
    again = httpx.get(f"{a}/work/3", headers={HEADER: token})
    assert first.status_code == replay.status_code == again.status_code == 200
    assert first.json()["pid"] != replay.json()["pid"]  # two processes indeed
    assert "x-fastprof-profile-id" in first.headers
    assert "x-fastprof-profile-id" not in replay.headers
    assert "x-fastprof-profile-id" not in again.headers


def test_the_viewer_of_either_worker_lists_and_serves_both_workers_profiles(workers) -> None:
    a, b = workers
    ids = {
        httpx.get(f"{url}/work/5", headers={HEADER: mint_token(SECRET)}).headers[
            "x-fastprof-profile-id"
        ]
        for url in (a, b)
    }
    assert len(ids) == 2
    for url in (a, b):
        deadline = time.monotonic() + 10
        while True:  # each worker's writer thread stores its profile shortly after
            listed = httpx.get(f"{url}/_fastprof/profiles/?format=json", headers=VIEWER)
            assert listed.status_code == 200
            seen = {p["profile_id"] for p in listed.json()}
            if ids <= seen or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ids <= seen
        for profile_id in ids:
            served = httpx.get(f"{url}/_fastprof/profiles/{profile_id}", headers=VIEWER)
            assert served.status_code == 200
            assert served.headers["content-type"].startswith("text/html")


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_of_both_workers_are_served_by_either(workers) -> None:
    """Multi-process mode: each worker writes its values to PROMETHEUS_MULTIPROC_DIR and
    the endpoint of either worker sums them (parsed with prometheus_client's parser)."""
    a, b = workers
    key = (
        "fastprof_http_request_duration_seconds_count",
        (("method", "GET"), ("route", "/work/{n}"), ("status", "200")),
    )
    started_key = ("fastprof_profiles_total", (("outcome", "started"),))
    replayed_key = ("fastprof_profiles_refused_total", (("reason", "replayed"),))
    dependency = (
        "fastprof_dependency_duration_seconds_count",
        (("dependency", "token_scope"), ("kind", "dependency")),
    )
    before = _samples(a)
    for _ in range(3):
        assert httpx.get(f"{a}/work/7").status_code == 200
    for _ in range(2):
        assert httpx.get(f"{b}/work/8").status_code == 200
    token = mint_token(SECRET)
    assert "x-fastprof-profile-id" in httpx.get(f"{a}/work/9", headers={HEADER: token}).headers
    assert "x-fastprof-profile-id" not in httpx.get(f"{b}/work/9", headers={HEADER: token}).headers
    for url in (a, b):
        samples = _samples(url)
        assert samples[key] == before.get(key, 0.0) + 7
        assert samples[dependency] == before.get(dependency, 0.0) + 7
        assert samples[started_key] == before.get(started_key, 0.0) + 1  # taken on a
        assert samples[replayed_key] == before.get(replayed_key, 0.0) + 1  # refused on b
        # /metrics and /healthz are excluded: never traced, never counted.
        routes = {dict(labels).get("route") for _, labels in samples}
        assert "/metrics" not in routes and "/healthz" not in routes
