"""One variant run, in its own process: ``python -m benchmarks._worker '<json plan>'``.

Builds the variant's app, runs its lifespan, then for each endpoint drives the ASGI callable
directly (prebuilt scope, receive and send; no HTTP client, no sockets): warm-up, then
sequential requests, each timed. Optionally measures memory with tracemalloc afterwards.
Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message

__all__ = ["main", "run_plan"]

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": _ASGI,
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench.local"),
            (b"user-agent", b"fastprof-bench/1"),
            (b"accept", b"application/json"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _turn() -> None:
    """Let the event loop run its other callbacks between requests, as a server's loop does
    while it waits for the next request (otherwise a loop watchdog sees one endless block)."""
    await asyncio.sleep(0)


async def _receive() -> Message:
    return _REQUEST


async def _discard(message: Message) -> None:
    return None


class _Checker:
    """A ``send`` that records what a warm-up request returned."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


class _Lifespan:
    """Runs the app's lifespan in a background task for the duration of the benchmark."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        try:
            await self.app(scope, self._to_app.get, self._from_app.put)
        except Exception as exc:  # an app without lifespan support
            await self._from_app.put({"type": "lifespan.unsupported", "message": repr(exc)})

    async def _send(self, message_type: str) -> None:
        await self._to_app.put({"type": message_type})
        reply = await asyncio.wait_for(self._from_app.get(), timeout=30)
        if reply["type"].endswith(".failed"):
            raise RuntimeError(f"lifespan failed: {reply.get('message')}")

    async def startup(self) -> None:
        self._task = asyncio.create_task(self._run())
        await self._send("lifespan.startup")

    async def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            await self._send("lifespan.shutdown")
            await self._task


async def _drive(
    app: ASGIApp, template: dict[str, Any], n: int, send: Callable[[Message], Awaitable[None]]
) -> None:
    receive = _receive
    copy = template.copy
    for _ in range(n):
        await app(copy(), receive, send)
        await _turn()


async def _check(app: ASGIApp, template: dict[str, Any]) -> tuple[int | None, int]:
    checker = _Checker()
    await app(template.copy(), _receive, checker)
    if checker.status != 200 or not checker.body:
        raise RuntimeError(
            f"{template['path']}: unexpected response {checker.status} "
            f"{bytes(checker.body)[:200]!r}"
        )
    return checker.status, len(checker.body)


async def _time_endpoint(
    app: ASGIApp, template: dict[str, Any], requests: int, warmup: int
) -> dict[str, Any]:
    """Warm up, then time ``requests`` sequential requests one by one.

    The per-request median is robust to the preemptions a busy machine inflicts on a few
    requests; the mean (total time / requests) includes them, and garbage collection. The CPU
    time per request (process CPU time, all threads, over the whole run) ignores the time the
    process was not scheduled, so it holds up best when other work shares the machine.
    """
    status, size = await _check(app, template)
    await _drive(app, template, warmup, _discard)
    gc.collect()
    times = [0] * requests
    receive, send, copy, clock = _receive, _discard, template.copy, time.perf_counter_ns
    cpu_started = time.process_time_ns()
    started = clock()
    for i in range(requests):
        start = clock()
        await app(copy(), receive, send)
        times[i] = clock() - start
        await _turn()
    total = clock() - started
    cpu = time.process_time_ns() - cpu_started
    times.sort()
    return {
        "status": status,
        "response_bytes": size,
        "requests": requests,
        "median_us": statistics.median(times) / 1000,
        "mean_us": total / requests / 1000,
        "cpu_us": cpu / requests / 1000,
        "p10_us": times[requests // 10] / 1000,
        "p90_us": times[(requests * 9) // 10] / 1000,
    }


async def _memory_endpoint(app: ASGIApp, template: dict[str, Any], requests: int) -> dict[str, Any]:
    tracemalloc.start()
    try:
        await _drive(app, template, min(50, requests), _discard)
        gc.collect()
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await _drive(app, template, requests, _discard)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"requests": requests, "growth_bytes": current - base, "peak_bytes": peak - base}


async def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Run one variant as described by ``plan``; the result is JSON-serialisable."""
    from benchmarks.variants import VARIANTS, SetupContext, Skip

    variant = VARIANTS[plan["variant"]]
    reason = variant.requires()
    if reason is not None:
        return {"variant": variant.name, "skipped": reason}
    ctx = SetupContext(processor=plan.get("processor", "simple"))
    try:
        app = variant.setup(ctx)
    except Skip as exc:
        return {"variant": variant.name, "skipped": str(exc)}
    lifespan = _Lifespan(app)
    await lifespan.startup()
    endpoints: dict[str, Any] = {}
    try:
        templates = {}
        for path in plan["endpoints"]:
            template = _scope(path)
            if lifespan.state:
                template["state"] = lifespan.state
            templates[path] = template
        # Import-time and start-up garbage is not the variant's per-request cost.
        gc.collect()
        gc.freeze()
        for path in plan["endpoints"]:
            spec = plan["requests"][path]
            endpoints[path] = await _time_endpoint(
                app, templates[path], spec, plan["warmup"].get(path, 0)
            )
        memory = plan.get("memory_requests", 0)
        if memory:
            for path in plan["endpoints"]:
                endpoints[path]["memory"] = await _memory_endpoint(app, templates[path], memory)
    finally:
        gc.unfreeze()
        await lifespan.shutdown()
        for provider in ctx.providers:
            provider.shutdown()
    return {"variant": variant.name, "endpoints": endpoints}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks._worker '<json plan>'", file=sys.stderr)
        return 2
    plan = json.loads(args[0])
    if plan.get("loop") == "uvloop":
        import uvloop

        result = uvloop.run(run_plan(plan))
    else:
        result = asyncio.run(run_plan(plan))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
