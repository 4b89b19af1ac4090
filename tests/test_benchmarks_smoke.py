"""Smoke test of the benchmark harness (``benchmarks/``): structure only, never speed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run
from benchmarks._worker import run_plan
from benchmarks.app import ENDPOINTS
from benchmarks.variants import VARIANTS


def test_quickest_run_reports_table_and_raw_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = run.main(
        [
            "--quick",
            "--variants", "bare",
            "--endpoints", "/plain",
            "--rounds", "1",
            "--requests", "20",
            "--warmup", "2",
            "--memory-requests", "5",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "### `/plain`" in printed
    assert run.TABLE_HEADER in printed
    assert "| bare |" in printed

    raw = json.loads(out.read_text())
    assert raw["variants"] == ["bare"]
    assert raw["errors"] == {}
    assert raw["settings"]["endpoints"] == ["/plain"]
    assert {"python", "cpus", "packages", "date"} <= raw["environment"].keys()
    (result,) = raw["runs"]["bare"]
    timing = result["endpoints"]["/plain"]
    assert timing["status"] == 200
    assert timing["requests"] == 20
    assert timing["cpu_us"] > 0
    assert 0 < timing["p10_us"] <= timing["median_us"] <= timing["p90_us"]
    assert timing["memory"]["requests"] == 5
    row = raw["summary"]["/plain"]["bare"]
    assert row["ratio"] == 1.0
    assert row["delta_us"] == 0.0
    assert row["best_us"] <= row["median_us"] <= row["max_us"]
    assert row["median_ratio"] == 1.0


def test_every_available_variant_serves_every_endpoint() -> None:
    """Each variant's app answers 200 on each endpoint, or is skipped with a reason."""
    bare = asyncio.run(run_plan(_plan("bare")))["endpoints"]
    for name in VARIANTS:
        result = asyncio.run(run_plan(_plan(name)))
        if "skipped" in result:
            assert result["skipped"], name
            continue
        for path in ENDPOINTS:
            endpoint = result["endpoints"][path]
            assert endpoint["status"] == 200, (name, path)
            assert endpoint["response_bytes"] == bare[path]["response_bytes"], (name, path)


def _plan(variant: str) -> dict[str, object]:
    return {
        "variant": variant,
        "endpoints": list(ENDPOINTS),
        "requests": dict.fromkeys(ENDPOINTS, 2),
        "warmup": dict.fromkeys(ENDPOINTS, 1),
        "processor": "simple",
    }


def test_profiling_overhead_script_runs_every_variant_and_pairs_rounds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import profiling_overhead

    monkeypatch.setattr("sys.argv", ["profiling_overhead.py", "--rounds", "3", "--batch", "2"])
    profiling_overhead.main()
    printed = capsys.readouterr().out
    for name in (
        "fastprof_aa",
        "configured",
        "triggered",
        "pyinstrument",
        "pyinstrument_at_send",
        "pyinstrument_html",
    ):
        assert f"\n{name} " in printed
    assert "triggered / pyinstrument = " in printed
    assert "triggered / pyinstrument_at_send = " in printed
    results = {"a": [2.0, 3.0, 4.0], "b": [1.0, 3.0, 2.0]}
    assert profiling_overhead.paired_ratios(results, "a", "b") == [2.0, 1.0, 2.0]
    assert profiling_overhead.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert profiling_overhead.quartiles([1.5]) == (1.5, 1.5, 1.5)


@pytest.mark.parametrize("at_send", [False, True])
def test_bare_capture_stops_at_the_last_message_only_with_at_send(at_send: bool) -> None:
    import sys

    from benchmarks.profiling_overhead import PyinstrumentCapture

    sampling_after_last_message: list[bool] = []

    async def app(scope: object, receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        sampling_after_last_message.append(sys.getprofile() is not None)

    async def send(message: object) -> None:
        pass

    asyncio.run(PyinstrumentCapture(app, at_send=at_send)({}, None, send))
    assert sampling_after_last_message == [not at_send]
    assert sys.getprofile() is None
