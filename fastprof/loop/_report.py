"""What a block of the event loop was: a pure analysis of the watchdog's samples."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

from fastprof._frames import is_library
from fastprof.loop._watchdog import Block, Frame, Sample

__all__ = ["BlockReport", "analyse", "blocking_frame", "dominant_owner", "format_stack"]


class BlockReport(NamedTuple):
    """One block of the loop, attributed to the request (or task) seen in most samples."""

    #: How long the loop was blocked (so far, for a block reported while it lasts).
    duration_s: float
    #: ``time.perf_counter()`` at which the late heartbeat was due (~ the block's start).
    due: float
    #: What ``resolve_owner`` returned for the dominant samples (a request entry) or ``None``.
    owner: Any
    #: Samples taken during the block, and the share of them that the owner had.
    samples: int
    share: float
    #: The innermost application frame seen most often, and a stack where it was seen.
    location: Frame | None
    stack: tuple[Frame, ...]
    #: The dependency or endpoint running on the loop, when known.
    operation: str | None
    task_name: str | None


def blocking_frame(stack: tuple[Frame, ...]) -> Frame | None:
    """The innermost application frame (not stdlib, site-packages or fastprof)."""
    for frame in reversed(stack):
        if not is_library(frame[0]):
            return frame
    return stack[-1] if stack else None


def dominant_owner(samples: Iterable[Sample]) -> tuple[Any, list[Sample]]:
    """The owner (request entry or ``None``) seen in most samples, and its samples."""
    by_owner: dict[int, list[Sample]] = {}
    for sample in samples:
        by_owner.setdefault(id(sample.owner), []).append(sample)
    dominant = max(by_owner.values(), key=len)
    return dominant[0].owner, dominant


def analyse(block: Block, duration_s: float) -> BlockReport | None:
    """The report of ``block``; ``None`` when it ended before its first sample."""
    samples = block.samples
    if not samples:
        return None
    owner, dominant = dominant_owner(samples)
    locations = Counter(blocking_frame(s.stack) for s in dominant)
    location, _ = locations.most_common(1)[0]
    stack = next(s.stack for s in reversed(dominant) if blocking_frame(s.stack) == location)
    operations = Counter(s.operation for s in dominant if s.operation is not None)
    return BlockReport(
        duration_s=duration_s,
        due=block.due,
        owner=owner,
        samples=len(samples),
        share=len(dominant) / len(samples),
        location=location,
        stack=stack,
        operation=operations.most_common(1)[0][0] if operations else None,
        task_name=dominant[-1].task_name,
    )


def format_stack(stack: tuple[Frame, ...], limit: int) -> str:
    """``File "...", line N, in f`` lines, outermost first, cut to ``limit`` characters."""
    lines = [f'File "{path}", line {line}, in {func}' for path, line, func in stack]
    text = "\n".join(lines)
    if len(text) > limit:
        text = "...\n" + text[-(limit - 4) :]
    return text
