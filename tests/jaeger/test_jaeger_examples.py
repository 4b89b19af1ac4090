"""End to end: what ``examples/jaeger/`` ships.

``./scripts/demo --jaeger`` (starts its own Jaeger, prints each trace with its URLs) and the
compose file's app service (``examples/jaeger/app.py`` under uvicorn, as compose runs it, exporting
to this module's Jaeger). The compose file itself needs Docker, which CI does not have.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fastprof.profiling import mint_token
from tests._jaeger import Jaeger
from tests._server import free_port

pytestmark = [pytest.mark.jaeger, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]


def test_demo_with_jaeger_prints_each_trace_with_its_urls(jaeger_binary: Path) -> None:
    """The demo starts its own Jaeger (the fixture only builds the binary, or skips)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--jaeger"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,  # not a terminal: the demo stops Jaeger when it is done
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    row = r"^    (GET \S+)\s+trace ([0-9a-f]{32})  \((\d+) spans in Jaeger\)$"
    rows = re.findall(row, out, re.M)
    names = [name for name, _, _ in rows]
    assert names.count("GET /items/{item_id}") == 3  # two demo requests and the profiled one
    assert {"GET /items", "GET /fail", "GET /blocking"} <= set(names)
    for _, trace_id, spans in rows:
        assert int(spans) > 0, out
        assert re.search(rf"API http://127\.0\.0\.1:\d+/api/v3/traces/{trace_id}$", out, re.M)
        assert re.search(rf"UI  http://127\.0\.0\.1:\d+/trace/{trace_id}$", out, re.M)


def test_compose_app_exports_to_jaeger_with_an_open_profile_link(jaeger: Jaeger) -> None:
    port = free_port()
    secret = secrets.token_hex(32)
    service = f"fastprof-compose-app-{os.getpid()}"
    env = {
        **os.environ,
        "FASTPROF_OTLP_ENDPOINT": jaeger.otlp_http_endpoint,
        "FASTPROF_SECRET": secret,
        "FASTPROF_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "FASTPROF_VIEWER_OPEN": "1",
        "OTEL_SERVICE_NAME": service,
    }
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1"]
    app = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        cwd=ROOT / "examples" / "jaeger",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/docs", timeout=1)
                break
            except httpx.TransportError:
                assert app.poll() is None, app.stderr.read() if app.stderr else ""
                assert time.monotonic() < deadline, "the example app did not start"
                time.sleep(0.1)
        token = mint_token(secret, ttl_s=60)
        response = httpx.get(f"{base}/items/42", headers={"X-Fastprof-Profile": token}, timeout=10)
        assert response.status_code == 200
        profile_id = response.headers["x-fastprof-profile-id"]
        deadline = time.monotonic() + 15
        while not (found := jaeger.find_traces(service, operation="GET /items/{item_id}")):
            assert time.monotonic() < deadline, "no trace from the example app in Jaeger"
            time.sleep(0.2)
        ((_, spans),) = found.items()
        (root,) = [s for s in spans if s.name == "GET /items/{item_id}" and not s.parent_span_id]
        url = root.attributes["fastprof.profile.url"]
        assert url == f"{base}/_fastprof/profiles/{profile_id}"
        # FASTPROF_VIEWER_OPEN=1: the link opens without the viewer's token (local use only).
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "pyinstrument" in page.text.lower()
    finally:
        app.terminate()
        app.wait(timeout=10)
        if app.stderr:
            app.stderr.close()
