"""The dashboard stays bounded and never writes on the event loop.

The 100k-request tests drive the recorder (the span processor) directly with
finished spans shaped like fastprof's: much faster than serving 100k requests,
and the same code path from ``on_end`` to the store.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

import fastprof
from fastprof.dashboard import MemoryRequestStore, RequestFilter, SQLiteStore
from fastprof.dashboard._recorder import WRITER_THREAD_NAME
from fastprof.profiling import mint_token
from tests.dashboard._app import SECRET, create_app

N = 100_000
_FLAGS = TraceFlags(1)
_RESOURCE = Resource({"service.name": "bounds"})


def _span(
    name: str, trace_id: int, span_id: int, parent: SpanContext | None, start: int, end: int,
    kind: SpanKind = SpanKind.INTERNAL, attributes: dict[str, Any] | None = None,
) -> ReadableSpan:
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=_FLAGS),
        parent=parent,
        kind=kind,
        attributes=attributes or {},
        start_time=start,
        end_time=end,
        resource=_RESOURCE,
    )


def _drive(
    recorder: Any, count: int, flush_every: int = 5000, first: int = 0, ago_s: float = 0.0
) -> None:
    """``count`` requests of 2 spans each (a late teardown every 10th), as fastprof ends them,
    started ``ago_s`` seconds ago."""
    now = time.time_ns() - int(ago_s * 1e9)
    dep_attrs = {"fastprof.dependency.kind": "async", "code.function.name": "get_db"}
    teardown_attrs = {**dep_attrs, "fastprof.dependency.phase": "teardown", "pad": "x" * 200}
    for i in range(first, first + count):
        trace_id = (i + 1) << 16
        base = now + i * 1000
        s = (i + 1) << 8  # span ids: s + 1 (the request), s + 3, ...
        root = SpanContext(trace_id, s + 1, is_remote=False, trace_flags=_FLAGS)
        recorder.on_end(
            _span("dependency get_db", trace_id, s + 3, root, base + 10, base + 400,
                  attributes=dep_attrs)
        )
        attributes = {
            "http.route": "/items/{item_id}",
            "url.path": f"/items/{i}",
            "http.response.status_code": 200,
            "http.request.method": "GET",
            "user_agent.original": "y" * 200,
        }
        recorder.on_end(
            _span("GET /items/{item_id}", trace_id, s + 1, None, base, base + 1000,
                  SpanKind.SERVER, attributes)
        )
        if i % 10 == 0:
            recorder.on_end(
                _span("teardown get_db", trace_id, s + 5, root, base + 1000, base + 1500,
                      attributes=teardown_attrs)
            )
        if (i + 1 - first) % flush_every == 0:
            assert recorder.flush(60)
    assert recorder.flush(60)


def test_sqlite_file_stays_bounded_after_100k_requests(tmp_path) -> None:
    path = str(tmp_path / "dash.sqlite3")
    store = SQLiteStore(path, max_count=3000, max_bytes=512 * 1024)
    dashboard = fastprof.Dashboard(secret=SECRET, store=store, flush_interval_s=60)
    started = time.perf_counter()
    _drive(dashboard.span_processor, N)
    elapsed = time.perf_counter() - started
    stats = dashboard.stats()
    assert stats["recorded"] == N and stats["dropped"] == 0 and stats["failed"] == 0
    count, size = store.totals()["requests"]
    assert 0 < count <= 3000
    assert size <= 512 * 1024
    files = sum(
        os.path.getsize(path + suffix) for suffix in ("", "-wal", "-shm")
        if os.path.exists(path + suffix)
    )
    assert files < 16 * 1024 * 1024, files  # the caps, plus SQLite's pages, plus the WAL
    newest = store.recent(RequestFilter(limit=1))[0]
    assert newest.path == f"/items/{N - 1}"
    # A late teardown reached its request (in the same batch or through an update).
    assert any(dep[1] == "teardown" for dep in store.route_sample("/items/{item_id}")[1])
    assert dashboard.stats()["pending_spans"] == 0
    dashboard.close()
    print(f"100k requests into SQLite: {elapsed:.1f} s, file {files} bytes")


def test_memory_store_stays_bounded_after_100k_requests() -> None:
    store = MemoryRequestStore(max_count=2000, max_bytes=1024 * 1024)
    dashboard = fastprof.Dashboard(secret=SECRET, store=store, flush_interval_s=60)
    recorder = dashboard.span_processor
    _drive(recorder, 20_000)  # warm up: fill the store and the recorder's caches
    gc.collect()
    before = sys.getallocatedblocks()
    _drive(recorder, N - 20_000)
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert len(store) <= 2000 and store.bytes <= 1024 * 1024
    # The store was full already: 80k more requests leave as many objects alive.
    assert grown < 0.05 * before, (grown, before)
    assert recorder.stats()["recorded"] == N
    dashboard.close()


class _WatchedStore(SQLiteStore):
    """A real SQLite store that notes which thread each write runs in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list[threading.Thread] = []

    def add(self, records: Any, late: Any) -> None:
        self.threads.append(threading.current_thread())
        super().add(records, late)

    def put(self, meta: Any, document: bytes) -> None:
        self.threads.append(threading.current_thread())
        super().put(meta, document)


@pytest.mark.anyio
async def test_store_writes_never_run_on_the_event_loop(tmp_path) -> None:
    store = _WatchedStore(str(tmp_path / "dash.sqlite3"))
    provider = TracerProvider()
    profiling = fastprof.Profiling(secret=SECRET, store=store.profiles(), max_per_minute=100)
    dashboard = fastprof.Dashboard(secret=SECRET, store=store, profiles=store,
                                   flush_interval_s=0.01)
    provider.add_span_processor(dashboard.span_processor)
    app = create_app(provider, profiling)
    loop_thread = threading.current_thread()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        for i in range(20):
            headers = {"X-Fastprof-Profile": mint_token(SECRET, ttl_s=60)} if i % 5 == 0 else {}
            assert (await client.get(f"/items/{i}", headers=headers)).status_code == 200
            await anyio.sleep(0.005)
    await anyio.to_thread.run_sync(profiling.flush)
    assert await anyio.to_thread.run_sync(dashboard.flush)
    assert len(store) == 20 and len(store.list_profiles()) == 4
    assert store.threads
    assert all(t is not loop_thread for t in store.threads)
    names = {t.name for t in store.threads}
    assert names == {WRITER_THREAD_NAME, "fastprof-profile-writer"}
    dashboard.close()
    profiling.close()
    provider.shutdown()


def test_spans_of_no_request_wait_in_a_bounded_buffer(monkeypatch) -> None:
    """Spans whose trace has no request span (a background job's) are evicted, oldest first."""
    from fastprof.dashboard import _recorder

    monkeypatch.setattr(_recorder, "MAX_PENDING_TOTAL", 1000)
    dashboard = fastprof.Dashboard(secret=SECRET, flush_interval_s=60)
    recorder = dashboard.span_processor
    now = time.time_ns()
    for i in range(5000):
        parent = SpanContext(i + 1, 7, is_remote=False, trace_flags=_FLAGS)
        recorder.on_end(_span("job step", i + 1, 8 + i, parent, now, now + 10))
    stats = recorder.stats()
    assert stats["pending_spans"] <= 1000
    assert stats["spans_dropped"] == 5000 - stats["pending_spans"]
    _drive(recorder, 10)  # requests are still recorded
    assert recorder.stats()["recorded"] == 10
    dashboard.close()
