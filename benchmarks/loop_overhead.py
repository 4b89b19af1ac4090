"""Per-request cost of the loop monitor (watchdog + metrics), interleaved in one run (not a test).

Variants, each driving the same FastAPI app in-process through raw ASGI calls, turning the
event loop between requests as a server does:

* ``fastprof``      fastprof, route span sampled, no loop monitor
* ``fastprof_aa``   the same again (A/A: the noise floor)
* ``loop``          + ``LoopMonitor`` with an SDK ``MeterProvider`` (metrics recorded, in memory)

Usage: python benchmarks/loop_overhead.py [--rounds 21] [--batch 500]
Prints the median and best per-round microseconds per request and the ratios to ``fastprof``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from fastapi import FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import fastprof


class _Discard(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def build(loop_monitor: fastprof.LoopMonitor | None) -> Any:
    kwargs: dict[str, Any] = {}
    if "telemetry" in FastAPI.__init__.__code__.co_varnames:
        kwargs["telemetry"] = {"tracing": False}
    app = FastAPI(**kwargs)

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {"message": "hello"}

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Discard()))
    return fastprof.instrument(
        app, tracer_provider=provider, dependencies=False, loop_monitor=loop_monitor
    )


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/plain",
    "raw_path": b"/plain",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench.local"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


async def run_batch(app: Any, n: int) -> float:
    total = 0
    for _ in range(n):
        start = time.perf_counter_ns()
        await app(dict(SCOPE), _receive, _send)
        total += time.perf_counter_ns() - start
        await asyncio.sleep(0)  # the loop turns between requests, as in a server
    return total / n / 1000


async def main_async(rounds: int, batch: int) -> None:
    monitor = fastprof.LoopMonitor(
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
    )
    apps = {"fastprof": build(None), "fastprof_aa": build(None), "loop": build(monitor)}
    for app in apps.values():
        await run_batch(app, 300)
    results: dict[str, list[float]] = {name: [] for name in apps}
    names = list(apps)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            results[name].append(await run_batch(apps[name], batch))
    monitor.stop()
    base_med = statistics.median(results["fastprof"])
    base_min = min(results["fastprof"])
    for name, values in results.items():
        med, best = statistics.median(values), min(values)
        print(
            f"{name:12s} median {med:7.1f} us  x{med / base_med:.3f}   "
            f"best {best:7.1f} us  x{best / base_min:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main_async(args.rounds, args.batch))


if __name__ == "__main__":
    main()
