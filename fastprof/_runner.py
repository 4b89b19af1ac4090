"""``fastprof run``: serve an unmodified application under uvicorn with fastprof on."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="serve module:app under uvicorn with fastprof on (configured from the environment)",
        description=(
            "Serve an unmodified ASGI app (Starlette/FastAPI) with fastprof instrumenting it in "
            "every worker, configured from FASTPROF_* and OTEL_* variables "
            "(docs/configuration.md). Same as FASTPROF_APP=module:app uvicorn fastprof.run:app."
        ),
    )
    run.add_argument("app", help="import string of your application, e.g. main:app")
    run.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    run.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    run.add_argument("--reload", action="store_true", help="restart on code changes (dev)")
    run.add_argument("--factory", action="store_true", help="app is a factory to call")
    run.add_argument("--app-dir", default=".", help="added to sys.path (default: .)")
    run.add_argument("--root-path", default="", help="ASGI root_path behind a proxy")
    run.add_argument("--proxy-headers", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--forwarded-allow-ips", default=None)
    run.add_argument("--log-level", default=None, help="uvicorn's log level")
    run.add_argument("--no-access-log", action="store_true", help="turn uvicorn's access log off")
    run.add_argument(
        "--timeout-graceful-shutdown", type=int, default=None, help="seconds (uvicorn's)"
    )
    run.add_argument("--timeout-keep-alive", type=int, default=5, help="seconds (default 5)")
    run.add_argument("--limit-concurrency", type=int, default=None)
    run.add_argument("--ssl-keyfile", default=None)
    run.add_argument("--ssl-certfile", default=None)
    run.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("fastprof: `fastprof run` needs uvicorn: pip install uvicorn", file=sys.stderr)
        return 2
    if ":" not in args.app:
        print("fastprof: the app is an import string like main:app", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("fastprof: --workers must be at least 1", file=sys.stderr)
        return 2
    # Workers resolve fastprof.run:app themselves, after the fork (uvicorn spawns
    # them; the reloader too): they read the app to serve from the environment.
    os.environ["FASTPROF_APP"] = args.app
    os.environ["FASTPROF_APP_FACTORY"] = "true" if args.factory else "false"
    app_dir = os.path.abspath(args.app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    import importlib.util

    module = args.app.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        # Each worker would fail to import it and be restarted, forever.
        print(f"fastprof: cannot find module {module!r} (from {app_dir})", file=sys.stderr)
        return 2
    from fastprof.config import check_environ

    try:
        # Fail here, once, rather than in every worker (which uvicorn would restart).
        check_environ()
    except (ValueError, ImportError) as exc:
        print(f"fastprof: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "auto"
    uvicorn.run(
        "fastprof.run:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        reload=args.reload,
        reload_dirs=[app_dir] if args.reload else None,
        loop=loop,
        app_dir=app_dir,
        root_path=args.root_path,
        proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
    )
    return 0
