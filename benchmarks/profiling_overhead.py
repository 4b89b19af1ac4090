"""Per-request cost of fastprof's profiling, interleaved in one run (not a test).

Variants, each driving the same FastAPI app in-process through raw ASGI calls:

* ``fastprof``            fastprof without profiling
* ``fastprof_aa``         the same again (A/A: the noise floor)
* ``configured``          Profiling(secret=..., sample_rate=0) configured, no token sent
* ``triggered``           every request carries a valid token (profile + store)
* ``pyinstrument``        fastprof + a bare pyinstrument Profiler(async_mode="enabled")
                          around the app (pyinstrument's own capture, no rendering)
* ``pyinstrument_html``   the same + ``output_html()`` per request (pyinstrument's FastAPI recipe)

Usage: python benchmarks/profiling_overhead.py [--rounds 15] [--batch 200] [--work 20000]
Prints the median per-request microseconds of each variant and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from pyinstrument import Profiler

import fastprof
from fastprof.profiling import MemoryStore, mint_token

SECRET = "benchmark-secret-" + "x" * 32


def build(work: int, profiling: fastprof.Profiling | None, provider: TracerProvider) -> Any:
    app = FastAPI()

    @app.get("/work")
    async def endpoint() -> dict[str, int]:
        return {"n": sum(range(work))}

    fastprof.instrument(app, tracer_provider=provider, profiling=profiling)
    return app


class PyinstrumentCapture:
    """pyinstrument's documented recipe as pure ASGI; ``html`` also renders, as the recipe does."""

    def __init__(self, app: Any, html: bool = False) -> None:
        self.app = app
        self.html = html

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        profiler = Profiler(interval=0.001, async_mode="enabled")
        profiler.start()
        try:
            await self.app(scope, receive, send)
        finally:
            profiler.stop()
            if self.html:
                profiler.output_html()


SCOPE_BASE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/work",
    "raw_path": b"/work",
    "query_string": b"",
    "root_path": "",
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 8000),
}


async def call(app: Any, headers: list[tuple[bytes, bytes]]) -> None:
    scope = dict(SCOPE_BASE, headers=headers)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


async def run(rounds: int, batch: int, work: int) -> dict[str, float]:
    provider = TracerProvider()  # spans recorded, not exported
    profiling_on = fastprof.Profiling(
        secret=SECRET,
        max_concurrent=1,
        max_per_minute=10_000,
        max_token_ttl_s=3600,
        replay_cache_size=1_000_000,
        writer_queue_size=1024,
        store=MemoryStore(max_count=16),
    )
    variants: dict[str, tuple[Any, bool]] = {
        "fastprof": (build(work, None, provider), False),
        "fastprof_aa": (build(work, None, provider), False),
        "configured": (build(work, fastprof.Profiling(secret=SECRET), provider), False),
        "triggered": (build(work, profiling_on, provider), True),
        "pyinstrument": (PyinstrumentCapture(build(work, None, provider)), False),
        "pyinstrument_html": (PyinstrumentCapture(build(work, None, provider), html=True), False),
    }
    base_headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    results: dict[str, list[float]] = {name: [] for name in variants}
    for name, (app, _) in variants.items():  # warm-up
        for _ in range(20):
            await call(app, base_headers)
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            app, needs_token = variants[name]
            headers_list = [
                [*base_headers, (b"x-fastprof-profile", mint_token(SECRET).encode())]
                if needs_token
                else base_headers
                for _ in range(batch)
            ]
            start = time.perf_counter()
            for headers in headers_list:
                await call(app, headers)
            results[name].append((time.perf_counter() - start) / batch * 1e6)
            if needs_token:
                # let the writer catch up outside the timed section
                await asyncio.to_thread(profiling_on.flush, 30)
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--work", type=int, default=20_000, help="sum(range(N)) in the endpoint")
    args = parser.parse_args()
    medians = asyncio.run(run(args.rounds, args.batch, args.work))
    base = medians["fastprof"]
    for name, value in medians.items():
        print(f"{name:18s} {value:9.1f} us/request  x{value / base:.3f} vs fastprof")
    print(f"triggered / pyinstrument = {medians['triggered'] / medians['pyinstrument']:.3f}")


if __name__ == "__main__":
    main()
