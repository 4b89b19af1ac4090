"""What a block of the event loop was: a pure analysis of the watchdog's samples."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any, Final, Literal, NamedTuple

from fastprof._frames import is_library
from fastprof.loop._watchdog import Block, Frame, Reading, Sample

__all__ = [
    "CPU_SHARE",
    "GC_SHARE",
    "BlockReport",
    "Cause",
    "analyse",
    "blocking_frame",
    "cause_of",
    "dominant_owner",
    "format_stack",
]

Cause = Literal["cpu", "wait", "gc"]

#: A block is ``gc`` when garbage collection took at least this share of it...
GC_SHARE: Final = 0.5
#: ...else ``cpu`` when the loop thread was on a CPU, or runnable and waiting for
#: one (a busy machine), for at least this share, else ``wait``.
CPU_SHARE: Final = 0.5


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
    #: Loop-thread CPU time and garbage-collection time during the block, and
    #: what they say it was: ``cpu``, ``wait`` or ``gc`` (``None`` when unknown).
    cpu_s: float | None = None
    gc_s: float | None = None
    cause: Cause | None = None
    #: The span of the dependency the block happened in (innermost open one), if any.
    span: Any = None


def cause_of(
    first: Reading | None, last: Reading | None, duration_s: float
) -> tuple[float | None, float | None, Cause | None]:
    """``(cpu_s, gc_s, cause)`` of a block of ``duration_s``, from two readings.

    The readings span the part of the block the watchdog saw (its first sample to
    its end); the shares measured there are applied to the whole duration. Time
    the loop thread was runnable but waiting for a CPU (another process had it)
    counts towards ``cpu``: the thread wanted to compute.
    """
    if first is None or last is None:
        return None, None, None
    window = last[0] - first[0]
    if window <= 0.0:
        return None, None, None
    gc_share = min(max((last[2] - first[2]) / window, 0.0), 1.0)
    gc_s = gc_share * duration_s
    cpu = last[1] - first[1]
    if math.isnan(cpu):
        return None, gc_s, "gc" if gc_share >= GC_SHARE else None
    cpu_share = min(max(cpu / window, 0.0), 1.0)
    queued = last[3] - first[3]
    wanted_share = cpu_share + (0.0 if math.isnan(queued) else max(queued, 0.0) / window)
    if gc_share >= GC_SHARE:
        cause: Cause = "gc"
    elif wanted_share >= CPU_SHARE:
        cause = "cpu"
    else:
        cause = "wait"
    return cpu_share * duration_s, gc_s, cause


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
    spans = Counter(id(s.span) for s in dominant if s.span is not None)
    span = None
    if spans:
        top = spans.most_common(1)[0][0]
        span = next(s.span for s in dominant if id(s.span) == top)
    cpu_s, gc_s, cause = cause_of(block.first, block.last, duration_s)
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
        cpu_s=cpu_s,
        gc_s=gc_s,
        cause=cause,
        span=span,
    )


def format_stack(stack: tuple[Frame, ...], limit: int) -> str:
    """``File "...", line N, in f`` lines, outermost first, cut to ``limit`` characters."""
    lines = [f'File "{path}", line {line}, in {func}' for path, line, func in stack]
    text = "\n".join(lines)
    if len(text) > limit:
        text = "...\n" + text[-(limit - 4) :]
    return text
