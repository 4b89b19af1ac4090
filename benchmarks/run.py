"""Run the benchmark: ``python -m benchmarks [--quick] [--variants ...] [--endpoints ...]``.

Every variant run is a fresh worker process (``benchmarks._worker``). Runs are interleaved:
each round runs every variant once (the starting variant rotates between rounds), so slow
drifts of the machine hit all variants alike. Ratios compare each variant with ``bare`` from
the same invocation; ``bare-AA`` is a second bare app whose ratio shows the noise floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.app import ENDPOINTS
from benchmarks.variants import VARIANTS

__all__ = ["TABLE_HEADER", "main", "summarise"]

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "bare"

# Requests per endpoint per variant run, sized so a run takes ~2 s; many short rounds rather
# than a few long ones, so that slow phases of a shared machine hit every variant alike.
FULL: dict[str, Any] = {
    "rounds": 9,
    "requests": {"/plain": 2000, "/deps": 1000, "/items": 400},
    "warmup": {"/plain": 300, "/deps": 150, "/items": 60},
    "memory_requests": 300,
}
QUICK: dict[str, Any] = {
    "rounds": 2,
    "requests": {"/plain": 500, "/deps": 300, "/items": 100},
    "warmup": {"/plain": 100, "/deps": 50, "/items": 20},
    "memory_requests": 100,
}
PACKAGES = (
    "fastprof-asgi",
    "fastapi",
    "starlette",
    "pydantic",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-fastapi",
    "opentelemetry-instrumentation-asgi",
    "pyinstrument",
    "uvloop",
)


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Per-request overhead of fastprof and alternatives against a bare FastAPI app.",
    )
    p.add_argument("--quick", action="store_true", help="short run (2 rounds, few requests)")
    p.add_argument(
        "--variants",
        type=_csv,
        help=f"comma-separated variants (default: all default ones); '{BASELINE}' is always added",
    )
    p.add_argument(
        "--endpoints", type=_csv, help=f"comma-separated endpoints (default: {','.join(ENDPOINTS)})"
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 9, quick 2)")
    p.add_argument(
        "--requests", type=int, help="timed requests per endpoint per run (overrides the defaults)"
    )
    p.add_argument("--warmup", type=int, help="warm-up requests per endpoint per run")
    p.add_argument(
        "--memory-requests",
        type=int,
        help="requests traced by tracemalloc per endpoint, first round only (0 disables)",
    )
    p.add_argument(
        "--processor",
        choices=("simple", "batch"),
        default="simple",
        help="span processor for sampled variants, exporting to a discarding exporter",
    )
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--json", type=Path, help="write raw results here (default: no file)")
    p.add_argument("--list", action="store_true", help="list variants and exit")
    return p


def _environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "packages": versions,
    }


def _worker_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "FASTAPI_OTEL_")) and k != "PYTHONPATH"
    }
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONHASHSEED"] = "0"
    return env


def _run_worker(plan: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._worker", json.dumps(plan)],
        cwd=ROOT,
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"variant": plan["variant"], "error": f"exit {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _plan_settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    endpoints = args.endpoints or list(ENDPOINTS)
    for path in endpoints:
        if path not in ENDPOINTS:
            raise SystemExit(
                f"--endpoints: unknown endpoint {path!r}; known: {', '.join(ENDPOINTS)}"
            )
    requests = {p: args.requests or base["requests"][p] for p in endpoints}
    warmup = {p: args.warmup if args.warmup is not None else base["warmup"][p] for p in endpoints}
    return {
        "rounds": args.rounds or base["rounds"],
        "endpoints": endpoints,
        "requests": requests,
        "warmup": warmup,
        "memory_requests": (
            args.memory_requests if args.memory_requests is not None else base["memory_requests"]
        ),
        "processor": args.processor,
        "loop": args.loop,
    }


def _choose_variants(names: list[str] | None) -> list[str]:
    if names is None:
        chosen = [name for name, v in VARIANTS.items() if v.default]
    else:
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(
                f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}"
            )
        chosen = list(dict.fromkeys(names))
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)
    return chosen


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Per endpoint and variant: statistics over rounds and comparisons with bare.

    Each round gives one number per variant: the median µs of its requests. The headline
    (``best_us``, ``ratio``, ``delta_us``) takes each variant's best round: noise on a shared
    machine only ever adds time, and whole worker processes land in slow phases at random,
    which makes the median of few rounds jump (see the A/A control). ``median_us`` and
    ``median_ratio`` are the median of rounds, for comparison.
    """
    summary: dict[str, Any] = {}
    for path in raw["settings"]["endpoints"]:
        rows: dict[str, Any] = {}
        for name, runs in raw["runs"].items():
            results = [r["endpoints"][path] for r in runs if "endpoints" in r]
            if not results:
                continue
            per_round = [e["median_us"] for e in results]
            q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else per_round * 3
            rows[name] = {
                "best_us": min(per_round),
                "median_us": statistics.median(per_round),
                "max_us": max(per_round),
                "iqr_us": [q[0], q[2]],
                "per_round_us": per_round,
                "mean_us": statistics.median(e["mean_us"] for e in results),
                "cpu_us": min(e["cpu_us"] for e in results),
                "response_bytes": results[0]["response_bytes"],
                "memory": next((e["memory"] for e in results if "memory" in e), None),
            }
        base = rows.get(BASELINE)
        for row in rows.values():
            if base is None:
                for key in ("ratio", "delta_us", "median_ratio", "cpu_ratio", "paired_ratio"):
                    row[key] = None
                continue
            row["ratio"] = row["best_us"] / base["best_us"]
            row["delta_us"] = row["best_us"] - base["best_us"]
            row["median_ratio"] = row["median_us"] / base["median_us"]
            row["cpu_ratio"] = row["cpu_us"] / base["cpu_us"]
            # Round by round (this variant vs bare in the same round), median over rounds.
            paired = [
                v / b for v, b in zip(row["per_round_us"], base["per_round_us"], strict=False)
            ]
            row["paired_ratio"] = statistics.median(paired)
            if row["response_bytes"] != base["response_bytes"]:
                row["warning"] = (
                    f"response size {row['response_bytes']} differs from bare's "
                    f"{base['response_bytes']}"
                )
        summary[path] = rows
    return summary


TABLE_HEADER = (
    "| variant | µs/request | x bare | +µs | median of rounds | x bare (median) "
    "| spread (min-max) | CPU µs | CPU x bare |"
)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _format_tables(raw: dict[str, Any]) -> str:
    settings = raw["settings"]
    out: list[str] = []
    for path, rows in raw["summary"].items():
        out.append(
            f"\n### `{path}` ({settings['requests'][path]} requests x {settings['rounds']} rounds"
            " per variant)\n"
        )
        memory = any(row.get("memory") for row in rows.values())
        header = TABLE_HEADER
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        if memory:
            header += " mem growth KiB | mem peak KiB |"
            rule += "---:|---:|"
        out += [header, rule]
        for name in raw["variants"]:
            row = rows.get(name)
            if row is None:
                continue
            line = (
                f"| {name} | {row['best_us']:.1f} | {_fmt(row['ratio'], '.2f')} "
                f"| {_fmt(row['delta_us'], '+.1f')} | {row['median_us']:.1f} "
                f"| {_fmt(row['median_ratio'], '.2f')} "
                f"| {row['best_us']:.1f}-{row['max_us']:.1f} "
                f"| {row['cpu_us']:.1f} | {_fmt(row['cpu_ratio'], '.2f')} |"
            )
            if memory:
                mem = row.get("memory")
                if mem:
                    line += f" {mem['growth_bytes'] / 1024:.1f} | {mem['peak_bytes'] / 1024:.1f} |"
                else:
                    line += " | |"
            out.append(line)
    notes = [f"- {name}: skipped ({reason})" for name, reason in raw["skipped"].items()]
    notes += [f"- {name}: FAILED ({err.splitlines()[-1]})" for name, err in raw["errors"].items()]
    for path, rows in raw["summary"].items():
        notes += [
            f"- {path} {name}: {row['warning']}" for name, row in rows.items() if "warning" in row
        ]
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, v in VARIANTS.items():
            reason = v.requires()
            flags = ("" if v.default else " [opt-in]") + (f" [skip: {reason}]" if reason else "")
            print(f"{name:26} {v.description}{flags}")
        return 0
    settings = _plan_settings(args)
    names = _choose_variants(args.variants)
    skipped: dict[str, str] = {}
    for name in names:
        reason = VARIANTS[name].requires()
        if reason is not None:
            skipped[name] = reason
    active = [n for n in names if n not in skipped]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in active}
    errors: dict[str, str] = {}
    environment = _environment()
    started = time.monotonic()
    command = "python -m benchmarks" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv)
        if (sys.argv[1:] if argv is None else argv)
        else ""
    )
    print(f"# {command}: {len(active)} variants x {settings['rounds']} rounds", file=sys.stderr)
    for round_index in range(settings["rounds"]):
        live = [n for n in active if n not in skipped and n not in errors]
        shift = round_index % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            plan = {
                "variant": name,
                **{k: settings[k] for k in ("endpoints", "requests", "warmup")},
                "memory_requests": settings["memory_requests"] if round_index == 0 else 0,
                "processor": settings["processor"],
                "loop": settings["loop"],
            }
            result = _run_worker(plan)
            if "skipped" in result:
                skipped[name] = result["skipped"]
            elif "error" in result:
                errors[name] = result["error"]
                print(f"  {name}: FAILED\n{result['error']}", file=sys.stderr)
            else:
                runs[name].append(result)
                medians = ", ".join(
                    f"{p} {e['median_us']:.0f}" for p, e in result["endpoints"].items()
                )
                print(
                    f"  round {round_index + 1} {name:26} {medians} µs "
                    f"[{time.monotonic() - started:.0f}s]",
                    file=sys.stderr,
                )
    raw: dict[str, Any] = {
        "command": command,
        "environment": environment,
        "settings": settings,
        "variants": [n for n in names if runs.get(n)],
        "descriptions": {n: VARIANTS[n].description for n in names},
        "skipped": skipped,
        "errors": errors,
        "runs": {n: r for n, r in runs.items() if r},
        "elapsed_s": round(time.monotonic() - started, 1),
        "load_average_after": list(os.getloadavg()),
    }
    raw["summary"] = summarise(raw)
    env = raw["environment"]
    print(
        f"{command}\n{env['date']}; {env['cpus']} CPUs; {env['implementation']} {env['python']}; "
        f"{env['platform']}; span processor: {settings['processor']}; loop: {settings['loop']}; "
        f"took {raw['elapsed_s']} s; load average before "
        f"{env['load_average'][0]:.2f}, after {raw['load_average_after'][0]:.2f}\n"
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    )
    print(_format_tables(raw))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
        print(f"\nraw results: {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
