"""Helpers for the profiling tests: apps with hot functions, raw ASGI calls."""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.to_thread
import httpx
from fastapi import Depends, FastAPI
from starlette.responses import PlainTextResponse, StreamingResponse

import fastprof
from fastprof.hooks import run_in_worker
from fastprof.profiling import _documents

SECRET = "s" * 16 + "-test-secret-0123456789abcdef"  # >= 32 bytes
OTHER_SECRET = "o" * 40


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(200))


def sync_hot_beta(seconds: float = 0.15) -> int:
    spin(seconds)
    return 1


def sync_hot_gamma(seconds: float = 0.1) -> int:
    spin(seconds)
    return 2


def sync_hot_delta(seconds: float = 0.1) -> int:
    spin(seconds)
    return 4


async def async_hot_alpha(seconds: float = 0.15) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        spin(0.002)
        await anyio.sleep(0)


def gamma_dependency() -> int:
    """A sync dependency: FastAPI runs it in the thread pool, and fastprof's dependency
    instrumentation runs it through the profile's worker hook."""
    return sync_hot_gamma()


def make_app(
    profiling: fastprof.Profiling, spans: Any, hooks: tuple[fastprof.RequestHooks, ...] = ()
) -> FastAPI:
    app = FastAPI()

    @app.get("/alpha")
    async def alpha() -> dict[str, str]:
        await async_hot_alpha()
        return {"endpoint": "alpha"}

    @app.get("/beta")
    async def beta() -> dict[str, str]:
        state = fastprof.current_request.get()

        def work() -> int:
            if state is not None:
                return run_in_worker(state, sync_hot_beta)
            return sync_hot_beta()

        await anyio.to_thread.run_sync(work)
        return {"endpoint": "beta"}

    @app.get("/gamma")
    def gamma(value: int = Depends(gamma_dependency)) -> dict[str, int]:
        return {"value": value}

    @app.get("/delta")
    def delta() -> dict[str, int]:
        return {"value": sync_hot_delta()}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> PlainTextResponse:
        return PlainTextResponse(f"item {item_id}")

    @app.post("/items/{item_id}")
    async def post_item(item_id: int) -> PlainTextResponse:
        return PlainTextResponse(f"posted {item_id}")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> Any:
            for i in range(3):
                spin(0.005)
                yield f"chunk{i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await async_hot_alpha(0.3)
        return {"ok": True}

    fastprof.instrument(app, tracer_provider=spans.provider, profiling=profiling, hooks=hooks)
    return app


async def asgi_call(
    app: Any, path: str, headers: list[tuple[bytes, bytes]] | None = None, method: str = "GET"
) -> list[dict[str, Any]]:
    """Call the app directly; return every message it sent."""
    raw_path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def frames_of(profiling: fastprof.Profiling, profile_id: str) -> set[str]:
    """Function names in a stored profile."""
    assert profiling.flush(10)
    document = profiling.store.get(profile_id)
    assert document is not None, "profile not stored"
    _, session = _documents.decode(document)
    return {frame.split("\x00", 1)[0] for stack, _ in session.frame_records for frame in stack}


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")  # type: ignore[arg-type]
