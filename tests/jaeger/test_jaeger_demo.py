"""End to end: ``./scripts/demo --jaeger`` starts the local Jaeger, sends the demo's traces there
and prints each trace id with its query-API and UI URLs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
