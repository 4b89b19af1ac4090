"""The application's ASGI output is identical with and without fastprof."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import pytest
from fastapi import BackgroundTasks, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

import fastprof
from tests._transparency import (
    Recording,
    assert_transparent,
    drive_http,
    drive_lifespan,
    drive_websocket,
)

pytestmark = pytest.mark.anyio


class AppError(Exception):
    pass


class Handled(Exception):
    pass


def _provider(sampled: bool = True) -> TracerProvider:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    tp = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    tp.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return tp


def everything() -> dict[str, Any]:
    """Every fastprof feature on, profiling every request (sample_rate=1.0)."""
    return {
        "profiling": fastprof.Profiling(
            secret="transparency-secret-" + "x" * 32,
            sample_rate=1.0,
            max_per_minute=10_000,
            max_concurrent=4,
        ),
        "loop_monitor": fastprof.LoopMonitor(threshold_s=0.1),
        "slow_requests": fastprof.SlowRequestLog(threshold_s=0.0, level="debug"),
    }


def production_options(dependencies: Literal["traced", "all"]) -> dict[str, Any]:
    """The production configuration: every feature on, profiling never triggered (no
    token, no sample rate), every request logged as slow. When nothing is sampled, an
    unsampled request is a ``WatchedRequest`` (``"traced"``, the default) or follows
    every hook as an ``UnsampledRequest`` (``"all"``)."""
    return {
        "profiling": fastprof.Profiling(secret="transparency-secret-" + "x" * 32),
        "loop_monitor": fastprof.LoopMonitor(threshold_s=0.1),
        "slow_requests": fastprof.SlowRequestLog(
            threshold_s=0.0, level="debug", dependencies=dependencies
        ),
    }


def make_fastapi(
    native: bool = False,
    features: bool = False,
    sampled: bool = True,
    production: Literal["traced", "all"] | None = None,
) -> tuple[Callable[[bool], Any], dict[bool, list[str]]]:
    """An app factory covering the transparency matrix, plus its side-effect logs."""
    effects: dict[bool, list[str]] = {False: [], True: []}

    def factory(instrumented: bool) -> FastAPI:
        log = effects[instrumented]
        log.clear()

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
            log.append("startup")
            yield {"greeting": "hello"}
            log.append("shutdown")

        telemetry: dict[str, Any] = (
            {"tracer_provider": _provider()} if native else {"tracing": False}
        )
        kwargs: dict[str, Any] = {"lifespan": lifespan}
        if "telemetry" in FastAPI.__init__.__code__.co_varnames:
            kwargs["telemetry"] = telemetry
        app = FastAPI(**kwargs)

        @app.exception_handler(Handled)
        async def handled(request: Request, exc: Handled) -> Response:
            log.append("handler")
            return PlainTextResponse("handled", status_code=599, headers={"x-h": "1"})

        @app.get("/json")
        async def json_() -> dict[str, Any]:
            return {"a": 1, "b": [1, 2, 3]}

        @app.get("/state")
        async def state(request: Request) -> dict[str, Any]:
            return {"greeting": request.state.greeting}

        @app.post("/echo")
        async def echo(request: Request) -> Response:
            return Response(await request.body(), media_type="application/octet-stream")

        @app.get("/created", status_code=201)
        async def created() -> Response:
            return JSONResponse({"id": 1}, status_code=201, headers={"location": "/items/1"})

        @app.get("/nocontent", status_code=204)
        async def nocontent() -> Response:
            return Response(status_code=204)

        @app.get("/cookies")
        async def cookies() -> Response:
            r = PlainTextResponse("c")
            r.set_cookie("a", "1")
            r.set_cookie("b", "2")
            r.headers.append("x-dup", "1")
            r.headers.append("x-dup", "2")
            return r

        @app.get("/redirect")
        async def redirect() -> Response:
            return RedirectResponse("/json", status_code=307)

        @app.get("/stream")
        async def stream() -> StreamingResponse:
            async def gen() -> AsyncIterator[bytes]:
                for i in range(20):
                    await asyncio.sleep(0)
                    yield f"chunk{i}\n".encode()

            return StreamingResponse(gen(), media_type="text/plain")

        @app.get("/stream-fails")
        async def stream_fails() -> StreamingResponse:
            async def gen() -> AsyncIterator[bytes]:
                yield b"first"
                raise AppError("mid-stream")

            return StreamingResponse(gen())

        @app.get("/boom")
        async def boom() -> None:
            raise AppError("boom")

        @app.get("/handled")
        async def handled_route() -> None:
            raise Handled()

        @app.get("/http-error")
        async def http_error() -> None:
            raise HTTPException(status_code=418, detail="teapot", headers={"x-t": "1"})

        @app.get("/items/{item_id}")
        async def item(item_id: int, q: str | None = None) -> dict[str, Any]:
            return {"item_id": item_id, "q": q}

        @app.get("/background")
        async def background(tasks: BackgroundTasks) -> dict[str, str]:
            tasks.add_task(log.append, "background-ran")
            return {"queued": "yes"}

        @app.get("/sync")
        def sync() -> dict[str, str]:
            return {"sync": "yes"}

        @app.websocket("/ws")
        async def ws(websocket: WebSocket) -> None:
            await websocket.accept()
            text = await websocket.receive_text()
            await websocket.send_text(text.upper())
            await websocket.send_bytes(b"\x00\x01")
            await websocket.close(code=4001)

        if instrumented:
            extra = (
                everything()
                if features
                else production_options(production)
                if production is not None
                else {}
            )
            fastprof.instrument(app, tracer_provider=_provider(sampled), **extra)
        return app

    return factory, effects


HTTP_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/json", {}),
    ("/state", {"state": {"greeting": "hello"}}),  # what the lifespan yields
    ("/created", {}),
    ("/nocontent", {}),
    ("/cookies", {}),
    ("/redirect", {}),
    ("/stream", {}),
    ("/stream-fails", {}),
    ("/boom", {}),
    ("/handled", {}),
    ("/http-error", {}),
    ("/items/3", {"query": b"q=x&token=secret"}),
    ("/items/notanint", {}),
    ("/missing", {}),
    ("/sync", {}),
    ("/background", {}),
]


CONFIGS = {
    "native-off": {"native": False},
    "native-on": {"native": True},
    "all-features": {"native": False, "features": True},
    # Nothing sampled and no component needing unsampled requests: the lean path.
    "unsampled": {"native": False, "sampled": False},
    "unsampled-all-features": {"native": False, "features": True, "sampled": False},
    # Production: nothing sampled, every request slow; the slow-request log hears of
    # each one at its end (the default), or follows it with every hook ("all").
    "unsampled-production": {"native": False, "production": "traced", "sampled": False},
    "unsampled-production-all": {"native": False, "production": "all", "sampled": False},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("path", "options"), HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
async def test_http_messages_identical(path: str, options: dict[str, Any], config: str) -> None:
    factory, effects = make_fastapi(**CONFIGS[config])

    async def driver(app: Any) -> Recording:
        return await drive_http(app, "GET", path, **options)

    bare, _ = await assert_transparent(factory, driver)
    assert effects[True] == effects[False]
    if path == "/state":  # the request sees the lifespan state, with and without fastprof
        assert bare.sent[0]["status"] == 200
        assert bare.sent[1]["body"] == b'{"greeting":"hello"}'


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "DELETE", "FOO"])
async def test_other_methods_identical(method: str) -> None:
    factory, _ = make_fastapi()
    await assert_transparent(factory, lambda app: drive_http(app, method, "/json"))


async def test_request_body_in_chunks_identical() -> None:
    factory, _ = make_fastapi()
    bare, _ = await assert_transparent(
        factory, lambda app: drive_http(app, "POST", "/echo", body_chunks=[b"ab", b"cd", b"ef"])
    )
    assert bare.sent[1]["body"] == b"abcdef"


async def test_unhandled_exception_is_the_same_object() -> None:
    factory, _ = make_fastapi()
    rec = await drive_http(factory(True), "GET", "/boom")
    assert isinstance(rec.exception_object, AppError)
    assert str(rec.exception_object) == "boom"


async def test_exception_handler_runs_once() -> None:
    factory, effects = make_fastapi()
    await assert_transparent(factory, lambda app: drive_http(app, "GET", "/handled"))
    assert effects[True] == ["handler"]


async def test_background_task_runs_with_fastprof() -> None:
    factory, effects = make_fastapi()
    await assert_transparent(factory, lambda app: drive_http(app, "GET", "/background"))
    assert effects[True] == ["background-ran"]


@pytest.mark.parametrize("features", [False, True], ids=["route", "all-features"])
async def test_websocket_identical(features: bool) -> None:
    factory, _ = make_fastapi(features=features)
    bare, _ = await assert_transparent(
        factory,
        lambda app: drive_websocket(app, "/ws", [{"type": "websocket.receive", "text": "hi"}]),
    )
    assert {"type": "websocket.send", "text": "HI"} in [
        {k: v for k, v in m.items() if v is not None} for m in bare.sent
    ]


@pytest.mark.parametrize("features", [False, True], ids=["route", "all-features"])
async def test_lifespan_identical_and_state_preserved(features: bool) -> None:
    factory, effects = make_fastapi(features=features)
    bare, inst = await assert_transparent(factory, drive_lifespan)
    assert [m["type"] for m in inst.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert effects[True] == ["startup", "shutdown"]
    assert inst.state == bare.state == {"greeting": "hello"}


async def test_lifespan_startup_failure_identical() -> None:
    def factory(instrumented: bool) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            raise RuntimeError("db unreachable")
            yield

        app = Starlette(lifespan=lifespan)
        if instrumented:
            fastprof.instrument(app, tracer_provider=_provider())
        return app

    bare, inst = await assert_transparent(factory, drive_lifespan)
    assert inst.sent[0]["type"] == "lifespan.startup.failed"


def make_starlette() -> Callable[[bool], Starlette]:
    async def hello(request: Request) -> Response:
        return PlainTextResponse(f"hello {request.path_params['name']}")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("x")
        await websocket.close()

    def factory(instrumented: bool) -> Starlette:
        app = Starlette(routes=[Route("/hello/{name}", hello), WebSocketRoute("/ws", ws)])
        if instrumented:
            fastprof.instrument(app, tracer_provider=_provider())
        return app

    return factory


@pytest.mark.parametrize("path", ["/hello/bob", "/nope"])
async def test_starlette_http_identical(path: str) -> None:
    await assert_transparent(make_starlette(), lambda app: drive_http(app, "GET", path))


async def test_starlette_websocket_identical() -> None:
    await assert_transparent(make_starlette(), lambda app: drive_websocket(app, "/ws", []))
