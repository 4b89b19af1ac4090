"""One SQLite file per host: every worker process's requests on any worker's page."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

import fastprof
from fastprof.dashboard import RequestFilter, SQLiteStore, dashboard_token
from tests.dashboard._app import SECRET
from tests.dashboard.test_bounds import _drive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.anyio
async def test_a_page_shows_the_requests_of_another_worker_process(tmp_path) -> None:
    path = str(tmp_path / "host.sqlite3")
    other = textwrap.dedent(
        f"""
        import fastprof
        from fastprof.dashboard import SQLiteStore
        from tests.dashboard.test_bounds import _drive
        dashboard = fastprof.Dashboard(secret={SECRET!r}, store=SQLiteStore({path!r}))
        _drive(dashboard.span_processor, 30)
        dashboard.close()
        """
    )
    subprocess.run([sys.executable, "-c", other], cwd=ROOT, check=True, timeout=60)
    store = SQLiteStore(path)
    dashboard = fastprof.Dashboard(secret=SECRET, store=store)
    _drive(dashboard.span_processor, 5, first=1000)  # this process's own
    pids = {r.pid for r in store.recent(RequestFilter(limit=100))}
    assert len(store) == 35 and len(pids) == 2 and os.getpid() in pids
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard.app()), base_url="http://testserver"
    ) as client:
        page = await client.get("/", headers={"authorization": f"Bearer {dashboard_token(SECRET)}"})
    assert page.status_code == 200
    assert page.text.count("<tr class='req'") == 35
    dashboard.close()


def test_a_request_stored_again_is_counted_once(tmp_path) -> None:
    store = SQLiteStore(str(tmp_path / "host.sqlite3"))
    dashboard = fastprof.Dashboard(secret=SECRET, store=store)
    _drive(dashboard.span_processor, 10)
    _drive(dashboard.span_processor, 10)  # the same span ids: replaced, not added
    count, size = store.totals()["requests"]
    assert count == len(store.recent(RequestFilter(limit=100))) == 10
    (row,) = store._connect().execute("SELECT sum(size) FROM requests").fetchall()
    assert size == row[0]
    dashboard.close()


def _full_store(path: str, count: int) -> tuple[SQLiteStore, list[str]]:
    """A store filled to ``max_count`` with requests of 10 routes (records built once, copied)."""
    import copy

    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

    from fastprof.dashboard._records import build_record
    from tests.dashboard.test_bounds import _span

    now = time.time_ns()
    root_ctx = SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(1))
    dep = _span("dependency get_db", 1, 2, root_ctx, now + 10_000, now + 400_000,
                attributes={"fastprof.dependency.kind": "async"})
    root = _span("GET /r", 1, 1, None, now, now + 1_000_000, SpanKind.SERVER,
                 {"http.route": "/r", "url.path": "/r", "http.response.status_code": 200})
    template = build_record(root, [dep], slow_s=1.0)
    assert template is not None
    store = SQLiteStore(path, max_count=count)
    keys = []
    for batch in range(0, count, 5000):
        records = []
        for i in range(batch, batch + 5000):
            record = copy.copy(template)
            record.key = f"{i + 1:016x}"
            record.route = f"/r{i % 10}"
            record.path = f"/r{i % 10}/{i}"
            record.duration_s = (i % 1000) / 1000
            record.status = 500 if i % 97 == 0 else 200
            records.append(record)
            keys.append(record.key)
        store.add(records, [])
    return store, keys


@pytest.mark.anyio
async def test_pages_answer_fast_with_a_full_store(tmp_path) -> None:
    store, keys = _full_store(str(tmp_path / "full.sqlite3"), 20_000)
    assert len(store) == 20_000
    dashboard = fastprof.Dashboard(secret=SECRET, store=store)
    auth = {"authorization": f"Bearer {dashboard_token(SECRET)}"}
    timings = {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard.app()), base_url="http://testserver"
    ) as client:
        for name, url in {
            "list": "/",
            "filtered": "/?route=/r3&min_ms=900&status=2",
            "errors": "/?status=5",
            "request": f"/requests/{keys[12_345]}",
            "route": "/route?route=/r3",
        }.items():
            started = time.perf_counter()
            response = await client.get(url, headers=auth)
            timings[name] = time.perf_counter() - started
            assert response.status_code == 200, name
    print({k: f"{v * 1000:.0f} ms" for k, v in timings.items()})
    assert max(timings.values()) < 1.0, timings  # milliseconds on an idle machine
    dashboard.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_requests_older_than_the_ttl_are_dropped(tmp_path, kind) -> None:
    from fastprof.dashboard import MemoryRequestStore

    now = [0.0]

    def clock() -> float:
        return time.time() + now[0]

    store = (
        SQLiteStore(str(tmp_path / "ttl.sqlite3"), ttl_s=60, clock=clock)
        if kind == "sqlite"
        else MemoryRequestStore(ttl_s=60, clock=clock)
    )
    dashboard = fastprof.Dashboard(secret=SECRET, store=store)
    _drive(dashboard.span_processor, 5, ago_s=50)
    assert len(store.recent(RequestFilter())) == 5
    now[0] = 11  # the clock moves on: they are 61 s old
    assert store.recent(RequestFilter()) == []
    _drive(dashboard.span_processor, 1, first=100, ago_s=-11)  # a write prunes the old ones
    assert len(store) == 1
    dashboard.close()
