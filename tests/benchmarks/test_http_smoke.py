"""Smoke test of the HTTP benchmark (``python -m benchmarks.http_mode``): structure, not speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import http_mode as bench
from benchmarks.http_variants import HTTP_VARIANTS, build, count_spans, record_spans

pytestmark = pytest.mark.server

WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:8000/plain
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.10ms    3.02ms  48.20ms   90.12%
    Req/Sec     4.55k   312.10     5.01k    80.00%
  Latency Distribution
     50%    6.51ms
     75%    7.43ms
     90%    9.02ms
     99%   21.30ms
  13583 requests in 3.00s, 1.93MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   4525.77
Transfer/sec:    657.28KB
"""


def test_wrk_output_is_read_with_units() -> None:
    parsed = bench.parse_wrk(WRK_OUTPUT)
    assert parsed["rps"] == 4525.77
    assert parsed["requests"] == 13583
    assert parsed["seconds"] == 3.0
    assert parsed["p50_ms"] == 6.51
    assert parsed["p99_ms"] == 21.30
    assert parsed["errors"] == 3
    assert parsed["non_2xx"] == 4
    in_us = bench.parse_wrk(WRK_OUTPUT.replace("6.51ms", "651.00us"))
    assert in_us["p50_ms"] == pytest.approx(0.651)


def test_sdk_floor_replays_the_spans_fastprof_records() -> None:
    templates = record_spans(("/plain", "/deps"))
    # The server span, the three phases, and on /deps one span per dependency + teardown.
    assert count_spans(templates["/plain"]) == 4
    assert count_spans(templates["/deps"]) > count_spans(templates["/plain"])
    assert templates["/plain"].attributes["http.route"] == "/plain"
    # The variant records them in a child process, so that its FastAPI stays unpatched.
    floor = build("sdk-floor")
    assert _shape(floor.templates["/deps"]) == _shape(templates["/deps"])  # type: ignore[attr-defined]


def _shape(t: Any) -> tuple[Any, ...]:
    return (t.name, t.kind, sorted(t.attributes), [_shape(c) for c in t.children])


def test_quick_run_serves_real_uvicorn_and_reports_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bare and all features at 1% on a real uvicorn, under the Python load generator."""
    out = tmp_path / "http.json"
    code = bench.main(
        [
            "--quick",
            "--load", "python",
            "--no-pin",
            "--variants", "all-1pct",
            "--duration", "0.4",
            "--warmup", "0",
            "--trace-requests", "5",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert bench.TABLE_HEADER in printed
    assert "### `/plain`" in printed and "### `/deps`" in printed
    raw = json.loads(out.read_text())
    assert raw["variants"] == ["bare", "all-1pct"]
    assert raw["errors"] == {} and raw["skipped"] == {}
    assert raw["environment"]["load_generator"].startswith("benchmarks._http_load")
    (results,) = raw["rounds"]
    assert results["all-1pct"]["server"]["http"] in ("httptools", "h11")
    for path in ("/plain", "/deps"):
        rows = raw["summary"][path]
        assert rows["bare"]["rps_ratio"] == 1.0
        for name in ("bare", "all-1pct"):
            row = rows[name]
            assert row["requests"] > 0 and row["errors"] == 0
            assert row["rps"] > 0 and row["cpu_us"] > 0
            assert 0 < row["p50_ms"] <= row["p99_ms"]
            assert row["trace"]["requests"] == 5
            assert row["trace"]["held_objects_per_request"] > 0
            assert len(row["gc_per_10k"]) == 3


def test_every_variant_is_listed() -> None:
    assert {
        "bare",
        "bare-AA",
        "default",
        "loop",
        "slowlog",
        "profiling-idle",
        "all-unsampled",
        "all-1pct",
        "all-sampled",
        "native-sampled",
        "sdk-floor",
    } <= HTTP_VARIANTS.keys()


def test_instructions_mode_reads_callgrind_dumps_and_prints_ratios(tmp_path: Path) -> None:
    """``python -m benchmarks.http_instructions``: a callgrind dump's summary is read per
    thread, and the table gives each variant's loop-thread instructions per request against
    bare, with the throughput ratio they imply."""
    from benchmarks import http_instructions as instr

    dump = tmp_path / "cg.4242.2-01"
    dump.write_text(
        "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 4242\n"
        "cmd:  python -m benchmarks._http_server bare\npart: 2\n\ndesc: I1 cache: \n"
        "events: Ir\nsummary: 866558000\n\nfl=(1) ???\nfn=(1) 0x0000000000000000\n0 12\n"
        "totals: 866558000\n"
    )
    assert instr.read_dump(dump) == 866_558_000
    results = {
        "bare": {"endpoints": {"/plain": _row(2000, 866_558_000, 3_000_000)}},
        "default": {"endpoints": {"/plain": _row(1850, 866_558_000, 1_000_000)}},
        "skipped-one": {"skipped": "not in this fastprof"},
    }
    text = instr.table("/plain", results)
    bare_line, default_line, skipped_line = text.splitlines()[-3:]
    assert "| bare | 2000 | 433,279 | 1.000 | 1.000 |" in bare_line
    assert "| default | 1850 | 468,410 | 1.081 | 0.925 |" in default_line
    assert "not in this fastprof" in skipped_line


def _row(requests: int, loop: int, others: int) -> dict[str, Any]:
    return {
        "requests": requests,
        "loop_per_request": loop / requests,
        "all_per_request": (loop + others) / requests,
        "gc": [1, 0, 0],
    }
