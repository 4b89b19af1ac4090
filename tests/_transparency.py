"""Differential transparency kit.

Drive the same application with and without fastprof through a recording ASGI
driver and compare every message the application sends (type, status, every
header in order, body bytes, ``more_body`` flags), plus the exception that
escapes, if any. Later features reuse :func:`assert_transparent`.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import ASGIApp, Message

AppFactory = Callable[[bool], ASGIApp]


@dataclass
class Recording:
    """What the application did for one driven request/connection."""

    sent: list[Message] = field(default_factory=list)
    exception: tuple[type[BaseException], str] | None = None
    exception_object: BaseException | None = None
    #: The lifespan state the app left (``drive_lifespan``).
    state: dict[str, Any] = field(default_factory=dict)


def _http_scope(
    method: str,
    path: str,
    query: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": dict(state or {}),  # a server copies the lifespan state per request
    }


async def drive_http(
    app: ASGIApp,
    method: str = "GET",
    path: str = "/",
    *,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body_chunks: Sequence[bytes] = (b"",),
    hang_up: bool = False,
    state: dict[str, Any] | None = None,
) -> Recording:
    """Send one HTTP request through ``app`` and record every message it sends.

    After the body, ``receive`` waits for the response to complete before it
    reports ``http.disconnect`` (or reports it at once with ``hang_up``).
    """
    rec = Recording()
    done = anyio.Event()
    chunks = list(body_chunks)
    scope = _http_scope(method, path, query, headers, state)

    async def receive() -> Message:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        if not hang_up:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        rec.sent.append(copy.deepcopy(message))
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    try:
        await _run(rec, app, scope, receive, send)
    finally:
        done.set()
    return rec


async def drive_websocket(app: ASGIApp, path: str, inbound: Sequence[Message]) -> Recording:
    """Open a websocket, feed ``inbound`` messages after the connect, record what is sent."""
    rec = Recording()
    queue: list[Message] = [{"type": "websocket.connect"}, *inbound]
    closed = anyio.Event()
    scope = _http_scope("GET", path, b"", [])
    scope.update({"type": "websocket", "scheme": "ws", "subprotocols": []})
    del scope["method"]

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await closed.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        rec.sent.append(copy.deepcopy(message))
        if message["type"] == "websocket.close":
            closed.set()

    await _run(rec, app, scope, receive, send)
    return rec


async def drive_lifespan(app: ASGIApp) -> Recording:
    """Run startup and shutdown and record the server-bound messages."""
    rec = Recording()
    inbound: list[Message] = [{"type": "lifespan.startup"}]
    step = anyio.Event()
    state: dict[str, Any] = {}

    async def receive() -> Message:
        if inbound:
            return inbound.pop(0)
        await step.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        rec.sent.append(copy.deepcopy(message))
        if message["type"].startswith("lifespan.startup"):
            step.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
    await _run(rec, app, scope, receive, send)
    rec.state = state
    return rec


async def _run(rec: Recording, app: ASGIApp, scope: Any, receive: Any, send: Any) -> None:
    """Run the app (5 s at most), recording the exception that escapes it, if any."""
    try:
        with anyio.fail_after(5):
            await app(scope, receive, send)
    except BaseException as exc:  # recorded, compared
        rec.exception = (type(exc), str(exc))
        rec.exception_object = exc


Driver = Callable[[ASGIApp], Awaitable[Recording]]


async def assert_transparent(factory: AppFactory, driver: Driver) -> tuple[Recording, Recording]:
    """Run ``driver`` on ``factory(False)`` and ``factory(True)``; assert identical recordings."""
    bare = await driver(factory(False))
    instrumented = await driver(factory(True))
    assert instrumented.sent == bare.sent, (
        f"ASGI messages differ\n  bare:         {bare.sent}\n  instrumented: {instrumented.sent}"
    )
    assert instrumented.exception == bare.exception
    return bare, instrumented


async def garbage_after_requests(app: ASGIApp, path: str, warmup: int = 20, count: int = 50) -> int:
    """Objects the collector frees after ``count`` GETs of ``path`` run with it disabled
    (0: the requests made no reference cycles). Each response must be a 200."""
    import gc

    for _ in range(warmup):
        await drive_http(app, "GET", path)
    gc.collect()
    gc.disable()
    try:
        for _ in range(count):
            rec = await drive_http(app, "GET", path)
            assert rec.sent[0]["status"] == 200
        return gc.collect()
    finally:
        gc.enable()
