"""One real Jaeger per test module (see tests/_jaeger.py and scripts/jaeger)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._jaeger import GoMissing, Jaeger, JaegerUnavailable, ensure_binary


@pytest.fixture(scope="session")
def jaeger_binary() -> Path:
    """The Jaeger binary, built on first use (``scripts/test`` builds it before pytest).

    Skipped when there is no binary and no Go to build one, unless
    ``FASTPROF_REQUIRE_JAEGER=1`` (``scripts/test`` sets it, so CI fails instead).
    """
    try:
        return ensure_binary()
    except GoMissing as exc:
        if os.environ.get("FASTPROF_REQUIRE_JAEGER") == "1":
            pytest.fail(f"FASTPROF_REQUIRE_JAEGER=1 but {exc}")
        pytest.skip(str(exc))
    except JaegerUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def jaeger(jaeger_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    """A started Jaeger on free ports, stopped after the module."""
    log = tmp_path_factory.mktemp("jaeger") / "jaeger.log"
    instance = Jaeger(log_path=log, binary=jaeger_binary)
    try:
        instance.start()
    except JaegerUnavailable as exc:
        pytest.fail(str(exc))
    try:
        yield instance
    finally:
        instance.stop()
