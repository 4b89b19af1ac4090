"""Fixtures for the event-loop health tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from _loop_support import Metrics

from fastprof import LoopMonitor


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    sink = Metrics()
    yield sink
    sink.provider.shutdown()


@pytest.fixture
def make_monitor(metrics: Metrics) -> Iterator[Any]:
    """Build LoopMonitors wired to the ``metrics`` sink; all stopped at teardown."""
    made: list[LoopMonitor] = []

    def make(**options: Any) -> LoopMonitor:
        options.setdefault("meter_provider", metrics.provider)
        monitor = LoopMonitor(**options)
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.stop()
        assert not monitor.running
