"""Configuration from the environment: ``FASTPROF_*`` for fastprof, the standard ``OTEL_*``
for tracing.

This is what ``fastprof run`` (and the ``fastprof.run:app`` entry point for gunicorn
and ``fastapi run``) uses; call it yourself to configure an app you instrument in code::

    app = fastprof.config.instrument_from_env(FastAPI())

Every variable is read and validated when this is called, at start-up: a bad value
raises ``ValueError`` naming the variable, never a failure per request. The
reference table is ``docs/configuration.md``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

from opentelemetry import trace
from starlette.applications import Starlette
from starlette.types import Scope

from fastprof import (
    DependencySpans,
    FastprofMiddleware,
    LoopMonitor,
    Profiling,
    RequestHooks,
    ServerTiming,
    SlowRequestCapture,
    SlowRequestLog,
    _internal_errors,
    instrument,
)
from fastprof._options import check_int
from fastprof.dependencies import DEFAULT_MAX_SPANS
from fastprof.profiling import FileStore, MemoryStore

__all__ = [
    "VARIABLES",
    "EnvConfig",
    "check_environ",
    "from_environ",
    "instrument_from_env",
    "resource_from_env",
    "setup_tracing_from_env",
]

logger = logging.getLogger("fastprof")

AppT = TypeVar("AppT", bound=Starlette)

#: Names of every variable fastprof reads (the docs table lists each one).
VARIABLES: Final[tuple[str, ...]] = (
    "FASTPROF_ENABLED",
    "FASTPROF_APP",
    "FASTPROF_APP_FACTORY",
    "FASTPROF_SHUTDOWN_TIMEOUT_S",
    "FASTPROF_EXCLUDE",
    "FASTPROF_REQUEST_ID_HEADER",
    "FASTPROF_RESPONSE_REQUEST_ID_HEADER",
    "FASTPROF_QUERY",
    "FASTPROF_REDACT_QUERY_KEYS",
    "FASTPROF_MAX_ATTRIBUTE_LENGTH",
    "FASTPROF_HOOKS",
    "FASTPROF_DEPENDENCIES",
    "FASTPROF_DEPENDENCIES_MAX_SPANS",
    "FASTPROF_PROFILING",
    "FASTPROF_SECRET",
    "FASTPROF_PREVIOUS_SECRETS",
    "FASTPROF_PROFILING_HEADER",
    "FASTPROF_PROFILING_MAX_TOKEN_TTL_S",
    "FASTPROF_PROFILING_REPLAY_CACHE_SIZE",
    "FASTPROF_PROFILING_SAMPLE_RATE",
    "FASTPROF_PROFILING_SAMPLE_ROUTES",
    "FASTPROF_PROFILING_DEV_MODE",
    "FASTPROF_PROFILING_QUERY_PARAM",
    "FASTPROF_PROFILING_MAX_CONCURRENT",
    "FASTPROF_PROFILING_MAX_PER_MINUTE",
    "FASTPROF_PROFILING_INTERVAL_S",
    "FASTPROF_PROFILING_MAX_DURATION_S",
    "FASTPROF_PROFILING_BASE_URL",
    "FASTPROF_PROFILING_RESPONSE_HEADER",
    "FASTPROF_PROFILING_TOP_FRAMES",
    "FASTPROF_PROFILING_EMBED_MAX_BYTES",
    "FASTPROF_PROFILING_WRITER_QUEUE_SIZE",
    "FASTPROF_PROFILING_STORE_DIR",
    "FASTPROF_PROFILING_STORE_MAX_COUNT",
    "FASTPROF_PROFILING_STORE_MAX_BYTES",
    "FASTPROF_PROFILING_STORE_TTL_S",
    "FASTPROF_PROFILING_VIEWER_PATH",
    "FASTPROF_LOOP_MONITOR",
    "FASTPROF_LOOP_MONITOR_THRESHOLD_S",
    "FASTPROF_LOOP_MONITOR_INTERVAL_S",
    "FASTPROF_LOOP_MONITOR_SAMPLE_INTERVAL_S",
    "FASTPROF_LOOP_MONITOR_MAX_SAMPLES",
    "FASTPROF_LOOP_MONITOR_MAX_STACK_DEPTH",
    "FASTPROF_LOOP_MONITOR_MAX_STACK_CHARS",
    "FASTPROF_LOOP_MONITOR_MAX_REPORTS_PER_MINUTE",
    "FASTPROF_LOOP_MONITOR_THREADPOOL",
    "FASTPROF_LOOP_MONITOR_SATURATION_LOG_INTERVAL_S",
    "FASTPROF_SLOW_REQUESTS",
    "FASTPROF_SLOW_REQUESTS_THRESHOLD_S",
    "FASTPROF_SLOW_REQUESTS_TOP",
    "FASTPROF_SLOW_REQUESTS_LEVEL",
    "FASTPROF_SLOW_REQUESTS_EVENT",
    "FASTPROF_SLOW_REQUESTS_DEPENDENCIES",
    "FASTPROF_SLOW_CAPTURE",
    "FASTPROF_SLOW_CAPTURE_THRESHOLD_S",
    "FASTPROF_SLOW_CAPTURE_ROUTES",
    "FASTPROF_SLOW_CAPTURE_MAX_PER_MINUTE",
    "FASTPROF_SLOW_CAPTURE_MAX_SPANS",
    "FASTPROF_SLOW_CAPTURE_TEARDOWN_WAIT_S",
    "FASTPROF_SERVER_TIMING",
    "FASTPROF_SERVER_TIMING_ALLOW",
    "FASTPROF_SERVER_TIMING_PROFILED",
    "FASTPROF_SERVER_TIMING_TOP",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS",
    "OTEL_PYTHON_STARLETTE_EXCLUDED_URLS",
    "OTEL_PYTHON_EXCLUDED_URLS",
)

#: Variables whose values are credentials: never echoed in an error message.
_SECRET_VARIABLES: Final = frozenset(
    {
        "FASTPROF_SECRET",
        "FASTPROF_PREVIOUS_SECRETS",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    }
)

# Other FASTPROF_* variables in use that are not configuration (the project's scripts).
_NOT_CONFIGURATION: Final = re.compile(r"FASTPROF_(VENV|SKIP_OLDEST|SUITE_.*)")

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


class _Env:
    """Typed reads of environment variables; each failure is a ValueError naming the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str | None:
        """The stripped value, ``None`` when unset or empty (as in many env files)."""
        value = self._environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def error(self, name: str, expected: str) -> ValueError:
        shown = "<hidden>" if name in _SECRET_VARIABLES else repr(self.raw(name))
        return ValueError(f"{name}: expected {expected}, got {shown}")

    def first(self, *names: str) -> str | None:
        """The first of ``names`` that is set (a signal-specific variable before a general one)."""
        return next((n for n in names if self.raw(n) is not None), None)

    def text(self, name: str) -> str | None:
        return self.raw(name)

    def boolean(self, name: str) -> bool | None:
        raw = self.raw(name)
        if raw is None:
            return None
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise self.error(name, "true or false")

    def integer(self, name: str) -> int | None:
        raw = self.raw(name)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise self.error(name, "an integer") from None

    def number(self, name: str) -> float | None:
        raw = self.raw(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise self.error(name, "a number") from None
        if not math.isfinite(value):
            raise self.error(name, "a finite number")
        return value

    def bounded(self, name: str, low: float, high: float, unit: str = "") -> float | None:
        value = self.number(name)
        if value is not None and not low <= value <= high:
            raise self.error(name, f"a number{unit} between {low:g} and {high:g}")
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        raw = self.raw(name)
        if raw is None:
            return None
        if raw.lower() not in choices:
            raise self.error(name, "one of " + ", ".join(choices))
        return raw.lower()

    def items(self, name: str) -> list[str] | None:
        raw = self.raw(name)
        if raw is None:
            return None
        return [item.strip() for item in raw.split(",") if item.strip()]

    def pairs(self, name: str) -> dict[str, str] | None:
        """``key=value,key2=value2`` (W3C baggage style: values percent-decoded)."""
        items = self.items(name)
        if items is None:
            return None
        out: dict[str, str] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise self.error(name, "comma-separated key=value pairs")
            out[unquote(key.strip())] = unquote(value.strip())
        return out

    def header(self, name: str, default: str | None) -> str | None:
        """A header name; ``none`` turns the header off."""
        raw = self.raw(name)
        if raw is None:
            return default
        return None if raw.lower() == "none" else raw


@dataclass(frozen=True)
class EnvConfig:
    """fastprof's configuration as read from the environment by :func:`from_environ`.

    Attributes:
        enabled: ``FASTPROF_ENABLED``; when false :meth:`instrument` leaves the app alone.
        options: Keyword arguments for :func:`fastprof.instrument` (components built).
        viewer_path: Where the profile viewer is mounted, if anywhere.
        shutdown_timeout_s: Bound on flushing pending spans at lifespan shutdown.
        excluded_urls: The compiled ``OTEL_PYTHON_*_EXCLUDED_URLS`` patterns, if set.
    """

    enabled: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    viewer_path: str | None = None
    shutdown_timeout_s: float = 3.0
    excluded_urls: dict[str, re.Pattern[str]] = field(default_factory=dict)


# -- instrument() options ------------------------------------------------------


def _instrument_kwargs(
    *,
    exclude: list[str] | None,
    request_id_header: str | None,
    response_request_id_header: str | None,
    query: str | None,
    redact_query_keys: list[str] | None,
    max_attribute_length: int | None,
    hooks: list[RequestHooks],
    dependencies: str,
    dependencies_max_spans: int | None,
    profiling: Profiling | None,
    loop_monitor: LoopMonitor | None,
    slow_requests: SlowRequestLog | None,
    slow_capture: SlowRequestCapture | None,
    server_timing: ServerTiming | None,
) -> dict[str, Any]:
    """The environment's settings as :func:`fastprof.instrument` keyword arguments.

    The one place that knows ``instrument()``'s signature. ``dependencies`` is
    ``"all"``, ``"marked"`` or ``"off"``.
    """
    kwargs: dict[str, Any] = {
        "request_id_header": request_id_header,
        "response_request_id_header": response_request_id_header,
        "hooks": tuple(hooks),
        "profiling": profiling,
        "loop_monitor": loop_monitor,
        "slow_requests": slow_requests,
        "slow_capture": slow_capture,
        "server_timing": server_timing,
        "dependencies": dependencies != "off"
        and DependencySpans(
            mode="marked" if dependencies == "marked" else "all",
            max_spans=DEFAULT_MAX_SPANS
            if dependencies_max_spans is None
            else dependencies_max_spans,
        ),
    }
    if exclude is not None:
        kwargs["exclude"] = exclude
    if query is not None:
        kwargs["query"] = query
    if redact_query_keys is not None:
        kwargs["redact_query_keys"] = tuple(redact_query_keys)
    if max_attribute_length is not None:
        kwargs["max_attribute_length"] = max_attribute_length
    return kwargs


def _rename_error(exc: ValueError, env: _Env, names: Mapping[str, str]) -> ValueError:
    """``exc`` from a constructor ("option: ...") restated with the variable that set it."""
    message = str(exc)
    for option in sorted(names, key=len, reverse=True):
        if message.startswith(option) and message[len(option) : len(option) + 1] in (":", "["):
            name = names[option]
            shown = "<hidden>" if name in _SECRET_VARIABLES else repr(env.raw(name))
            return ValueError(f"{name}={shown}: {message}")
    return ValueError(f"{', '.join(sorted(set(names.values())))}: {message}")


def _build(
    factory: Callable[..., Any], env: _Env, names: Mapping[str, str], kwargs: dict[str, Any]
) -> Any:
    try:
        return factory(**kwargs)
    except ValueError as exc:
        raise _rename_error(exc, env, names) from None


def _import_object(name: str, ref: str) -> Any:
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ValueError(f"{name}: expected 'module:attribute' import strings, got {ref!r}")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{name}: cannot import {ref!r}: {exc}") from None
    return obj


def _hooks(env: _Env) -> list[RequestHooks]:
    hooks = []
    for ref in env.items("FASTPROF_HOOKS") or ():
        obj = _import_object("FASTPROF_HOOKS", ref)
        if not isinstance(obj, RequestHooks) and callable(obj):
            obj = obj()
        if not isinstance(obj, RequestHooks):
            raise ValueError(
                f"FASTPROF_HOOKS: {ref!r} is not a fastprof.RequestHooks (or a factory of one)"
            )
        hooks.append(obj)
    return hooks


def _switch(env: _Env, name: str, prefixes: tuple[str, ...]) -> bool:
    """A component is on when its switch says so, or, unset, when any of its variables is set."""
    on = env.boolean(name)
    if on is not None:
        return on
    return any(
        n.startswith(prefixes) and n != name and env.raw(n) is not None for n in VARIABLES
    )


_PROFILING_NUMBERS: Final = {
    "max_token_ttl_s": "FASTPROF_PROFILING_MAX_TOKEN_TTL_S",
    "replay_cache_size": "FASTPROF_PROFILING_REPLAY_CACHE_SIZE",
    "sample_rate": "FASTPROF_PROFILING_SAMPLE_RATE",
    "max_concurrent": "FASTPROF_PROFILING_MAX_CONCURRENT",
    "max_per_minute": "FASTPROF_PROFILING_MAX_PER_MINUTE",
    "interval_s": "FASTPROF_PROFILING_INTERVAL_S",
    "max_duration_s": "FASTPROF_PROFILING_MAX_DURATION_S",
    "top_frames": "FASTPROF_PROFILING_TOP_FRAMES",
    "embed_max_bytes": "FASTPROF_PROFILING_EMBED_MAX_BYTES",
    "writer_queue_size": "FASTPROF_PROFILING_WRITER_QUEUE_SIZE",
}
_PROFILING_INTS: Final = frozenset(
    {"replay_cache_size", "max_concurrent", "max_per_minute", "top_frames", "embed_max_bytes",
     "writer_queue_size"}
)
_PROFILING_NAMES: Final = {
    **_PROFILING_NUMBERS,
    "secret": "FASTPROF_SECRET",
    "header": "FASTPROF_PROFILING_HEADER",
    "sample_routes": "FASTPROF_PROFILING_SAMPLE_ROUTES",
    "dev_mode": "FASTPROF_PROFILING_DEV_MODE",
    "query_param": "FASTPROF_PROFILING_QUERY_PARAM",
    "base_url": "FASTPROF_PROFILING_BASE_URL",
    "response_header": "FASTPROF_PROFILING_RESPONSE_HEADER",
}
_STORE_NAMES: Final = {
    "max_count": "FASTPROF_PROFILING_STORE_MAX_COUNT",
    "max_bytes": "FASTPROF_PROFILING_STORE_MAX_BYTES",
    "ttl_s": "FASTPROF_PROFILING_STORE_TTL_S",
}


def _profiling(env: _Env) -> tuple[Profiling | None, str | None]:
    if not _switch(env, "FASTPROF_PROFILING", ("FASTPROF_PROFILING_", "FASTPROF_SECRET",
                                                "FASTPROF_PREVIOUS_SECRETS")):
        return None, None
    kwargs: dict[str, Any] = {}
    secrets = [s for s in (env.raw("FASTPROF_SECRET"),) if s]
    if env.raw("FASTPROF_PREVIOUS_SECRETS") is not None and not secrets:
        raise ValueError("FASTPROF_PREVIOUS_SECRETS: set FASTPROF_SECRET too (it signs tokens)")
    previous = env.items("FASTPROF_PREVIOUS_SECRETS") or []
    if previous:  # checked on their own, so that an error names their variable
        _build(Profiling, env, {"secret": "FASTPROF_PREVIOUS_SECRETS"}, {"secret": previous})
    secrets += previous
    if secrets:
        kwargs["secret"] = secrets[0] if len(secrets) == 1 else secrets
    for option, name in _PROFILING_NUMBERS.items():
        value = env.integer(name) if option in _PROFILING_INTS else env.number(name)
        if value is not None:
            kwargs[option] = value
    for option, name in (("header", "FASTPROF_PROFILING_HEADER"),
                         ("response_header", "FASTPROF_PROFILING_RESPONSE_HEADER")):
        if env.raw(name) is not None:
            kwargs[option] = env.header(name, None)
    routes = env.pairs("FASTPROF_PROFILING_SAMPLE_ROUTES")
    if routes is not None:
        rates: dict[str, float] = {}
        for route, rate in routes.items():
            try:
                rates[route] = float(rate)
            except ValueError:
                raise env.error(
                    "FASTPROF_PROFILING_SAMPLE_ROUTES", "route=rate pairs like /items/{id}=0.05"
                ) from None
        kwargs["sample_routes"] = rates
    dev_mode = env.boolean("FASTPROF_PROFILING_DEV_MODE")
    if dev_mode is not None:
        kwargs["dev_mode"] = dev_mode
    for option, name in (("query_param", "FASTPROF_PROFILING_QUERY_PARAM"),
                         ("base_url", "FASTPROF_PROFILING_BASE_URL")):
        if env.raw(name) is not None:
            kwargs[option] = env.text(name)
    viewer_path = env.text("FASTPROF_PROFILING_VIEWER_PATH")
    if viewer_path is not None:
        if not re.fullmatch(r"(/[A-Za-z0-9._~\-]+)+", viewer_path):
            raise env.error("FASTPROF_PROFILING_VIEWER_PATH", "a path like /_fastprof/profiles")
        if not secrets:
            raise ValueError(
                "FASTPROF_PROFILING_VIEWER_PATH: the viewer's default auth needs FASTPROF_SECRET"
            )
        kwargs.setdefault("base_url", viewer_path)
    store_kwargs: dict[str, Any] = {}
    for option, name in _STORE_NAMES.items():
        value = env.number(name) if option == "ttl_s" else env.integer(name)
        if value is not None:
            store_kwargs[option] = value
    directory = env.text("FASTPROF_PROFILING_STORE_DIR")
    if directory is not None:
        # Created on first use: refuse now what could never work then.
        if not os.path.isabs(directory) or (
            os.path.exists(directory) and not os.path.isdir(directory)
        ):
            raise env.error("FASTPROF_PROFILING_STORE_DIR", "an absolute path to a directory")
        kwargs["store"] = _build(FileStore, env, _STORE_NAMES, {"directory": directory,
                                                                **store_kwargs})
    elif store_kwargs:
        kwargs["store"] = _build(MemoryStore, env, _STORE_NAMES, store_kwargs)
    profiling: Profiling = _build(Profiling, env, _PROFILING_NAMES, kwargs)
    return profiling, viewer_path


_LOOP_NAMES: Final = {
    "threshold_s": "FASTPROF_LOOP_MONITOR_THRESHOLD_S",
    "interval_s": "FASTPROF_LOOP_MONITOR_INTERVAL_S",
    "sample_interval_s": "FASTPROF_LOOP_MONITOR_SAMPLE_INTERVAL_S",
    "max_samples": "FASTPROF_LOOP_MONITOR_MAX_SAMPLES",
    "max_stack_depth": "FASTPROF_LOOP_MONITOR_MAX_STACK_DEPTH",
    "max_stack_chars": "FASTPROF_LOOP_MONITOR_MAX_STACK_CHARS",
    "max_reports_per_minute": "FASTPROF_LOOP_MONITOR_MAX_REPORTS_PER_MINUTE",
    "threadpool": "FASTPROF_LOOP_MONITOR_THREADPOOL",
    "saturation_log_interval_s": "FASTPROF_LOOP_MONITOR_SATURATION_LOG_INTERVAL_S",
}


def _loop_monitor(env: _Env) -> LoopMonitor | None:
    if not _switch(env, "FASTPROF_LOOP_MONITOR", ("FASTPROF_LOOP_MONITOR_",)):
        return None
    kwargs: dict[str, Any] = {}
    for option, name in _LOOP_NAMES.items():
        if option == "threadpool":
            value: Any = env.boolean(name)
        elif option.endswith("_s"):
            value = env.number(name)
        else:
            value = env.integer(name)
        if value is not None:
            kwargs[option] = value
    monitor: LoopMonitor = _build(LoopMonitor, env, _LOOP_NAMES, kwargs)
    return monitor


_SLOW_NAMES: Final = {
    "threshold_s": "FASTPROF_SLOW_REQUESTS_THRESHOLD_S",
    "top": "FASTPROF_SLOW_REQUESTS_TOP",
    "level": "FASTPROF_SLOW_REQUESTS_LEVEL",
    "event": "FASTPROF_SLOW_REQUESTS_EVENT",
    "dependencies": "FASTPROF_SLOW_REQUESTS_DEPENDENCIES",
}


def _slow_requests(env: _Env) -> SlowRequestLog | None:
    if not _switch(env, "FASTPROF_SLOW_REQUESTS", ("FASTPROF_SLOW_REQUESTS_",)):
        return None
    kwargs: dict[str, Any] = {}
    threshold = env.number("FASTPROF_SLOW_REQUESTS_THRESHOLD_S")
    if threshold is not None:
        kwargs["threshold_s"] = threshold
    top = env.integer("FASTPROF_SLOW_REQUESTS_TOP")
    if top is not None:
        kwargs["top"] = top
    level = env.text("FASTPROF_SLOW_REQUESTS_LEVEL")
    if level is not None:
        kwargs["level"] = level.lower()
    event = env.text("FASTPROF_SLOW_REQUESTS_EVENT")
    if event is not None:
        kwargs["event"] = event
    dependencies = env.text("FASTPROF_SLOW_REQUESTS_DEPENDENCIES")
    if dependencies is not None:
        kwargs["dependencies"] = dependencies.lower()
    log: SlowRequestLog = _build(SlowRequestLog, env, _SLOW_NAMES, kwargs)
    return log


_CAPTURE_NAMES: Final = {
    "threshold_s": "FASTPROF_SLOW_CAPTURE_THRESHOLD_S",
    "routes": "FASTPROF_SLOW_CAPTURE_ROUTES",
    "max_per_minute": "FASTPROF_SLOW_CAPTURE_MAX_PER_MINUTE",
    "max_spans": "FASTPROF_SLOW_CAPTURE_MAX_SPANS",
    "teardown_wait_s": "FASTPROF_SLOW_CAPTURE_TEARDOWN_WAIT_S",
}


def _slow_capture(env: _Env) -> SlowRequestCapture | None:
    """``tracer_provider`` / ``span_processor`` are code-only: the provider is ``OTEL_*``'s."""
    if not _switch(env, "FASTPROF_SLOW_CAPTURE", ("FASTPROF_SLOW_CAPTURE_",)):
        return None
    kwargs: dict[str, Any] = {}
    for option, name in _CAPTURE_NAMES.items():
        if option == "routes":
            continue
        value = env.number(name) if option.endswith("_s") else env.integer(name)
        if value is not None:
            kwargs[option] = value
    routes = env.pairs("FASTPROF_SLOW_CAPTURE_ROUTES")
    if routes is not None:
        thresholds: dict[str, float] = {}
        for route, seconds in routes.items():
            try:
                thresholds[route] = float(seconds)
            except ValueError:
                raise env.error(
                    "FASTPROF_SLOW_CAPTURE_ROUTES", "route=seconds pairs like /search=2.0"
                ) from None
        kwargs["routes"] = thresholds
    capture: SlowRequestCapture = _build(SlowRequestCapture, env, _CAPTURE_NAMES, kwargs)
    return capture


_SERVER_TIMING_NAMES: Final = {
    "allow": "FASTPROF_SERVER_TIMING_ALLOW",
    "profiled": "FASTPROF_SERVER_TIMING_PROFILED",
    "top": "FASTPROF_SERVER_TIMING_TOP",
}


def _server_timing(env: _Env) -> ServerTiming | None:
    if not _switch(env, "FASTPROF_SERVER_TIMING", ("FASTPROF_SERVER_TIMING_",)):
        return None
    kwargs: dict[str, Any] = {}
    ref = env.text("FASTPROF_SERVER_TIMING_ALLOW")
    if ref is not None:
        allow = _import_object("FASTPROF_SERVER_TIMING_ALLOW", ref)
        if not callable(allow):
            raise ValueError(
                f"FASTPROF_SERVER_TIMING_ALLOW: {ref!r} is not a callable allow(scope) -> bool"
            )
        kwargs["allow"] = allow
    profiled = env.boolean("FASTPROF_SERVER_TIMING_PROFILED")
    if profiled is not None:
        kwargs["profiled"] = profiled
    top = env.integer("FASTPROF_SERVER_TIMING_TOP")
    if top is not None:
        kwargs["top"] = top
    timing: ServerTiming = _build(ServerTiming, env, _SERVER_TIMING_NAMES, kwargs)
    return timing


_MIDDLEWARE_NAMES: Final = {
    "exclude": "FASTPROF_EXCLUDE",
    "request_id_header": "FASTPROF_REQUEST_ID_HEADER",
    "response_request_id_header": "FASTPROF_RESPONSE_REQUEST_ID_HEADER",
    "query": "FASTPROF_QUERY",
    "redact_query_keys": "FASTPROF_REDACT_QUERY_KEYS",
    "max_attribute_length": "FASTPROF_MAX_ATTRIBUTE_LENGTH",
}


def _excluded_urls(env: _Env) -> dict[str, re.Pattern[str]]:
    """Contrib's semantics: comma-separated regular expressions, each searched in the
    request's URL (``scheme://host/path``, no query)."""
    out: dict[str, re.Pattern[str]] = {}
    for name in (
        "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS",
        "OTEL_PYTHON_STARLETTE_EXCLUDED_URLS",
        "OTEL_PYTHON_EXCLUDED_URLS",
    ):
        items = env.items(name)
        if items is None:
            continue
        try:
            out[name] = re.compile("|".join(f"(?:{item})" for item in items))
        except re.error as exc:
            raise ValueError(f"{name}: invalid regular expression: {exc}") from None
    return out


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """A misspelt ``FASTPROF_*`` variable would otherwise be silently ignored."""
    known = set(VARIABLES)
    for name in environ:
        if name.startswith("FASTPROF_") and name not in known and not _NOT_CONFIGURATION.match(
            name
        ):
            close = difflib.get_close_matches(name, VARIABLES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            logger.warning("fastprof: unknown variable %s ignored%s", name, hint)


def from_environ(environ: Mapping[str, str] | None = None) -> EnvConfig:
    """Read and validate every ``FASTPROF_*`` variable (and the excluded-URLs ones).

    Builds the components (:class:`~fastprof.Profiling`, :class:`~fastprof.LoopMonitor`,
    :class:`~fastprof.SlowRequestLog`, :class:`~fastprof.SlowRequestCapture`,
    :class:`~fastprof.ServerTiming`) the variables ask for.

    Raises:
        ValueError: a variable has a bad value; the message names it.
    """
    environ = os.environ if environ is None else environ
    env = _Env(environ)
    _warn_unknown(environ)
    enabled = env.boolean("FASTPROF_ENABLED")
    shutdown_timeout = env.bounded("FASTPROF_SHUTDOWN_TIMEOUT_S", 0.1, 60, " of seconds")
    if enabled is False:
        return EnvConfig(enabled=False)
    chosen = env.choice("FASTPROF_DEPENDENCIES", ("all", "marked", "off", "true", "false"))
    dependencies = {"true": "all", "false": "off"}.get(chosen or "all", chosen or "all")
    max_spans = env.integer("FASTPROF_DEPENDENCIES_MAX_SPANS")
    if max_spans is not None:
        try:
            check_int("max_spans", max_spans, 0, 10_000)
        except ValueError as exc:
            names = {"max_spans": "FASTPROF_DEPENDENCIES_MAX_SPANS"}
            raise _rename_error(exc, env, names) from None
    exclude = env.items("FASTPROF_EXCLUDE")
    query = env.text("FASTPROF_QUERY")
    middleware: dict[str, Any] = {
        "exclude": exclude,
        "request_id_header": env.header("FASTPROF_REQUEST_ID_HEADER", "x-request-id"),
        "response_request_id_header": env.header("FASTPROF_RESPONSE_REQUEST_ID_HEADER", None),
        "query": query.lower() if query is not None else None,
        "redact_query_keys": env.items("FASTPROF_REDACT_QUERY_KEYS"),
        "max_attribute_length": env.integer("FASTPROF_MAX_ATTRIBUTE_LENGTH"),
    }
    # Validated now, with the variable's name, as instrument() would validate them.
    _build(
        lambda **kw: FastprofMiddleware(_no_app, **kw),
        env,
        _MIDDLEWARE_NAMES,
        {k: v for k, v in middleware.items() if v is not None or k.endswith("_header")},
    )
    hooks = _hooks(env)
    profiling, viewer_path = _profiling(env)
    options = _instrument_kwargs(
        **middleware,
        hooks=hooks,
        dependencies=dependencies,
        dependencies_max_spans=max_spans,
        profiling=profiling,
        loop_monitor=_loop_monitor(env),
        slow_requests=_slow_requests(env),
        slow_capture=_slow_capture(env),
        server_timing=_server_timing(env),
    )
    return EnvConfig(
        enabled=True,
        options=options,
        viewer_path=viewer_path,
        shutdown_timeout_s=3.0 if shutdown_timeout is None else shutdown_timeout,
        excluded_urls=_excluded_urls(env),
    )


async def _no_app(scope: Scope, receive: Any, send: Any) -> None:  # pragma: no cover
    pass


# -- tracing ---------------------------------------------------------------------

_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _sampler(env: _Env) -> Any:
    from opentelemetry.sdk.trace import sampling

    name = env.choice("OTEL_TRACES_SAMPLER", _SAMPLERS) or "parentbased_always_on"
    ratio = env.bounded("OTEL_TRACES_SAMPLER_ARG", 0.0, 1.0)
    if ratio is None:
        ratio = 1.0
    root: Any = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
    }[name.removeprefix("parentbased_")]
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def resource_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """The OpenTelemetry ``Resource`` fastprof gives its providers: ``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES`` and this process's ``process.pid`` (call it in the
    worker, after the fork). Use it for a meter provider so metrics and spans agree.

    Raises:
        ValueError: a variable has a bad value; the message names it.
    """
    return _resource(_Env(os.environ if environ is None else environ))


def _resource(env: _Env) -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, Any] = dict(env.pairs("OTEL_RESOURCE_ATTRIBUTES") or {})
    service = env.text("OTEL_SERVICE_NAME")
    if service is not None:
        attributes["service.name"] = service
    # Built in each worker after the fork: every worker's spans say which process sent them.
    attributes["process.pid"] = os.getpid()
    return Resource.create(attributes)


def _endpoint(env: _Env, protocol: str) -> str:
    specific = env.raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    name = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if specific else "OTEL_EXPORTER_OTLP_ENDPOINT"
    base = env.raw(name)
    if base is None:
        return "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318/v1/traces"
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise env.error(name, "an http(s) URL such as http://127.0.0.1:4318")
    if specific or protocol == "grpc":
        return base
    # The general variable is the base URL: the signal's path is appended (OTel spec).
    return base.rstrip("/") + "/v1/traces"


def _tracing_settings(env: _Env) -> dict[str, Any] | None:
    """The tracer provider's parts, validated; ``None`` when OTEL_SDK_DISABLED."""
    if env.boolean("OTEL_SDK_DISABLED"):
        return None
    exporters = env.items("OTEL_TRACES_EXPORTER") or ["otlp"]
    for item in exporters:
        if item.lower() not in ("otlp", "console", "none"):
            raise env.error("OTEL_TRACES_EXPORTER", "otlp, console or none (comma-separated)")
    exporters = [e.lower() for e in exporters if e.lower() != "none"]
    settings: dict[str, Any] = {
        "resource": _resource(env),
        "sampler": _sampler(env),
        "console": "console" in exporters,
        "otlp": None,
    }
    if "otlp" in exporters:
        name = env.first("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
        protocol = "http/protobuf"
        if name is not None:
            protocol = env.choice(name, ("http/protobuf", "grpc")) or protocol
        headers_name = env.first("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
        compression_name = env.first(
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"
        )
        compression = None
        if compression_name is not None:
            allowed = ("gzip", "none") if protocol == "grpc" else ("gzip", "deflate", "none")
            compression = env.choice(compression_name, allowed)
        timeout_name = env.first("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
        timeout = 5.0
        if timeout_name is not None:
            # Seconds, as OpenTelemetry Python's own exporters read it (the spec says
            # milliseconds): the same variable means the same thing to both.
            timeout = env.bounded(timeout_name, 0.001, 60, " of seconds") or timeout
        delay = env.bounded("OTEL_BSP_SCHEDULE_DELAY", 1, 60_000, " of milliseconds")
        queue = env.integer("OTEL_BSP_MAX_QUEUE_SIZE")
        batch = env.integer("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
        queue_size = 8192 if queue is None else queue
        batch_size = min(512, queue_size) if batch is None else batch
        if not 1 <= queue_size <= 1_000_000:
            raise env.error("OTEL_BSP_MAX_QUEUE_SIZE", "an integer between 1 and 1000000")
        if not 1 <= batch_size <= queue_size:
            raise env.error(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "an integer between 1 and OTEL_BSP_MAX_QUEUE_SIZE"
            )
        settings["otlp"] = {
            "endpoint": _endpoint(env, protocol),
            "protocol": protocol,
            "headers": env.pairs(headers_name) if headers_name is not None else None,
            "compression": compression,
            "timeout_s": timeout,
            "schedule_delay_s": 1.0 if delay is None else delay / 1000,
            "max_queue_size": queue_size,
            "max_export_batch_size": batch_size,
        }
    return settings


def check_environ(environ: Mapping[str, str] | None = None) -> None:
    """Validate every variable without setting anything up (``fastprof run`` calls it
    before starting workers, so a bad value fails once, at start-up).

    Raises:
        ValueError: a variable has a bad value; the message names it.
        ImportError: the configured exporter's extra is not installed.
    """
    env = _Env(os.environ if environ is None else environ)
    from_environ(environ)
    settings = _tracing_settings(env)
    if settings is not None and settings["otlp"] is not None:
        from fastprof.exporters.otlp import _exporter_class

        _exporter_class(settings["otlp"]["protocol"])
    if env.raw("FASTPROF_APP") is not None and ":" not in (env.text("FASTPROF_APP") or ""):
        raise env.error("FASTPROF_APP", "an import string 'module:attribute', e.g. main:app")
    env.boolean("FASTPROF_APP_FACTORY")


def setup_tracing_from_env(
    environ: Mapping[str, str] | None = None, *, set_global: bool = True
) -> Any:
    """A tracer provider configured from the standard ``OTEL_*`` variables, or ``None``.

    Returns ``None`` (and changes nothing) when a tracer provider is already
    configured globally (by you, ``opentelemetry-instrument``, ...: never replaced)
    or ``OTEL_SDK_DISABLED=true``. Otherwise builds an SDK provider with a
    resource from ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` plus
    ``process.pid``, the ``OTEL_TRACES_SAMPLER`` sampler and the exporters of
    ``OTEL_TRACES_EXPORTER`` (``otlp`` by default), and installs it globally.

    Call it in the process that serves requests (after any fork): the exporter's
    thread starts here.

    Raises:
        ValueError: a variable has a bad value; the message names it.
        ImportError: the exporter's extra is not installed.
    """
    if set_global and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    env = _Env(os.environ if environ is None else environ)
    settings = _tracing_settings(env)
    if settings is None:
        return None
    timeout = env.bounded("FASTPROF_SHUTDOWN_TIMEOUT_S", 0.1, 60, " of seconds") or 3.0
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from fastprof.exporters import SpanTreePrinter, otlp_span_processor
    from fastprof.exporters._setup import span_limits

    provider = TracerProvider(
        resource=settings["resource"], sampler=settings["sampler"], span_limits=span_limits()
    )
    if settings["otlp"] is not None:
        provider.add_span_processor(
            otlp_span_processor(**settings["otlp"], shutdown_timeout_s=timeout)
        )
    if settings["console"]:
        provider.add_span_processor(SimpleSpanProcessor(SpanTreePrinter()))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


# -- the app -----------------------------------------------------------------------


def _url_excluder(patterns: Mapping[str, re.Pattern[str]], fastapi: bool) -> Any:
    """Contrib's precedence: the framework's variable, else the generic one."""
    framework = "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS" if fastapi else (
        "OTEL_PYTHON_STARLETTE_EXCLUDED_URLS"
    )
    pattern = patterns.get(framework) or patterns.get("OTEL_PYTHON_EXCLUDED_URLS")
    if pattern is None:
        return None

    def excluded(scope: Scope) -> bool:
        host = None
        for key, value in scope.get("headers") or ():
            if key == b"host":
                host = value.decode("latin-1")
                break
        if host is None:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}" if server else ""
        path = scope.get("root_path", "") + scope.get("path", "")
        return pattern.search(f"{scope.get('scheme', 'http')}://{host}{path}") is not None

    return excluded


def _combine_exclude(paths: Any, excluder: Any) -> Any:
    if excluder is None:
        return paths
    if paths is None:
        return excluder
    exact = frozenset(paths)
    return lambda scope: scope.get("path") in exact or excluder(scope)


def _flush_at_shutdown(app: Starlette, timeout_s: float) -> None:
    """Flush the global provider's pending spans when the app's lifespan ends.

    Not at exit: a server's supervisor (uvicorn ``--workers``, gunicorn) kills a
    worker that is still running exit handlers. Bounded by ``timeout_s`` whatever
    the provider does; the event loop is not blocked meanwhile.
    """
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(inner: Any) -> AsyncIterator[Any]:
        try:
            async with original(inner) as state:
                yield state
        finally:
            await _flush(timeout_s)

    app.router.lifespan_context = lifespan


async def _flush(timeout_s: float) -> None:
    import anyio

    provider = trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if flush is None:
        return

    def run() -> None:
        try:
            flush(int(timeout_s * 1000))
        except Exception as exc:
            _internal_errors.report("shutdown.flush", exc)

    thread = threading.Thread(target=run, name="fastprof-shutdown-flush", daemon=True)
    thread.start()
    with anyio.move_on_after(timeout_s):
        while thread.is_alive():
            await anyio.sleep(0.01)


def instrument_from_env(app: AppT, environ: Mapping[str, str] | None = None) -> AppT:
    """Set tracing up from ``OTEL_*`` (unless configured) and instrument ``app`` from
    ``FASTPROF_*``; returns ``app``.

    With ``FASTPROF_ENABLED=false`` the app is returned untouched. Pending spans
    are flushed at the end of the app's lifespan, within ``FASTPROF_SHUTDOWN_TIMEOUT_S``.

    Raises:
        ValueError: a variable has a bad value; the message names it.
    """
    config = from_environ(environ)
    if not config.enabled or getattr(app, "_fastprof_from_env", False):
        return app
    if not isinstance(app, Starlette):
        raise ValueError(
            f"fastprof: expected a Starlette or FastAPI application, got {type(app).__name__}"
        )
    setup_tracing_from_env(environ)
    options = dict(config.options)
    is_fastapi = any(c.__module__ == "fastapi.applications" for c in type(app).__mro__)
    options["exclude"] = _combine_exclude(
        options.get("exclude"), _url_excluder(config.excluded_urls, is_fastapi)
    )
    instrument(app, **options)
    profiling = options.get("profiling")
    if config.viewer_path is not None and isinstance(profiling, Profiling):
        app.mount(config.viewer_path, profiling.viewer())
    _flush_at_shutdown(app, config.shutdown_timeout_s)
    setattr(app, "_fastprof_from_env", True)  # noqa: B010 - not an attribute of Starlette
    return app
