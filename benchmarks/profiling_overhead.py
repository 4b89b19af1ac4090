"""Per-request cost of fastprof's profiling, interleaved in one run (not a test).

Variants, each driving the same FastAPI app in-process through raw ASGI calls:

* ``fastprof``            fastprof without profiling
* ``fastprof_aa``         the same again (A/A: the noise floor)
* ``configured``          Profiling(secret=..., sample_rate=0) configured, no token sent
* ``triggered``           every request carries a valid token (profile + store)
* ``pyinstrument``        fastprof + a bare pyinstrument Profiler(interval=0.001,
                          async_mode="enabled") around the app, stopped when the
                          app returns (pyinstrument's own capture, no rendering)
* ``pyinstrument_at_send`` the same, stopped when the app hands over its last
                          response message (where fastprof's profile stops)
* ``pyinstrument_html``   ``pyinstrument`` + ``output_html()`` per request
                          (pyinstrument's FastAPI recipe)

Every variant has fastprof's SERVER span (route name and attributes); the
profiled variants sample at the same 1 ms interval.

What keeps ``triggered`` vs the bare captures like for like:

* The bare capture is an app middleware *inside* fastprof's middleware (where
  pyinstrument's FastAPI recipe, an ``@app.middleware("http")``, sits too), so
  it samples the app call, not fastprof's span bookkeeping around it. Wrapping
  fastprof from outside made pyinstrument sample more code than fastprof does.
* The app's messages pass through fastprof's middleware *inside* the app call,
  and fastprof's end-of-request work runs as the last one goes by. fastprof's
  profile stops before that work; ``pyinstrument`` stops after it (as a pure
  ASGI middleware must, unless it watches the messages), ``pyinstrument_at_send``
  before it. The triggered profile is compared with both.
* ``triggered``'s timed section ends when the writer thread has stored every
  profile of the batch (``flush``): encoding and storing are part of a profile's
  cost even though they run off the event loop, and the writer competes with
  the requests for the GIL. Flushing outside the timed section left the tail of
  that work unmeasured.

Usage: python benchmarks/profiling_overhead.py [--rounds 15] [--batch 200] [--work 20000]
Prints the median per-request microseconds of each variant, then the paired
per-round ratios the targets are judged by (``triggered / pyinstrument`` and
``triggered / pyinstrument_at_send``: the triggered profile against
pyinstrument's own capture; ``configured / fastprof`` against ``fastprof_aa /
fastprof``, the A/A noise).
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


def build(
    work: int,
    profiling: fastprof.Profiling | None,
    provider: TracerProvider,
    capture: dict[str, bool] | None = None,
) -> Any:
    """The app; with ``capture`` (PyinstrumentCapture's options), a bare capture inside fastprof."""
    app = FastAPI()

    @app.get("/work")
    async def endpoint() -> dict[str, int]:
        return {"n": sum(range(work))}

    if capture is not None:
        app.add_middleware(PyinstrumentCapture, **capture)
    # Added last, fastprof's middleware is the outermost: the capture runs inside it.
    fastprof.instrument(app, tracer_provider=provider, profiling=profiling)
    return app


class PyinstrumentCapture:
    """pyinstrument's documented recipe as pure ASGI; ``html`` also renders, as the recipe does.

    With ``at_send``, the profile stops when the app hands over its last body
    message (before passing it on), where fastprof's profile stops: the app's
    sends pass through fastprof's middleware *inside* this call, so stopping
    after the app returns would also sample fastprof's end-of-request work.
    """

    def __init__(self, app: Any, html: bool = False, at_send: bool = False) -> None:
        self.app = app
        self.html = html
        self.at_send = at_send

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        profiler = Profiler(interval=0.001, async_mode="enabled")
        profiler.start()
        outer_send = send
        if self.at_send:

            async def send(message: Any) -> None:
                if (
                    profiler.is_running
                    and message["type"] == "http.response.body"
                    and not message.get("more_body", False)
                ):
                    profiler.stop()
                await outer_send(message)

        try:
            await self.app(scope, receive, send)
        finally:
            if profiler.is_running:
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


async def run(rounds: int, batch: int, work: int) -> dict[str, list[float]]:
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
        "pyinstrument": (build(work, None, provider, capture={}), False),
        "pyinstrument_at_send": (build(work, None, provider, capture={"at_send": True}), False),
        "pyinstrument_html": (build(work, None, provider, capture={"html": True}), False),
    }
    base_headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    results: dict[str, list[float]] = {name: [] for name in variants}
    for name, (app, needs_token) in variants.items():  # warm-up
        for _ in range(20):
            token = [(b"x-fastprof-profile", mint_token(SECRET).encode())] if needs_token else []
            await call(app, [*base_headers, *token])
    await asyncio.to_thread(profiling_on.flush, 30)
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
            if needs_token:
                # Timed: the writer stores this batch's profiles (see the docstring).
                await asyncio.to_thread(profiling_on.flush, 30)
            results[name].append((time.perf_counter() - start) / batch * 1e6)
    return results


#: The comparisons the issue's targets are about: (variant, reference).
PAIRS = (
    ("fastprof_aa", "fastprof"),
    ("configured", "fastprof"),
    ("triggered", "pyinstrument"),
    ("triggered", "pyinstrument_at_send"),
    ("pyinstrument_html", "pyinstrument"),
)


def paired_ratios(results: dict[str, list[float]], name: str, reference: str) -> list[float]:
    """Per-round ratios: both variants ran in the same round, seconds apart, so a
    slow spell of the machine affects both (the ratio of medians mixes rounds)."""
    return [a / b for a, b in zip(results[name], results[reference], strict=True)]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--work", type=int, default=20_000, help="sum(range(N)) in the endpoint")
    args = parser.parse_args()
    results = asyncio.run(run(args.rounds, args.batch, args.work))
    medians = {name: statistics.median(values) for name, values in results.items()}
    base = medians["fastprof"]
    for name, value in medians.items():
        print(f"{name:18s} {value:9.1f} us/request  x{value / base:.3f} vs fastprof")
    print("paired per-round ratios: median [interquartile range]")
    for name, reference in PAIRS:
        q1, q2, q3 = quartiles(paired_ratios(results, name, reference))
        print(f"  {name} / {reference} = {q2:.3f} [{q1:.3f}-{q3:.3f}]")


if __name__ == "__main__":
    main()
