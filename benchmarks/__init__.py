"""fastprof's benchmark harness: per-request overhead against a bare app, measured in the same run.

Run it with ``python -m benchmarks`` (see ``docs/performance.md``).
"""

__all__: list[str] = []
