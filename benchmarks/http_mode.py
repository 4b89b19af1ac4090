"""The HTTP benchmark: each configuration behind a real uvicorn, under concurrent load.

``python -m benchmarks.http_mode [--quick] [--loop uvloop|asyncio] [--variants a,b] [--json PATH]``

For every variant (``benchmarks/http_variants.py``) in every round, a fresh server process
(``benchmarks._http_server``: uvicorn, 1 worker, the chosen loop, httptools when installed,
no access log) serves the benchmark app (``benchmarks/app.py``) on 127.0.0.1. The load
generator is ``wrk`` (``-t1 -c32 --latency``) when it is on the PATH, else the bounded
Python one (``benchmarks._http_load``). Per endpoint: a warm-up under load, then a timed
window of ``--duration`` seconds, bracketed by the server's ``/__bench/reset`` and
``/__bench/stats`` (server CPU per request, garbage collections, memory kept). In the
first round each endpoint also gets sequential requests traced with ``tracemalloc``.

Rounds are interleaved (ABAB...: every variant once per round, the starting variant
rotating), and every ratio is paired: a variant's number in a round divided by ``bare``'s in
the same round, then the median over rounds. ``bare-AA`` is a second bare server: its ratios
are the noise of the run. With ``taskset`` and at least two CPUs, the server is pinned to
CPU 0 and the load generator to CPU 1 (``--no-pin`` to turn it off).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # pragma: no cover - ``python benchmarks/http_mode.py``
    raise SystemExit("run it as a module, from the repository root: python -m benchmarks.http_mode")

from benchmarks.http_variants import HTTP_VARIANTS

__all__ = ["main", "parse_wrk", "summarise"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BASELINE = "bare"
ENDPOINTS = ("/plain", "/deps")
FULL: dict[str, Any] = {"rounds": 3, "duration": 3.0, "warmup": 1.0, "trace_requests": 200}
QUICK: dict[str, Any] = {"rounds": 1, "duration": 0.5, "warmup": 0.2, "trace_requests": 20}
PACKAGES = (
    "fastprof-asgi",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "uvloop",
    "httptools",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "pyinstrument",
)


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.http_mode",
        description="fastprof's cost behind a real uvicorn under concurrent load, against bare.",
    )
    p.add_argument("--quick", action="store_true", help="1 round of 0.5 s windows (smoke check)")
    p.add_argument("--variants", type=_csv, help="comma-separated variants ('bare' always added)")
    p.add_argument("--endpoints", type=_csv, help=f"default: {','.join(ENDPOINTS)}")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds of load per timed window (default 3)")
    p.add_argument("--warmup", type=float, help="seconds of load before each window (default 1)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument(
        "--load", choices=("auto", "wrk", "python"), default="auto", help="load generator"
    )
    p.add_argument("--no-pin", action="store_true", help="don't pin server and load to CPUs")
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="every server calls gc.freeze() after building its app (a deployment tuning)",
    )
    p.add_argument(
        "--trace-requests",
        type=int,
        help="sequential requests traced by tracemalloc per endpoint, first round (0: off)",
    )
    p.add_argument(
        "--json", type=Path, help="raw results (default: benchmarks/results/http-LOOP.json)"
    )
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    return p


# --- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FASTAPI_OTEL_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def _get(port: int, path: str, timeout: float = 10.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if path.startswith("/__bench/"):
            return json.loads(body)
        return response.status
    finally:
        conn.close()


class Server:
    """One variant's server process."""

    def __init__(
        self,
        variant: str,
        loop: str,
        cpu: int | None,
        gc_freeze: bool = False,
        *,
        wrapper: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``wrapper``: a command the server runs under (``valgrind ...``); ``env``: more
        environment variables."""
        self.port = _free_port()
        cmd = [*wrapper, sys.executable, "-m", "benchmarks._http_server", variant]
        cmd += ["--port", str(self.port), "--loop", loop]
        if gc_freeze:
            cmd.append("--gc-freeze")
        self.proc = subprocess.Popen(
            _pinned(cmd, cpu),
            cwd=ROOT,
            env={**_env(), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.info: dict[str, Any] = {}
        self.skipped: str | None = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                if self.proc.returncode == 3 and out.strip():
                    self.skipped = json.loads(out.strip().splitlines()[-1])["skipped"]
                    return
                tail = "\n".join(err.strip().splitlines()[-12:])
                raise RuntimeError(f"server exited {self.proc.returncode}: {tail}")
            try:
                self.info = _get(self.port, "/__bench/ping", timeout=2.0)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> str:
        """Stop it like a deployment would (SIGTERM: lifespan shutdown); its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        _, err = self.proc.communicate()
        return err or ""


# --- load ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(f"unreadable wrk time {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests, req/s, p50/p90/p99 (ms) and errors from ``wrk --latency`` output."""
    out: dict[str, Any] = {"non_2xx": 0, "errors": 0}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            out[f"p{parts[0][:-1]}_ms"] = _ms(parts[1])
        elif line.startswith("Requests/sec:"):
            out["rps"] = float(parts[1])
        elif "requests in" in line:
            out["requests"] = int(parts[0])
            out["seconds"] = _ms(parts[3].rstrip(",")) / 1e3
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            out["non_2xx"] = int(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            out["errors"] = sum(int(n) for n in re.findall(r"\d+", line))
    missing = {"rps", "requests", "p50_ms", "p99_ms"} - out.keys()
    if missing:
        raise ValueError(f"wrk output without {sorted(missing)}:\n{output}")
    return out


def _load(
    tool: str, port: int, path: str, seconds: float, connections: int, cpu: int | None
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{path}"
    if tool == "wrk":
        duration = max(1, round(seconds))  # wrk takes whole seconds
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
        proc = subprocess.run(
            _pinned(cmd, cpu), capture_output=True, text=True, timeout=duration + 30
        )
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed: {proc.stderr.strip()}")
        return parse_wrk(proc.stdout)
    cmd = [sys.executable, "-m", "benchmarks._http_load", url]
    cmd += ["--connections", str(connections), "--duration", str(seconds)]
    cmd += ["--max-requests", str(max(1000, int(seconds * 50_000)))]
    proc = subprocess.run(
        _pinned(cmd, cpu), cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=seconds + 60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _traced(port: int, path: str, requests: int) -> dict[str, Any]:
    """Sequential requests with tracemalloc on in the server: memory per request."""
    _get(port, "/__bench/trace?on")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(requests):
            conn.request("GET", path)
            conn.getresponse().read()
    finally:
        conn.close()
    result: dict[str, Any] = _get(port, "/__bench/trace?off")
    return result


def _run_variant(
    name: str, settings: dict[str, Any], first_round: bool
) -> dict[str, Any]:
    pin = settings["pin"]
    server = Server(name, settings["loop"], 0 if pin else None, settings["gc_freeze"])
    try:
        server.wait_ready()
        if server.skipped is not None:
            return {"skipped": server.skipped}
        result: dict[str, Any] = {"server": server.info, "endpoints": {}}
        for path in settings["endpoints"]:
            status = _get(server.port, path)
            if status != 200:
                raise RuntimeError(f"{name} {path}: status {status}")
            cpu = 1 if pin else None
            tool, conns = settings["load"], settings["connections"]
            if settings["warmup"] > 0:
                _load(tool, server.port, path, settings["warmup"], conns, cpu)
            _get(server.port, "/__bench/reset")
            load = _load(tool, server.port, path, settings["duration"], conns, cpu)
            stats = _get(server.port, "/__bench/stats")
            entry = {"load": load, "server": stats}
            if first_round and settings["trace_requests"]:
                entry["trace"] = _traced(server.port, path, settings["trace_requests"])
            result["endpoints"][path] = entry
        return result
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        err = server.stop()
        if "Traceback" in err:
            print(f"[{name}] server stderr:\n{err[-3000:]}", file=sys.stderr)


# --- summary ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Per endpoint and variant: medians over rounds, and ratios paired with bare by round."""
    summary: dict[str, Any] = {}
    rounds: list[dict[str, Any]] = raw["rounds"]
    for path in raw["settings"]["endpoints"]:
        rows: dict[str, Any] = {}
        for name in raw["variants"]:
            per_round = []
            for rnd in rounds:
                entry = rnd.get(name, {}).get("endpoints", {}).get(path)
                base = rnd.get(BASELINE, {}).get("endpoints", {}).get(path)
                if entry is None:
                    continue
                per_round.append((entry, base))
            if not per_round:
                continue
            row: dict[str, Any] = {"rounds": len(per_round)}
            for key, get in (
                ("rps", lambda e: e["load"]["rps"]),
                ("p50_ms", lambda e: e["load"]["p50_ms"]),
                ("p99_ms", lambda e: e["load"]["p99_ms"]),
                ("cpu_us", lambda e: e["server"]["cpu_us_per_request"]),
            ):
                values = [get(e) for e, _ in per_round]
                ratios = [get(e) / get(b) for e, b in per_round if b is not None and get(b)]
                row[key] = _median(values)
                row[f"{key}_ratio"] = _median(ratios)
                row[f"{key}_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
                row[f"{key}_per_round"] = values
            requests = sum(e["server"]["requests"] for e, _ in per_round)
            gcs = [e["server"]["gc"] for e, _ in per_round]
            row["requests"] = requests
            row["gc_per_10k"] = [
                sum(g["collections"][i] for g in gcs) / requests * 1e4 for i in range(3)
            ]
            row["gen2"] = sum(g["collections"][2] for g in gcs)
            row["gen2_max_ms"] = max(g["max_pause_ms"][2] for g in gcs)
            row["gc_ms_per_10k"] = sum(sum(g["pause_ms"]) for g in gcs) / requests * 1e4
            row["cyclic_per_request"] = sum(sum(g["collected"]) for g in gcs) / requests
            row["retained_b_per_request"] = [
                e["server"]["retained_blocks"] / max(1, e["server"]["requests"])
                for e, _ in per_round
            ]
            row["errors"] = sum(e["load"]["errors"] + e["load"]["non_2xx"] for e, _ in per_round)
            trace = next((e["trace"] for e, _ in per_round if "trace" in e), None)
            row["trace"] = trace
            rows[name] = row
        summary[path] = rows
    return summary


def _fmt(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, spec)


TABLE_HEADER = (
    "| variant | req/s | x bare | (range) | p50 ms | p50 x | p99 ms | p99 x | CPU µs/req | CPU x "
    "| GC gen0/1/2 per 10k req | gen2 max ms | GC ms per 10k req | cyclic objs/req "
    "| held objs/req | peak KiB/req |"
)


def table(path: str, rows: dict[str, Any]) -> str:
    lines = [f"### `{path}`", "", TABLE_HEADER, "|---" + "|---:" * 15 + "|"]
    for name, r in rows.items():
        rng = r["rps_ratio_range"]
        trace = r["trace"] or {}
        gc10k = "/".join(f"{v:.1f}" for v in r["gc_per_10k"])
        span = f"{rng[0]:.2f}-{rng[1]:.2f}" if rng else "-"
        lines.append(
            f"| {name} | {_fmt(r['rps'], '.0f')} | {_fmt(r['rps_ratio'], '.2f')} | {span} "
        )
        lines[-1] += (
            f"| {_fmt(r['p50_ms'], '.2f')} | {_fmt(r['p50_ms_ratio'], '.2f')} "
            f"| {_fmt(r['p99_ms'], '.2f')} | {_fmt(r['p99_ms_ratio'], '.2f')} "
            f"| {_fmt(r['cpu_us'], '.0f')} | {_fmt(r['cpu_us_ratio'], '.2f')} "
            f"| {gc10k} | {r['gen2_max_ms']:.1f} | {r['gc_ms_per_10k']:.1f} "
            f"| {r['cyclic_per_request']:.2f} "
            f"| {_fmt(trace.get('held_objects_per_request'), '.0f')} "
            f"| {_fmt(trace.get('peak_kib_per_request'), '.1f')} |"
        )
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def _environment(settings: dict[str, Any]) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    wrk = None
    if settings["load"] == "wrk":
        proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        text = (proc.stdout or proc.stderr).strip()
        wrk = text.splitlines()[0].split(" Copyright")[0] if text else "wrk"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "packages": versions,
        "load_generator": wrk or "benchmarks._http_load (Python)",
    }


def _choose(names: list[str] | None) -> list[str]:
    if names is None:
        chosen = [n for n, v in HTTP_VARIANTS.items() if v.default]
    else:
        unknown = [n for n in names if n not in HTTP_VARIANTS]
        if unknown:
            known = ", ".join(HTTP_VARIANTS)
            raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {known}")
        chosen = list(dict.fromkeys(names))
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, v in HTTP_VARIANTS.items():
            print(f"{name:16} {'' if v.default else '(opt-in) '}{v.description}")
        return 0
    base = QUICK if args.quick else FULL
    load = args.load
    if load == "auto":
        load = "wrk" if shutil.which("wrk") else "python"
    elif load == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--load wrk: wrk is not on the PATH (apt-get install wrk)")
    endpoints = args.endpoints or list(ENDPOINTS)
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    settings = {
        "rounds": args.rounds or base["rounds"],
        "duration": args.duration if args.duration is not None else base["duration"],
        "warmup": args.warmup if args.warmup is not None else base["warmup"],
        "trace_requests": (
            args.trace_requests if args.trace_requests is not None else base["trace_requests"]
        ),
        "connections": args.connections,
        "endpoints": endpoints,
        "loop": args.loop,
        "load": load,
        "pin": pin,
        "gc_freeze": args.gc_freeze,
    }
    variants = _choose(args.variants)
    started = time.monotonic()
    raw: dict[str, Any] = {
        "settings": settings,
        "environment": _environment(settings),
        "variants": variants,
        "rounds": [],
        "skipped": {},
        "errors": {},
    }
    print(
        f"# {len(variants)} variants x {settings['rounds']} rounds, {settings['loop']}, "
        f"{load}, {settings['connections']} connections, {settings['duration']} s windows, "
        f"pinned={pin}",
        file=sys.stderr,
    )
    for r in range(settings["rounds"]):
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        results: dict[str, Any] = {}
        for name in order:
            if name in raw["skipped"]:
                continue
            result = _run_variant(name, settings, first_round=r == 0)
            if "skipped" in result:
                raw["skipped"][name] = result["skipped"]
            elif "error" in result:
                raw["errors"].setdefault(name, []).append(result["error"])
                print(f"[{name}] error: {result['error']}", file=sys.stderr)
            else:
                results[name] = result
            elapsed = time.monotonic() - started
            print(f"  round {r + 1}: {name} done ({elapsed:.0f} s)", file=sys.stderr)
        raw["rounds"].append(results)
    raw["summary"] = summarise(raw)
    raw["elapsed_s"] = round(time.monotonic() - started, 1)
    env = raw["environment"]
    print(
        f"HTTP benchmark, {env['date']}: uvicorn 1 worker ({settings['loop']}), "
        f"{env['load_generator']}, {settings['connections']} connections, "
        f"{settings['rounds']} rounds x {settings['duration']} s per endpoint, "
        f"pinned={pin}, gc.freeze={settings['gc_freeze']}, {raw['elapsed_s']} s"
    )
    for path in endpoints:
        print()
        print(table(path, raw["summary"][path]))
    for name, why in raw["skipped"].items():
        print(f"\nskipped {name}: {why}")
    for name, errors in raw["errors"].items():
        print(f"\nerror {name}: {errors[0]}")
    out = args.json or RESULTS / f"http-{settings['loop']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    print(f"\nraw results: {out}")
    return 1 if raw["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
