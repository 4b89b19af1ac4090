"""pytest plugin used by ``scripts/fastapi_suite.py``: instrument every FastAPI app.

Loaded with ``-p _fastapi_suite_plugin`` (the script puts ``scripts/`` on
``PYTHONPATH``). It wraps ``fastapi.FastAPI.__init__`` so that every application
FastAPI's own tests create is passed to ``fastprof.instrument()`` right after
construction, with an SDK ``TracerProvider`` (``ALWAYS_ON`` sampler) whose only
span processor counts spans and discards them. At the end of the session it
prints, and writes to ``$FASTPROF_SUITE_STATS`` if set, how many apps were
instrumented, how many could not be, and how many requests were traced.

This module is a test harness, not part of fastprof.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import traceback
from typing import Any

import fastapi
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

import fastprof

__all__ = ["stats"]


class _CountingProcessor(SpanProcessor):
    """Counts ended spans by kind; keeps nothing (a discarding exporter)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.server_spans = 0
        self.other_spans = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            if span.kind is SpanKind.SERVER:
                self.server_spans += 1
            else:
                self.other_spans += 1

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_processor = _CountingProcessor()
_provider = TracerProvider(sampler=ALWAYS_ON)
_provider.add_span_processor(_processor)

stats: dict[str, Any] = {
    "apps_created": 0,
    "apps_instrumented": 0,
    "apps_not_instrumented": 0,
    "not_instrumented_errors": {},
}

# FASTPROF_SUITE_DEPENDENCIES=off|marked|all (default all): to tell dependency-span
# effects apart from server-span ones when a test differs.
_MODE = os.environ.get("FASTPROF_SUITE_DEPENDENCIES", "all")
_DEPENDENCIES: Any = False if _MODE == "off" else fastprof.DependencySpans(mode=_MODE)  # type: ignore[arg-type]

_original_init = fastapi.FastAPI.__init__


@functools.wraps(_original_init)
def _instrumenting_init(self: fastapi.FastAPI, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    # Only the outermost __init__ of a subclass chain instruments (a subclass
    # calling super().__init__() reaches here first, then finishes its own).
    stats["apps_created"] += 1
    try:
        fastprof.instrument(self, tracer_provider=_provider, dependencies=_DEPENDENCIES)
    except Exception as exc:  # e.g. "Cannot add middleware after an application has started"
        stats["apps_not_instrumented"] += 1
        key = f"{type(exc).__name__}: {exc}"[:200]
        errors = stats["not_instrumented_errors"]
        errors[key] = errors.get(key, 0) + 1
        if os.environ.get("FASTPROF_SUITE_DEBUG"):
            traceback.print_exc()
    else:
        stats["apps_instrumented"] += 1


fastapi.FastAPI.__init__ = _instrumenting_init  # type: ignore[method-assign]


def _summary() -> dict[str, Any]:
    return {
        **stats,
        "not_instrumented_errors": dict(stats["not_instrumented_errors"]),
        "requests_traced": _processor.server_spans,
        "other_spans": _processor.other_spans,
    }


def _worker_files() -> list[str]:
    path = os.environ.get("FASTPROF_SUITE_STATS")
    if not path:
        return []
    folder, prefix = os.path.split(path)
    return [
        os.path.join(folder, name)
        for name in os.listdir(folder or ".")
        if name.startswith(prefix + ".gw") and name.endswith(".json")
    ]


def _totals() -> dict[str, Any]:
    """This process's numbers, or under xdist (the controller) the workers' sum."""
    s = _summary()
    if s["apps_created"] or os.environ.get("PYTEST_XDIST_WORKER"):
        return s
    for file in _worker_files():
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        for key, value in data.items():
            if isinstance(value, int):
                s[key] += value
            elif isinstance(value, dict):
                for k, v in value.items():
                    s[key][k] = s[key].get(k, 0) + v
    return s


def pytest_terminal_summary(terminalreporter: Any) -> None:
    s = _totals()
    terminalreporter.write_sep("=", "fastprof instrumentation")
    terminalreporter.write_line(
        f"apps instrumented: {s['apps_instrumented']} (not instrumentable: "
        f"{s['apps_not_instrumented']}), requests traced (SERVER spans): "
        f"{s['requests_traced']}, other spans: {s['other_spans']}"
    )
    for err, n in s["not_instrumented_errors"].items():
        terminalreporter.write_line(f"  not instrumented x{n}: {err}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("FASTPROF_SUITE_STATS")
    if not path:
        return
    # Under xdist each worker writes its own file; the script adds them up.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{path}.{worker}.json", "w", encoding="utf-8") as f:
        json.dump(_summary(), f)
