"""One real Jaeger per test module (see tests/_jaeger.py and scripts/jaeger)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests._jaeger import GoMissing, Jaeger, JaegerUnavailable


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    """A started Jaeger on free ports, stopped after the module.

    Skipped when there is no Jaeger binary and no Go to build it, unless
    ``FASTPROF_REQUIRE_JAEGER=1`` (``scripts/test`` sets it, so CI fails instead).
    """
    log = tmp_path_factory.mktemp("jaeger") / "jaeger.log"
    instance = Jaeger(log_path=log)
    try:
        instance.start()
    except GoMissing as exc:
        if os.environ.get("FASTPROF_REQUIRE_JAEGER") == "1":
            pytest.fail(f"FASTPROF_REQUIRE_JAEGER=1 but {exc}")
        pytest.skip(str(exc))
    except JaegerUnavailable as exc:
        pytest.fail(str(exc))
    try:
        yield instance
    finally:
        instance.stop()
