#!/usr/bin/env python3
"""Run FastAPI's own test suite twice, without and with fastprof, and compare.

Usage (from anywhere; stdlib + pip only)::

    python scripts/fastapi_suite.py                      # FastAPI version of this interpreter
    python scripts/fastapi_suite.py --fastapi 0.115.14   # another version (own virtualenv)
    python scripts/fastapi_suite.py --subset tests/test_tutorial/test_dependencies

Steps: download the sdist of the FastAPI version (``pip download --no-binary``),
unpack it, make a virtualenv (default ``.fastapi-suite-venv[-<version>]`` at the
repo root) with that FastAPI, its test requirements (those that fail to install
are skipped and reported) and ``-e <repo root>`` for fastprof, then run the
sdist's ``tests/`` with pytest twice, each with ``--junitxml``: once plain and
once with ``-p _fastapi_suite_plugin`` which passes every ``FastAPI()`` to
``fastprof.instrument()``. Prints the tests that pass without fastprof but not
with it, and writes a JSON report. Exit status: 0 if there are no regressions
beyond the ``--allow`` list, 1 otherwise, 2 on a harness error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent

# Harness tools added to FastAPI's own test requirements (older FastAPI versions
# do not list them): a per-test timeout and, if it works, parallel runs.
_ALWAYS = ["pytest-timeout", "pytest-xdist"]


def log(msg: str) -> None:
    print(f"[fastapi-suite] {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def installed_fastapi_version() -> str:
    try:
        from importlib.metadata import version

        return version("fastapi")
    except Exception:
        sys.exit("FastAPI is not installed in this interpreter; pass --fastapi VERSION")


def download_sdist(version: str, dest: Path) -> Path:
    log(f"downloading the fastapi=={version} sdist")
    res = run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            f"fastapi=={version}",
            "-d",
            str(dest),
        ],
    )
    if res.returncode != 0:
        sys.exit(f"pip download of fastapi=={version} failed")
    archives = list(dest.glob("fastapi-*.tar.gz"))
    if not archives:
        sys.exit("no sdist downloaded")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(dest, filter="data")
    src = dest / f"fastapi-{version}"
    if not (src / "tests").is_dir():
        sys.exit(f"the fastapi {version} sdist has no tests/ directory: nothing to run")
    return src


def _read_requirements_file(path: Path, seen: set[Path]) -> list[str]:
    if path in seen or not path.exists():
        return []
    seen.add(path)
    reqs: list[str] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            reqs += _read_requirements_file(path.parent / line.split(None, 1)[1], seen)
        elif line.startswith("-e ") or line.startswith("-"):
            continue  # "-e .[all]" is the package itself: installed separately
        else:
            reqs.append(line)
    return reqs


def _group(groups: dict[str, list[object]], name: str, seen: set[str]) -> list[str]:
    if name in seen:
        return []
    seen.add(name)
    out: list[str] = []
    for item in groups.get(name, []):
        if isinstance(item, dict) and "include-group" in item:
            out += _group(groups, str(item["include-group"]), seen)
        elif isinstance(item, str):
            out.append(item)
    return out


def test_requirements(src: Path) -> tuple[list[str], str]:
    """FastAPI's test requirements and where they were read from."""
    req_file = src / "requirements-tests.txt"
    if req_file.exists():
        return _read_requirements_file(req_file, set()), req_file.name
    pyproject = tomllib.loads((src / "pyproject.toml").read_text())
    groups = pyproject.get("dependency-groups", {})
    if "tests" in groups:
        return _group(groups, "tests", set()), "pyproject.toml [dependency-groups] tests"
    return [], "(none found)"


def _extra_for(src: Path) -> str:
    pyproject = tomllib.loads((src / "pyproject.toml").read_text())
    extras = pyproject.get("project", {}).get("optional-dependencies", {})
    return "[all]" if "all" in extras else ""


def make_venv(venv: Path, version: str, src: Path, reqs: list[str], pins: list[str]) -> list[str]:
    """Create/refresh the virtualenv; return the requirements that failed to install."""
    py = venv / "bin" / "python"
    stamp = venv / ".fastapi-suite-stamp"
    all_reqs = reqs + [r for r in _ALWAYS if not any(r in x for x in reqs)]
    want = json.dumps({"fastapi": version, "reqs": all_reqs, "pins": pins})
    if py.exists() and stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("want") == want:
            log(f"reusing {venv}")
            return list(saved.get("failed", []))
    if not py.exists():
        log(f"creating virtualenv {venv}")
        res = run([sys.executable, "-m", "venv", str(venv)])
        if res.returncode != 0:
            sys.exit("python -m venv failed")
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    constraints = venv / "constraints.txt"
    constraints.write_text("".join(f"{c}\n" for c in [f"fastapi=={version}", *pins]))
    base = [f"fastapi{_extra_for(src)}=={version}", "-e", str(ROOT)]
    log(f"installing {' '.join(base)}")
    res = run(pip + ["-c", str(constraints)] + base)
    if res.returncode != 0:
        log("fastapi[all] failed to install; trying plain fastapi")
        res = run(pip + ["-c", str(constraints), f"fastapi=={version}", "-e", str(ROOT)])
        if res.returncode != 0:
            sys.exit("could not install fastapi and fastprof into the virtualenv")
    log(f"installing {len(all_reqs)} test requirements")
    failed: list[str] = []
    res = run(pip + ["-c", str(constraints)] + all_reqs, capture_output=True)
    if res.returncode != 0:
        log("bulk install failed; installing one by one")
        for req in all_reqs:
            r = run(pip + ["-c", str(constraints), req], capture_output=True)
            if r.returncode != 0:
                failed.append(req)
                log(f"  skipped (failed to install): {req}")
    stamp.write_text(json.dumps({"want": want, "failed": failed}))
    return failed


def _suite_sets_timeout(src: Path) -> bool:
    tool = tomllib.loads((src / "pyproject.toml").read_text()).get("tool", {})
    pytest_cfg = tool.get("pytest", {})
    return "timeout" in pytest_cfg or "timeout" in pytest_cfg.get("ini_options", {})


def xdist_works(py: Path, src: Path, workers: str, extra: list[str]) -> bool:
    """Does one small test file pass under ``-n workers`` (with the same options)?"""
    probe = run(
        [
            str(py),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-n",
            workers,
            *extra,
            "tests/test_default_response_class.py",
        ],
        cwd=src,
        capture_output=True,
    )
    return probe.returncode == 0


def run_pytest(
    py: Path,
    src: Path,
    paths: list[str],
    junit: Path,
    extra: list[str],
    with_fastprof: bool,
    stats_prefix: Path,
) -> tuple[int, float, str]:
    cmd = [
        str(py),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rN",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit1",
    ] + extra
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if with_fastprof:
        cmd += ["-p", "_fastapi_suite_plugin"]
        env["PYTHONPATH"] = str(SCRIPTS)
        env["FASTPROF_SUITE_STATS"] = str(stats_prefix)
        for old in stats_prefix.parent.glob(stats_prefix.name + ".*.json"):
            old.unlink()
    cmd += paths
    label = "with fastprof" if with_fastprof else "plain"
    log(f"running ({label}): {' '.join(cmd[3:])}")
    t0 = time.monotonic()
    res = run(cmd, cwd=src, env=env, capture_output=True)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    tail = "\n".join(out.strip().splitlines()[-8:])
    log(f"{label}: exit {res.returncode} in {elapsed:.0f}s\n{tail}")
    (junit.with_suffix(".log")).write_text(out)
    return res.returncode, elapsed, out


def parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, message); outcome in passed/failed/error/skipped."""
    results: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return results
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/")
        tid = f"{case.get('classname')}::{case.get('name')}"
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                msg = (child.get("message") or "").strip()
                if child.tag != "skipped":
                    break
        # A test can appear twice (call failure + teardown error): keep the worst.
        prev = results.get(tid)
        if prev is None or prev[0] in ("passed", "skipped"):
            results[tid] = (outcome, msg)
        del file
    return results


def merge_stats(prefix: Path) -> dict[str, object]:
    total: dict[str, object] = {}
    for f in prefix.parent.glob(prefix.name + ".*.json"):
        data = json.loads(f.read_text())
        for k, v in data.items():
            if isinstance(v, int):
                total[k] = int(total.get(k, 0)) + v  # type: ignore[call-overload]
            elif isinstance(v, dict):
                d = total.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv  # type: ignore[union-attr]
    return total


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fastapi", help="FastAPI version (default: the one installed in this Python)")
    ap.add_argument(
        "--venv", type=Path, help="virtualenv to (re)use (default: .fastapi-suite-venv[-VERSION])"
    )
    ap.add_argument(
        "--workdir", type=Path, help="where to unpack and write results (default: a temp dir)"
    )
    ap.add_argument(
        "--subset",
        nargs="+",
        metavar="PATH",
        help="run only these paths, relative to the sdist root (e.g. tests/test_tutorial)",
    )
    ap.add_argument(
        "-n",
        "--workers",
        default="auto",
        help="pytest-xdist workers: 'auto', a number, or 0 for serial (default: auto)",
    )
    ap.add_argument(
        "--timeout",
        type=int,
        help="per-test timeout in seconds (pytest-timeout; default: the suite's)",
    )
    ap.add_argument("--only", choices=("both", "plain", "fastprof"), default="both")
    ap.add_argument("--report", type=Path, help="write the JSON report here too")
    ap.add_argument(
        "--allow",
        type=Path,
        default=SCRIPTS / "fastapi_suite_artefacts.txt",
        help="file of test ids (one a line, '#' comments) known to differ for harness reasons",
    )
    ap.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="SPEC",
        help="extra pip constraint for the virtualenv, repeatable (e.g. 'bcrypt<4.1' for the "
        "passlib-based tutorials of an old FastAPI)",
    )
    ap.add_argument(
        "--ignore-deprecations",
        action="store_true",
        help="turn off the suite's filterwarnings=error for DeprecationWarning in both runs "
        "(an old FastAPI's suite against today's anyio/starlette fails collection otherwise)",
    )
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()

    version = args.fastapi or installed_fastapi_version()
    default_venv = ".fastapi-suite-venv" if not args.fastapi else f".fastapi-suite-venv-{version}"
    venv = (args.venv or ROOT / default_venv).resolve()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fastapi-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    src_parent = workdir / "sdist"
    if src_parent.exists():
        shutil.rmtree(src_parent)
    src_parent.mkdir()
    src = download_sdist(version, src_parent)
    reqs, where = test_requirements(src)
    log(f"{len(reqs)} test requirements from {where}")
    failed_reqs = make_venv(venv, version, src, reqs, args.constraint)
    py = venv / "bin" / "python"
    got = run(
        [str(py), "-c", "import fastapi, fastprof; print(fastapi.__version__, fastprof.__file__)"],
        cwd=src,
        capture_output=True,
    )
    log(f"virtualenv: fastapi, fastprof = {got.stdout.strip() or got.stderr.strip()}")

    extra: list[str] = []
    if args.timeout:
        extra += ["-o", f"timeout={args.timeout}"]
    has_timeout = run([str(py), "-c", "import pytest_timeout"], capture_output=True).returncode == 0
    if has_timeout and not args.timeout and not _suite_sets_timeout(src):
        extra += ["-o", "timeout=60"]  # older suites set none: never hang
    if not has_timeout:
        log("pytest-timeout is not installed: no per-test timeout")
    if args.ignore_deprecations:
        extra += ["-W", "ignore::DeprecationWarning", "-W", "ignore::PendingDeprecationWarning"]
    workers = str(args.workers)
    has_xdist = run([str(py), "-c", "import xdist"], capture_output=True).returncode == 0
    if workers != "0" and has_xdist and xdist_works(py, src, workers, extra):
        extra += ["-n", workers]
        log(f"using pytest-xdist -n {workers}")
    else:
        workers = "0"
        log("running serially (no working pytest-xdist or -n 0)")
    extra += args.pytest_args
    paths = args.subset or ["tests"]

    results: dict[str, dict[str, tuple[str, str]]] = {}
    times: dict[str, float] = {}
    codes: dict[str, int] = {}
    stats_prefix = workdir / "fastprof-stats"
    for name, with_fp in (("plain", False), ("fastprof", True)):
        if args.only not in ("both", name):
            continue
        junit = workdir / f"junit-{name}.xml"
        codes[name], times[name], _ = run_pytest(
            py, src, paths, junit, extra, with_fp, stats_prefix
        )
        results[name] = parse_junit(junit)
        if codes[name] not in (0, 1):
            log(f"pytest ({name}) exited {codes[name]}: see {junit.with_suffix('.log')}")

    allow: set[str] = set()
    if args.allow and args.allow.exists():
        allow = {
            line.split("#", 1)[0].strip()
            for line in args.allow.read_text().splitlines()
            if line.split("#", 1)[0].strip()
        }

    def count(res: dict[str, tuple[str, str]], outcome: str) -> int:
        return sum(1 for o, _ in res.values() if o == outcome)

    report: dict[str, object] = {
        "fastapi": version,
        "python": sys.version.split()[0],
        "requirements_source": where,
        "requirements_failed": failed_reqs,
        "workers": workers,
        "paths": paths,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "exit_codes": codes,
    }
    for name, res in results.items():
        report[name] = {o: count(res, o) for o in ("passed", "failed", "error", "skipped")} | {
            "total": len(res)
        }
    regressions: list[dict[str, str]] = []
    if "plain" in results and "fastprof" in results:
        plain, fp = results["plain"], results["fastprof"]
        for tid, (outcome, _) in sorted(plain.items()):
            if outcome != "passed":
                continue
            o2, msg = fp.get(tid, ("missing", "not run with fastprof"))
            if o2 not in ("passed",):
                regressions.append(
                    {"test": tid, "outcome": o2, "message": msg[:300], "allowed": str(tid in allow)}
                )
        fixed = [
            t
            for t, (o, _) in fp.items()
            if o == "passed" and plain.get(t, ("",))[0] not in ("passed",)
        ]
        report["passed_only_with_fastprof"] = fixed
        report["regressions"] = regressions
        report["fastprof_stats"] = merge_stats(stats_prefix)
    report["total_time_s"] = round(time.monotonic() - t_start, 1)

    out = workdir / "report.json"
    out.write_text(json.dumps(report, indent=2))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2))

    print()
    print(f"FastAPI {version} test suite, Python {report['python']}, workers={workers}")
    if failed_reqs:
        print(f"test requirements not installed: {', '.join(failed_reqs)}")
    for name in results:
        r = report[name]
        print(
            f"  {name:9s}: {r['total']} tests, {r['passed']} passed, {r['failed']} failed, "  # type: ignore[index]
            f"{r['error']} errors, {r['skipped']} skipped in {times[name]:.0f}s"
        )  # type: ignore[index]
    if "fastprof_stats" in report:
        print(f"  fastprof : {json.dumps(report['fastprof_stats'])}")
    if "regressions" in report:
        unexpected = [r for r in regressions if r["allowed"] != "True"]
        print(
            f"  pass without fastprof, not with it: {len(regressions)} "
            f"({len(regressions) - len(unexpected)} allowed as harness artefacts)"
        )
        for r in regressions:
            tag = "  [allowed]" if r["allowed"] == "True" else ""
            msg = re.sub(r"\s+", " ", r["message"])[:160]
            print(f"    {r['outcome']:7s} {r['test']}{tag}\n            {msg}")
        print(f"report: {out}")
        return 1 if unexpected else 0
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(2)
