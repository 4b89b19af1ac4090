"""Profile one variant on one endpoint: ``python -m benchmarks.profile fastprof-unsampled /plain``.

Drives the variant's app in-process like the benchmark does, under cProfile (default) or
pyinstrument, and prints the hottest functions. Use it to find why a variant costs what it does.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
from pathlib import Path

if __package__ in (None, ""):  # ``python benchmarks/profile.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._worker import _discard, _drive, _scope
from benchmarks.variants import VARIANTS, SetupContext

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    p.add_argument("variant", choices=sorted(VARIANTS))
    p.add_argument("endpoint", nargs="?", default="/plain")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--profiler", choices=("cprofile", "pyinstrument"), default="cprofile")
    p.add_argument("--sort", default="tottime", help="pstats sort key (cProfile)")
    p.add_argument("--limit", type=int, default=30)
    args = p.parse_args(argv)

    app = VARIANTS[args.variant].setup(SetupContext())
    template = _scope(args.endpoint)

    async def drive(n: int) -> None:
        await _drive(app, template, n, _discard)

    asyncio.run(drive(200))  # warm-up (also builds the middleware stack)
    if args.profiler == "pyinstrument":
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0001, async_mode="disabled")
        profiler.start()
        asyncio.run(drive(args.requests))
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False))
        return 0
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(drive(args.requests))
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats(args.sort).print_stats(args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
