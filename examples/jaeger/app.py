"""The demo app, instrumented with every fastprof feature and exporting to Jaeger over OTLP/HTTP.

What ``examples/jaeger/compose.yaml`` runs next to Jaeger; also runs on its own against the local
Jaeger of ``scripts/jaeger run``::

    cd examples/jaeger && FASTPROF_SECRET=$(openssl rand -hex 32) uvicorn app:app

Environment:
    FASTPROF_OTLP_ENDPOINT  OTLP/HTTP traces URL (default http://127.0.0.1:4318/v1/traces)
    FASTPROF_SECRET         profile-token secret, >= 32 bytes (``fastprof token`` signs with it)
    FASTPROF_PUBLIC_URL     the app's URL as your browser reaches it (default http://127.0.0.1:8000);
                            spans link to ``<it>/_fastprof/profiles/<id>``
    FASTPROF_VIEWER_OPEN=1  serve profiles without the viewer's bearer token, so Jaeger's profile
                            link opens in a browser. Local development only: anyone who reaches
                            the app can then read its profiles.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/demo_app.py

from demo_app import create_app

import fastprof
from fastprof.exporters import setup_tracing

setup_tracing(
    os.environ.get("OTEL_SERVICE_NAME", "fastprof-demo"),
    otlp_endpoint=os.environ.get("FASTPROF_OTLP_ENDPOINT", "http://127.0.0.1:4318/v1/traces"),
)
profiling = fastprof.Profiling(
    secret=os.environ["FASTPROF_SECRET"],
    base_url=os.environ.get("FASTPROF_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
    + "/_fastprof/profiles",
)
app = create_app()
open_viewer = os.environ.get("FASTPROF_VIEWER_OPEN") == "1"
app.mount(
    "/_fastprof/profiles",
    profiling.viewer(auth=(lambda scope: True) if open_viewer else None),
)
fastprof.instrument(
    app,
    exclude=r"^/_fastprof/",
    profiling=profiling,
    loop_monitor=fastprof.LoopMonitor(threshold_s=0.1),
    slow_requests=fastprof.SlowRequestLog(threshold_s=0.2),
)
