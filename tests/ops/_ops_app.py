"""The app the multi-process tests serve with real uvicorn processes.

Configured from the environment the test sets: ``OPS_STORE_DIR`` (a shared
FileStore; else the default MemoryStore), ``OPS_SECRET`` (profiling secret), and
prometheus_client's own ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import os
import time

from fastapi import Depends, FastAPI

import fastprof
from fastprof.health import HealthCheck
from fastprof.profiling import FileStore
from fastprof.prometheus import PrometheusMetrics


def token_scope() -> int:
    return os.getpid()


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


app = FastAPI()
store_dir = os.environ.get("OPS_STORE_DIR")
profiling = fastprof.Profiling(
    secret=os.environ["OPS_SECRET"],
    store=FileStore(store_dir) if store_dir else None,
    max_per_minute=1000,
)
monitor = fastprof.LoopMonitor(threshold_s=0.2, max_reports_per_minute=0)
metrics = PrometheusMetrics(sync_interval_s=0.0)
health = HealthCheck(monitor)


@app.get("/work/{n}")
async def work(n: int, pid: int = Depends(token_scope)) -> dict[str, int]:
    busy(0.02)
    return {"pid": pid, "n": n}


app.mount("/_fastprof/profiles", profiling.viewer())
app.add_route("/metrics", metrics.app(), include_in_schema=False)
app.add_route("/healthz", health.app(), include_in_schema=False)
fastprof.instrument(
    app,
    profiling=profiling,
    loop_monitor=monitor,
    metrics=metrics,
    exclude=["/metrics", "/healthz"],
)
