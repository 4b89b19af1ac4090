"""Overhead of fastprof's dependency spans, against bare FastAPI and FastAPI's native telemetry.

Run from the repository root::

    python -m benchmarks.deps_overhead [--requests 2000] [--rounds 7] [--profile VARIANT]

One app shape for every variant (5 dependencies: one sync, one async ``yield``,
three async, two levels deep; an async endpoint returning a small dict), driven
by calling the ASGI application directly with a prebuilt scope (no HTTP client,
no server) on one event loop. Variants run interleaved, in a shuffled order per
round, in the same process; the table shows the median over rounds of the mean
cost per request, wall-clock and CPU time of the whole process (all threads;
less sensitive to other load on the machine), and the ratios to ``bare``.
Every sampled variant exports
through the same ``SimpleSpanProcessor`` into an exporter that discards spans.

Variants:

* ``bare``: plain ``FastAPI()`` (no tracer provider configured: native telemetry off).
* ``fastprof_server``: ``fastprof.instrument(app)`` with dependency spans off, sampled.
* ``fastprof_server_unsampled``: the same, ``ALWAYS_OFF`` sampler (the middleware's own floor).
* ``fastprof_unsampled``: fastprof with dependency spans, ``ALWAYS_OFF`` sampler.
* ``fastprof_sampled``: fastprof with dependency spans, everything sampled.
* ``native_sampled``: ``FastAPI(telemetry={"tracer_provider": tp})``, everything sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import fastprof

__all__ = ["main"]


class _Discard(SpanExporter):
    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


def _provider(sampled: bool, exporter: _Discard) -> TracerProvider:
    provider = TracerProvider(sampler=None if sampled else ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def build_app(**fastapi_kwargs: Any) -> FastAPI:
    """The benchmarked shape: /deps with 5 dependencies (one sync, one yield)."""

    def get_settings() -> dict[str, int]:
        return {"page_size": 10}

    async def get_db() -> AsyncIterator[str]:
        yield "session"

    async def get_user(
        db: str = Depends(get_db), settings: dict[str, int] = Depends(get_settings)
    ) -> str:
        return "alice"

    async def check_permissions(user: str = Depends(get_user)) -> bool:
        return True

    async def request_tag() -> str:
        return "tag"

    app = FastAPI(**fastapi_kwargs)

    @app.get("/deps")
    async def deps(
        allowed: bool = Depends(check_permissions),
        db: str = Depends(get_db),
        tag: str = Depends(request_tag),
    ) -> dict[str, Any]:
        return {"allowed": allowed, "db": db, "tag": tag}

    return app


def _instrument(app: FastAPI, provider: TracerProvider, deps: bool) -> FastAPI:
    params = inspect.signature(fastprof.instrument).parameters
    if "dependencies" in params:
        return fastprof.instrument(
            app, tracer_provider=provider, dependencies=deps
        )
    hooks = [fastprof.DependencySpans(tracer_provider=provider)] if deps else []
    return fastprof.instrument(app, tracer_provider=provider, hooks=hooks)


def variants(exporter: _Discard) -> dict[str, Any]:
    sampled = _provider(True, exporter)
    unsampled = _provider(False, exporter)
    return {
        "bare": build_app(),
        "fastprof_server": _instrument(build_app(), sampled, deps=False),
        "fastprof_server_unsampled": _instrument(build_app(), unsampled, deps=False),
        "fastprof_unsampled": _instrument(build_app(), unsampled, deps=True),
        "fastprof_sampled": _instrument(build_app(), sampled, deps=True),
        "native_sampled": build_app(telemetry={"tracer_provider": sampled}),
    }


_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/deps",
    "raw_path": b"/deps",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("bench", 80),
}
_REQUEST: dict[str, Any] = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> dict[str, Any]:
    return _REQUEST


async def _send(message: dict[str, Any]) -> None:
    if message["type"] == "http.response.start" and message["status"] != 200:
        raise RuntimeError(f"unexpected status {message['status']}")


async def _run(app: Any, n: int) -> tuple[float, float]:
    """Mean wall-clock and CPU (all threads of this process) seconds per request."""
    scope = _SCOPE
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await app(dict(scope), _receive, _send)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


async def bench(requests: int, rounds: int) -> dict[str, tuple[float, float]]:
    exporter = _Discard()
    apps = variants(exporter)
    for app in apps.values():  # warm-up: build middleware stacks, fill caches
        await _run(app, 200)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
    names = list(apps)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            samples[name].append(await _run(apps[name], requests))
    return {
        name: (
            statistics.median(v[0] for v in values) * 1e6,
            statistics.median(v[1] for v in values) * 1e6,
        )
        for name, values in samples.items()
    }


def _report(results: dict[str, tuple[float, float]]) -> str:
    wall0, cpu0 = results["bare"]
    lines = [f"{'variant':<22}{'wall us':>9}{'x bare':>8}{'cpu us':>9}{'x bare':>8}{'+cpu us':>9}"]
    for name, (wall, cpu) in results.items():
        lines.append(
            f"{name:<22}{wall:>9.1f}{wall / wall0:>8.2f}{cpu:>9.1f}{cpu / cpu0:>8.2f}"
            f"{cpu - cpu0:>+9.1f}"
        )
    return "\n".join(lines)


def _profile(name: str, requests: int) -> None:
    import cProfile
    import pstats

    apps = variants(_Discard())
    app = apps[name]

    async def go() -> None:
        await _run(app, 200)
        profiler = cProfile.Profile()
        profiler.enable()
        await _run(app, requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)

    asyncio.run(go())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", metavar="VARIANT", help="cProfile one variant instead")
    args = parser.parse_args(argv)
    if args.profile:
        _profile(args.profile, args.requests)
        return
    import fastapi

    print(
        f"python {sys.version.split()[0]}, fastapi {fastapi.__version__}, "
        f"{args.requests} requests x {args.rounds} rounds per variant"
    )
    print(_report(asyncio.run(bench(args.requests, args.rounds))))


if __name__ == "__main__":
    main()
