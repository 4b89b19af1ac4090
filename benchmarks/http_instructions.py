"""Instructions per request behind a real uvicorn under load: the HTTP mode, made deterministic.

``python -m benchmarks.http_instructions [--variants default,all-1pct] [--endpoints /plain]``

Each variant's server process (the same ``benchmarks._http_server`` the HTTP mode runs:
uvicorn, 1 worker, uvloop, the app behind its ``Control`` layer) runs under valgrind's
callgrind, and ``wrk`` (32 connections) loads it. After a warm-up window, callgrind's
counters are zeroed, a measured window of load runs, and the counters are dumped: the
instructions every thread of the server executed during that window, divided by the
requests it served in it. The event loop's thread (thread 1) is what bounds throughput;
the other threads (the span processor's, the loop monitor's watchdog, the thread pool)
are given apart.

Why: on a shared machine, req/s and CPU time per request of identical servers differ by
±25 % from one 3-second window to the next, which hides differences of a few percent.
Instructions do not depend on the machine's load. For a CPU-bound server (the HTTP
mode's setting), throughput is inversely proportional to the loop thread's work per
request, so its ratio against bare estimates the req/s ratio. Caveats: valgrind runs the
server ~50x slower, so what happens per unit of wall time (the loop monitor's heartbeat,
the span processor's 5 s export timer) is over-weighted per request; the loop monitor's
threshold is raised to 10 s here for that reason (its heartbeat then runs every 5 s). A
full garbage collection in the window adds its whole cost to it: the table shows the
collections counted in the window.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.http_mode import Server, _csv, _get, _load

__all__ = ["main", "read_dump"]

DEFAULT_VARIANTS = ("bare", "bare-AA", "default", "slowlog", "all-1pct", "all-alldeps-1pct")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.http_instructions",
        description="Instructions per request of each variant's uvicorn server under wrk load.",
    )
    p.add_argument("--variants", type=_csv, help=f"default: {','.join(DEFAULT_VARIANTS)}")
    p.add_argument("--endpoints", type=_csv, default=["/plain", "/deps"])
    p.add_argument("--seconds", type=int, default=20, help="measured window (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up window (default 5)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="each server calls gc.freeze() once its app is built: full collections then skip "
        "the start-up objects, so a window's ratio moves less with how many it holds",
    )
    p.add_argument("--json", type=Path, help="raw results (default: none)")
    return p


def read_dump(path: Path) -> int:
    """The instructions counted in one callgrind dump file (its ``summary``/``totals``)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{path}: no summary line")


def _dump(pid: int, out: Path) -> dict[int, int]:
    """Dump callgrind's counters now (they restart from zero): instructions per thread."""
    before = set(out.iterdir())
    subprocess.run(
        ["callgrind_control", "--dump", str(pid)], check=True, capture_output=True, timeout=120
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [p for p in set(out.iterdir()) - before if re.search(r"-\d+$", p.name)]
        if new:
            time.sleep(1.0)  # let every thread's file be written
            new = [p for p in set(out.iterdir()) - before if re.search(r"-\d+$", p.name)]
            return {int(p.name.rsplit("-", 1)[1]): read_dump(p) for p in new}
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def _wrk(port: int, path: str, seconds: int, connections: int) -> dict[str, Any]:
    return _load("wrk", port, path, seconds, connections, None)


def _run_variant(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    valgrind = ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
    valgrind.append(f"--callgrind-out-file={out}/cg.%p")
    server = Server(
        name,
        "uvloop",
        None,
        args.gc_freeze,
        wrapper=valgrind,
        env={"PYTHONHASHSEED": "0", "FASTPROF_BENCH_LOOP_THRESHOLD_S": "10"},
    )
    try:
        server.wait_ready(timeout=300.0)
        if server.skipped is not None:
            return {"skipped": server.skipped}
        port, pid = server.port, int(server.info["pid"])
        result: dict[str, Any] = {"endpoints": {}}
        for path in args.endpoints:
            if _get(port, path, timeout=30.0) != 200:
                raise RuntimeError(f"{name} {path}: not 200")
            _wrk(port, path, args.warmup, args.connections)
            _get(port, "/__bench/reset", timeout=60.0)
            subprocess.run(
                ["callgrind_control", "--zero", str(pid)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            load = _wrk(port, path, args.seconds, args.connections)
            threads = _dump(pid, out)
            stats = _get(port, "/__bench/stats", timeout=60.0)
            requests = int(stats["requests"])
            loop = threads.get(1, 0)
            total = sum(threads.values())
            result["endpoints"][path] = {
                "requests": requests,
                "loop_instructions": loop,
                "all_instructions": total,
                "loop_per_request": loop / requests if requests else None,
                "all_per_request": total / requests if requests else None,
                "threads": threads,
                "gc": stats["gc"]["collections"],
                "wrk_rps": load.get("rps"),
            }
        return result
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        server.stop()


def table(path: str, results: dict[str, Any]) -> str:
    bare = results.get("bare", {}).get("endpoints", {}).get(path, {})
    base_loop, base_all = bare.get("loop_per_request"), bare.get("all_per_request")
    lines = [
        f"### `{path}`",
        "",
        "| variant | requests | loop thread instr/req | x bare | est. req/s x bare "
        "| all threads instr/req | x bare | GC gen0/1/2 in window |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        row = result.get("endpoints", {}).get(path)
        if row is None:
            why = result.get("skipped") or result.get("error") or "no result"
            lines.append(f"| {name} | {why} | | | | | | |")
            continue
        loop, total = row["loop_per_request"], row["all_per_request"]
        ratio = loop / base_loop if loop and base_loop else None
        ratio_all = total / base_all if total and base_all else None
        gc = "/".join(str(c) for c in row["gc"])
        lines.append(
            f"| {name} | {row['requests']} | {loop:,.0f} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | "
            f"{'' if ratio is None else f'{1 / ratio:.3f}'} | {total:,.0f} | "
            f"{'' if ratio_all is None else f'{ratio_all:.3f}'} | {gc} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install valgrind wrk)", file=sys.stderr)
            return 2
    names = list(args.variants or DEFAULT_VARIANTS)
    if "bare" not in names:
        names.insert(0, "bare")
    started = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fastprof-cg-") as tmp:
        for name in names:
            out = Path(tmp) / name
            out.mkdir()
            results[name] = _run_variant(name, args, out)
            print(f"  {name} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        f"HTTP instructions, {now}: uvicorn 1 worker (uvloop) under callgrind, "
        f"wrk -c{args.connections}, {args.warmup} s warm-up, "
        f"{args.seconds} s measured per endpoint, gc.freeze={args.gc_freeze}, PYTHONHASHSEED=0, "
        f"python {sys.version.split()[0]}"
    )
    print(header)
    for path in args.endpoints:
        print()
        print(table(path, results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=1))
        print(f"\nraw results: {args.json}")
    return 0 if all("endpoints" in r or "skipped" in r for r in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
