"""A RequestHooks factory named by FASTPROF_HOOKS in the configuration tests."""

from __future__ import annotations

import fastprof


class Counter(fastprof.RequestHooks):
    def __init__(self) -> None:
        self.ends = 0

    def on_request_end(self, state: fastprof.RequestState) -> None:
        self.ends += 1


hooks = Counter
nothing = object()
