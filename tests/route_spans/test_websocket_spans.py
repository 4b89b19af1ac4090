"""Websocket sessions: one SERVER span each, dependency spans, blocks, nothing per message."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, WebSocket
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from structlog.testing import capture_logs

import fastprof
from fastprof import attributes as names
from fastprof.testing import SpanRecorder
from tests._transparency import drive_websocket

pytestmark = pytest.mark.anyio

HELLO = [{"type": "websocket.receive", "text": "a"}, {"type": "websocket.receive", "text": "b"}]


def _chat_app(spans: SpanRecorder, **options: Any) -> FastAPI:
    app = FastAPI()

    async def room_name(room: str) -> str:
        return room.upper()

    async def session() -> AsyncIterator[str]:
        yield "session"

    @app.websocket("/ws/{room}")
    async def chat(
        websocket: WebSocket, name: str = Depends(room_name), s: str = Depends(session)
    ) -> None:
        await websocket.accept()
        for _ in range(2):
            text = await websocket.receive_text()
            await websocket.send_text(f"{name}:{text}")
        await websocket.close(code=4001)

    return fastprof.instrument(app, tracer_provider=spans.provider, **options)


async def test_one_server_span_per_session_with_counts_and_close_code(spans: SpanRecorder) -> None:
    rec = await drive_websocket(_chat_app(spans), "/ws/lobby", HELLO)
    assert [m["type"] for m in rec.sent] == [
        "websocket.accept",
        "websocket.send",
        "websocket.send",
        "websocket.close",
    ]
    (server,) = spans.server()
    assert server.kind == SpanKind.SERVER
    assert server.name == "WEBSOCKET /ws/{room}"
    attrs = server.attributes or {}
    assert attrs["http.route"] == "/ws/{room}"
    assert attrs["url.scheme"] == "ws"
    assert attrs[names.WEBSOCKET_MESSAGES_RECEIVED] == 2
    assert attrs[names.WEBSOCKET_MESSAGES_SENT] == 2
    assert attrs[names.WEBSOCKET_ACCEPTED] is True
    assert attrs[names.WEBSOCKET_CLOSE_CODE] == 4001
    assert "error.type" not in attrs
    assert server.status.status_code != StatusCode.ERROR
    # No span per message: the session span and the dependency spans only.
    assert sorted(s.name for s in spans.all() if s is not server) == [
        "dependency _chat_app.<locals>.room_name",
        "dependency _chat_app.<locals>.session",
        "fastprof.dependencies",
        "teardown _chat_app.<locals>.session",
    ]


async def test_dependency_spans_of_a_websocket_route_nest_under_its_span(
    spans: SpanRecorder,
) -> None:
    await drive_websocket(_chat_app(spans), "/ws/lobby", HELLO)
    (server,) = spans.server()
    (phase,) = spans.named("fastprof.dependencies")
    assert phase.parent is not None and server.context is not None
    assert phase.parent.span_id == server.context.span_id
    assert phase.context is not None
    for name in ("room_name", "session"):
        (dep,) = spans.named(f"dependency _chat_app.<locals>.{name}")
        assert dep.parent is not None and dep.parent.span_id == phase.context.span_id
    (teardown,) = spans.named("teardown _chat_app.<locals>.session")
    assert teardown.parent is not None and teardown.parent.span_id == server.context.span_id


async def test_client_disconnect_code_is_recorded(spans: SpanRecorder) -> None:
    async def echo(websocket: Any) -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await websocket.send_text(message["text"])

    app = fastprof.instrument(
        Starlette(routes=[WebSocketRoute("/echo", echo)]), tracer_provider=spans.provider
    )
    inbound = [*HELLO, {"type": "websocket.disconnect", "code": 1001}]
    rec = await drive_websocket(app, "/echo", inbound)
    assert [m["type"] for m in rec.sent] == ["websocket.accept", "websocket.send", "websocket.send"]
    (server,) = spans.server()
    assert server.name == "WEBSOCKET /echo"  # plain Starlette routes too
    attrs = server.attributes or {}
    assert attrs[names.WEBSOCKET_CLOSE_CODE] == 1001
    assert attrs[names.WEBSOCKET_MESSAGES_RECEIVED] == 2
    assert attrs[names.WEBSOCKET_MESSAGES_SENT] == 2


async def test_an_error_in_the_session_is_recorded_and_propagates(spans: SpanRecorder) -> None:
    class Boom(Exception):
        pass

    async def broken(websocket: Any) -> None:
        await websocket.accept()
        await websocket.receive_text()
        raise Boom("session failed")

    app = fastprof.instrument(
        Starlette(routes=[WebSocketRoute("/broken", broken)]), tracer_provider=spans.provider
    )
    rec = await drive_websocket(app, "/broken", HELLO)
    assert isinstance(rec.exception_object, Boom)  # the same exception reaches the server
    (server,) = spans.server()
    attrs = server.attributes or {}
    assert attrs["error.type"].endswith("Boom")
    assert server.status.status_code == StatusCode.ERROR
    assert [e.name for e in server.events] == ["exception"]


async def test_a_refused_handshake_is_not_accepted(spans: SpanRecorder) -> None:
    async def refuse(websocket: Any) -> None:
        await websocket.close(code=1008)

    app = fastprof.instrument(
        Starlette(routes=[WebSocketRoute("/private", refuse)]), tracer_provider=spans.provider
    )
    rec = await drive_websocket(app, "/private", [])
    assert [m["type"] for m in rec.sent] == ["websocket.close"]
    attrs = spans.server()[0].attributes or {}
    assert attrs[names.WEBSOCKET_ACCEPTED] is False
    assert attrs[names.WEBSOCKET_CLOSE_CODE] == 1008


async def test_excluded_and_unsampled_sessions_get_no_span(spans: SpanRecorder) -> None:
    rec = await drive_websocket(_chat_app(spans, exclude=["/ws/lobby"]), "/ws/lobby", HELLO)
    assert len(rec.sent) == 4
    assert spans.all() == []
    provider = TracerProvider(sampler=ALWAYS_OFF)
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    fastprof.instrument(app, tracer_provider=provider)
    rec = await drive_websocket(app, "/ws", [])
    assert [m["type"] for m in rec.sent] == ["websocket.accept", "websocket.close"]


async def test_a_block_in_a_session_is_attributed_to_it(spans: SpanRecorder) -> None:
    monitor = fastprof.LoopMonitor(threshold_s=0.05)
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        time.sleep(0.3)  # blocks the loop inside the session
        await websocket.close()

    fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        loop_monitor=monitor,
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.0),
    )
    monitor.start()
    try:
        with capture_logs() as logs:
            await drive_websocket(app, "/ws", HELLO[:1])
    finally:
        monitor.stop()
    (server,) = spans.server()
    (event,) = [e for e in server.events if e.name == names.BLOCKED_EVENT]
    assert (event.attributes or {})["code.function.name"] == "ws"
    # A session's length is not slowness: no slow-request line for it.
    assert not [entry for entry in logs if entry.get("event") == "slow request"]


@pytest.mark.parametrize("code", [1000, 1001, 1006])
async def test_a_client_disconnect_is_a_close_not_an_error(spans: SpanRecorder, code: int) -> None:
    """The endpoint learns of the close by WebSocketDisconnect: no exception event; only an
    abnormal closure (1006) marks the span as failed."""
    from starlette.websockets import WebSocketDisconnect

    app = FastAPI()

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()

    fastprof.instrument(app, tracer_provider=spans.provider)
    rec = await drive_websocket(app, "/ws", [{"type": "websocket.disconnect", "code": code}])
    assert isinstance(rec.exception_object, WebSocketDisconnect)
    (server,) = spans.server()
    assert server.events == ()  # no exception event
    attrs = server.attributes or {}
    assert attrs[names.WEBSOCKET_CLOSE_CODE] == code
    failed = server.status.status_code == StatusCode.ERROR
    assert failed == (code == 1006)
