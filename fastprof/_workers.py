"""Whether this process is one of several server workers (best effort).

Read from what the common servers leave in the process: ``WEB_CONCURRENCY``
(honoured by uvicorn, gunicorn and ``fastapi run``) and the ``--workers N`` /
``-w N`` option on the command line (uvicorn's spawned workers inherit the
parent's ``sys.argv``; gunicorn's forked ones keep it). Used only to warn about
per-process state at start-up, never to change behaviour.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

__all__ = ["worker_count"]


def _positive_int(text: str | None) -> int | None:
    if text is None or not text.strip().isdigit():
        return None
    return int(text)


def worker_count(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """The number of worker processes this server was started with, else 1."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    counts = [_positive_int(environ.get("WEB_CONCURRENCY"))]
    for index, arg in enumerate(argv):
        if arg in ("--workers", "-w") and index + 1 < len(argv):
            counts.append(_positive_int(argv[index + 1]))
        elif arg.startswith("--workers="):
            counts.append(_positive_int(arg.partition("=")[2]))
    return max([c for c in counts if c is not None] or [1])
