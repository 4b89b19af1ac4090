"""The server process of the HTTP benchmark: one variant's app under a real uvicorn (1 worker).

``python -m benchmarks._http_server VARIANT --port P --loop uvloop|asyncio``

The app is wrapped in :class:`Control`, which answers ``/__bench/*`` itself (the app never
sees those requests) and counts the others. The driver uses it to read what only the
server process knows, for the window between ``/__bench/reset`` and ``/__bench/stats``:

* process CPU time (every thread: loop, thread pool, span processor, watchdog) per request;
* garbage collections per generation (``gc.callbacks``): how many, their total and longest
  pause, and the objects they freed (cyclic garbage: what reference counting could not free);
* blocks still allocated after the window (``sys.getallocatedblocks()`` after a full
  collection, against the same before): memory kept per request.

``/__bench/trace?on`` / ``?off`` trace each request's allocations with ``tracemalloc``
(sequential requests, outside the timed windows): per request, the memory the request had
allocated at its peak, and the blocks it left allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["Control", "main"]

_PREFIX = "/__bench/"


class _GcWatch:
    """Per-generation collection counts and pauses, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self._start = 0.0
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_s = [0.0, 0.0, 0.0]
        self.max_pause_s = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        gen = info["generation"]
        pause = time.perf_counter() - self._start
        self.collections[gen] += 1
        self.pause_s[gen] += pause
        self.collected[gen] += info["collected"]
        if pause > self.max_pause_s[gen]:
            self.max_pause_s[gen] = pause

    def snapshot(self) -> dict[str, Any]:
        return {
            "collections": list(self.collections),
            "pause_ms": [round(p * 1e3, 3) for p in self.pause_s],
            "max_pause_ms": [round(p * 1e3, 3) for p in self.max_pause_s],
            "collected": list(self.collected),
        }


class Control:
    """Outermost ASGI layer: the benchmark's control endpoints and a request counter."""

    def __init__(self, app: ASGIApp, variant: str, info: dict[str, Any]) -> None:
        self.app = app
        self.variant = variant
        self.info = info
        self.requests = 0
        self.gc = _GcWatch()
        self._window: dict[str, Any] = {}
        self.tracing = False
        self._trace: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(_PREFIX):
                await self._control(path[len(_PREFIX) :], scope, send)
                return
            self.requests += 1
            if self.tracing:
                await self._traced(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _traced(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The collector is off while tracing: GC-tracked objects allocated minus freed
        # (gc.get_count()[0]) is then exact; read at the response start, it is what the
        # request holds while in flight.
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        blocks = sys.getallocatedblocks()
        objects = gc.get_count()[0]
        held = [0]

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                held[0] = gc.get_count()[0] - objects
            await send(message)

        await self.app(scope, receive, counting_send)
        after, peak = tracemalloc.get_traced_memory()
        t = self._trace
        t["requests"] += 1
        t["peak_bytes"] += peak - before
        t["net_bytes"] += after - before
        t["net_blocks"] += sys.getallocatedblocks() - blocks
        t["held_objects"] += held[0]

    async def _control(self, action: str, scope: Scope, send: Send) -> None:
        body = self._act(action, scope.get("query_string", b"").decode())
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})

    def _act(self, action: str, query: str) -> dict[str, Any]:
        if action == "ping":
            return {"variant": self.variant, **self.info}
        if action == "reset":
            gc.collect()
            self._window = {
                "requests": self.requests,
                "cpu_s": time.process_time(),
                "wall_s": time.perf_counter(),
                "blocks": sys.getallocatedblocks(),
                "threads": threading.active_count(),
            }
            self.gc.reset()
            return {"ok": True}
        if action == "stats":
            w = self._window
            gcs = self.gc.snapshot()
            requests = self.requests - w["requests"]
            cpu = time.process_time() - w["cpu_s"]
            wall = time.perf_counter() - w["wall_s"]
            gc.collect()
            return {
                "requests": requests,
                "cpu_s": cpu,
                "wall_s": wall,
                "cpu_us_per_request": cpu / requests * 1e6 if requests else None,
                "gc": gcs,
                "retained_blocks": sys.getallocatedblocks() - w["blocks"],
                "threads": threading.active_count(),
            }
        if action == "trace":
            if query == "on":
                self._trace = dict.fromkeys(
                    ("requests", "peak_bytes", "net_bytes", "net_blocks", "held_objects"), 0
                )
                gc.collect()
                gc.disable()
                tracemalloc.start()
                self.tracing = True
                return {"ok": True}
            self.tracing = False
            tracemalloc.stop()
            gc.enable()
            t = self._trace
            n = t["requests"] or 1
            return {
                "requests": t["requests"],
                "peak_kib_per_request": t["peak_bytes"] / n / 1024,
                "net_bytes_per_request": t["net_bytes"] / n,
                "net_blocks_per_request": t["net_blocks"] / n,
                "held_objects_per_request": t["held_objects"] / n,
            }
        return {"error": f"unknown action {action!r}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._http_server")
    p.add_argument("variant")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() once the app is built (a tuning)"
    )
    args = p.parse_args(argv)

    import uvicorn

    from benchmarks.http_variants import Skip, build

    try:
        app = build(args.variant)
    except Skip as exc:
        print(json.dumps({"skipped": str(exc)}), flush=True)
        return 3
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    info = {"loop": args.loop, "http": http, "pid": os.getpid(), "gc_freeze": args.gc_freeze}
    if args.gc_freeze:
        # What a deployment can do after start-up: the objects built so far (modules,
        # the app) are never traversed again, so a full collection only visits the rest.
        gc.collect()
        gc.freeze()
    config = uvicorn.Config(
        Control(app, args.variant, info),
        host="127.0.0.1",
        port=args.port,
        loop=args.loop,
        http=http,
        workers=1,
        lifespan="on",
        access_log=False,
        log_level="warning",
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
