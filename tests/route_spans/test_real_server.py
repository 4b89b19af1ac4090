"""Behaviour that needs a real server: concurrency, keep-alive, pipelining, disconnects."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry.trace import SpanKind

import fastprof
from fastprof.testing import SpanRecorder as Spans
from tests._server import serve

pytestmark = pytest.mark.server


def make_app(spans: Spans, events: list[str]) -> FastAPI:
    kwargs: dict[str, Any] = {}
    if "telemetry" in FastAPI.__init__.__code__.co_varnames:
        kwargs["telemetry"] = {"tracing": False}
    app = FastAPI(**kwargs)

    @app.get("/work/{n}")
    async def work(n: int) -> dict[str, int]:
        await asyncio.sleep(0.01 * (n % 5))
        return {"n": n}

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @app.get("/hang")
    async def hang(request: Request) -> dict[str, str]:
        for _ in range(300):
            if await request.is_disconnected():
                events.append("disconnect-seen")
                return {"state": "gone"}
            await asyncio.sleep(0.01)
        return {"state": "timeout"}

    return fastprof.instrument(app, tracer_provider=spans.provider)


def test_concurrent_requests_keep_their_own_trace(spans: Spans) -> None:
    """B-01: 100 concurrent requests over 10 keep-alive connections, each its own parent."""
    app = make_app(spans, [])
    with serve(app) as base:

        async def run() -> None:
            limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

                async def one(i: int) -> None:
                    tp = f"00-{i + 1:032x}-{i + 1:016x}-01"
                    r = await client.get(f"/work/{i}", headers={"traceparent": tp})
                    assert r.json() == {"n": i}

                await asyncio.gather(*(one(i) for i in range(100)))

        asyncio.run(run())
    servers = spans.server()
    assert len(servers) == 100
    for span in servers:
        n = int(span.attributes["url.path"].rsplit("/", 1)[1])  # type: ignore[union-attr]
        assert span.context.trace_id == n + 1  # type: ignore[union-attr]
        assert span.parent is not None and span.parent.span_id == n + 1
    assert all(s.kind == SpanKind.SERVER for s in servers)


def test_large_body_then_plain_request_does_not_leak_context(spans: Spans) -> None:
    """B-02 (contrib#2852): after a >64 KiB upload, the next request is a new root."""
    app = make_app(spans, [])
    with serve(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        tp = f"00-{7:032x}-{7:016x}-01"
        assert client.post(
            "/upload", content=b"x" * 200_000, headers={"traceparent": tp}
        ).json() == {"size": 200_000}
        client.get("/work/1")
    upload, plain = spans.server()
    assert upload.context.trace_id == 7  # type: ignore[union-attr]
    assert plain.parent is None
    assert plain.context.trace_id != 7  # type: ignore[union-attr]


def test_pipelined_requests_each_get_their_own_span(spans: Spans) -> None:
    app = make_app(spans, [])
    with serve(app) as base:
        host, port = urlsplit(base).hostname, urlsplit(base).port
        tp = f"00-{9:032x}-{9:016x}-01"
        raw = (
            f"GET /work/1 HTTP/1.1\r\nHost: x\r\ntraceparent: {tp}\r\n\r\n"
            "GET /work/2 HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /work/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ).encode()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(raw)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 200") == 3
    first, second, third = sorted(spans.server(), key=lambda s: s.start_time or 0)
    assert first.context.trace_id == 9  # type: ignore[union-attr]
    assert second.parent is None and third.parent is None
    assert len({s.context.trace_id for s in (first, second, third)}) == 3  # type: ignore[union-attr]


def test_client_disconnect_is_seen_by_the_app_and_recorded(spans: Spans) -> None:
    """request.is_disconnected() still fires through fastprof; the span ends once."""
    events: list[str] = []
    app = make_app(spans, events)
    with serve(app) as base:
        host, port = urlsplit(base).hostname, urlsplit(base).port
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while not spans.server() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert events == ["disconnect-seen"]
    (span,) = spans.server()
    assert span.attributes is not None
    assert span.attributes["http.route"] == "/hang"
    # The app answered after the client had gone: the span says so.
    assert span.attributes["fastprof.client_disconnected"] is True


def test_concurrent_profiles_on_a_real_server_hold_only_their_own_frames(spans: Spans) -> None:
    """Three profiled requests at once on uvicorn (async work on the loop, a sync dependency
    and a sync endpoint in the thread pool): each profile has its own hot function only."""
    from fastprof.profiling import _documents
    from tests.profiling._profiling_support import SECRET, frames_of
    from tests.profiling._profiling_support import make_app as make_profiled_app

    profiling = fastprof.Profiling(secret=SECRET, max_concurrent=3)
    app = make_profiled_app(profiling, spans)
    hot = {"/alpha": "async_hot_alpha", "/gamma": "sync_hot_gamma", "/delta": "sync_hot_delta"}
    with serve(app) as base:

        async def run() -> dict[str, str]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:

                async def one(path: str) -> tuple[str, str]:
                    token = fastprof.profiling.mint_token(SECRET)
                    r = await client.get(path, headers={"X-Fastprof-Profile": token})
                    assert r.status_code == 200
                    return path, r.headers["x-fastprof-profile-id"]

                return dict(await asyncio.gather(*(one(path) for path in hot)))

        ids = asyncio.run(run())
    for path, function in hot.items():
        frames = frames_of(profiling, ids[path])
        assert function in frames, (path, sorted(frames))
        others = set(hot.values()) - {function}
        assert not others & frames, (path, others & frames)
    assert profiling.stats()["started"] == 3
    # They did run at once: the three profiles overlap in time.
    sessions = [_documents.decode(profiling.store.get(i) or b"")[1] for i in ids.values()]
    assert max(s.start_time for s in sessions) < min(s.start_time + s.duration for s in sessions)
