"""A fast path for SERVER spans the tracer's sampler certainly drops.

An unsampled request still needs a span context (its trace id and flags propagate
to outgoing calls and child spans), but the SDK's ``Tracer.start_span`` spends
about 17 Python calls to make a ``NonRecordingSpan`` (parent lookups, the sampler,
a ``SamplingResult``, ids, flags). When the decision is known from the sampler's
type alone (``ALWAYS_OFF``, or a ``ParentBased`` sampler whose branch for this
request is ``ALWAYS_OFF``, e.g. an unsampled remote parent), fastprof builds the
same ``NonRecordingSpan`` itself: the same ids from the provider's id generator,
the same trace flags and trace state, the SDK's span metrics still counted.

A root under ``ParentBased(TraceIdRatioBased(r))`` (how production samples a few
percent) is decided here too, from the trace id, exactly as the SDK decides it: the
trace id is drawn as the SDK's ``RandomIdGenerator`` draws it, and the request is
dropped when ``trace_id & (2**64 - 1) >= r * 2**64``. A root the ratio samples goes
through ``start_span`` with that same trace id: fastprof's own tracer gets an id
generator that hands the drawn id to the very next ``generate_trace_id`` call on this
thread, so the SDK makes the same decision and each trace is decided once.

It is only used when a probe at start-up shows that it produces what the
installed SDK produces; anything else (another sampler, a disabled tracer, another
SDK version) goes through ``start_span``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from random import getrandbits
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)

__all__ = ["DropFastPath", "drop_fast_path"]

#: Returns the span for a request whose extracted parent context is given, or
#: ``None`` when ``tracer.start_span`` must decide.
DropFastPath = Callable[[Context], Span | None]

_PROBE_TRACE_ID: Final = 0x4BF92F3577B34DA6A3CE929D0E0E4736
_PROBE_SPAN_ID: Final = 0x00F067AA0BA902B7
#: The bits of a trace id ``TraceIdRatioBased`` compares with its bound.
_RATIO_MASK: Final = (1 << 64) - 1


def drop_fast_path(tracer: Any) -> DropFastPath | None:
    """A fast path for ``tracer`` (an SDK tracer with a known dropping sampler), else ``None``."""
    original = getattr(tracer, "id_generator", None)
    try:
        fast = _build(tracer)
        if fast is not None and _agrees_with_sdk(tracer, fast):
            return fast
    except Exception:
        pass
    if original is not None and getattr(tracer, "id_generator", None) is not original:
        tracer.id_generator = original  # the ratio path is off: the SDK's generator again
    return None


def _build(tracer: Any) -> DropFastPath | None:
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        StaticSampler,
        TraceIdRatioBased,
    )

    if type(tracer) is not SdkTracer:
        return None

    def drops(sampler: Any) -> bool:
        return type(sampler) is StaticSampler and sampler._decision is Decision.DROP

    id_generator = tracer.id_generator
    # The SDK's default generator is inlined below: random.getrandbits, never 0.
    inline_ids = type(id_generator) in (RandomIdGenerator, _SeededIdGenerator)

    sampler = tracer.sampler
    ratio_bound: int | None = None  # roots decided by TraceIdRatioBased
    if drops(sampler):
        root_drops = sampled_parent_drops = unsampled_parent_drops = True
    elif (
        isinstance(sampler, ParentBased)
        and type(sampler).should_sample is ParentBased.should_sample
    ):
        root = sampler._root
        root_drops = drops(root)
        if (
            not root_drops
            and inline_ids
            and type(root) is TraceIdRatioBased
            and type(root.bound) is int
        ):
            ratio_bound = root.bound
        sampled_parent_drops = drops(sampler._remote_parent_sampled)
        unsampled_parent_drops = drops(sampler._remote_parent_not_sampled)
    else:
        return None
    if not (root_drops or sampled_parent_drops or unsampled_parent_drops or ratio_bound):
        return None

    seed: Callable[[int], None] | None = None
    if ratio_bound is not None:
        if type(id_generator) is not _SeededIdGenerator:
            # fastprof's own Tracer object (from get_tracer): the provider keeps its generator.
            id_generator = tracer.id_generator = _SeededIdGenerator()
        seed = id_generator.seed
    generate_trace_id = id_generator.generate_trace_id
    generate_span_id = id_generator.generate_span_id
    is_random = getattr(id_generator, "is_trace_id_random", None)
    roots_random = bool(is_random()) if is_random is not None else False
    random_flag = getattr(TraceFlags, "RANDOM_TRACE_ID", None)
    default_flags = TraceFlags(TraceFlags.DEFAULT)
    random_flags = TraceFlags(TraceFlags.DEFAULT | random_flag) if random_flag else default_flags
    root_flags = random_flags if roots_random else default_flags
    metrics = getattr(tracer, "_tracer_metrics", None)
    record_start = (
        None
        if type(metrics).__name__ == "NoOpTracerMetrics"
        else getattr(metrics, "start_span", None)
    )
    has_config = hasattr(tracer, "_tracer_config")
    drop = Decision.DROP
    get_current_span = trace.get_current_span

    # Ids known to be valid (the SDK's generator, inlined): a SpanContext is built as
    # the tuple its validating __new__ would build, if its layout checks out; and a
    # NonRecordingSpan without its Python __init__, if that makes the same span. Both
    # are checked here, once; otherwise the public constructors are used.
    empty_state = _context_layout() if inline_ids else None
    bare_spans = _bare_span_construction()
    new_tuple = tuple.__new__
    new_object = object.__new__

    def span_for(parent_context: Context) -> Span | None:
        if has_config and not tracer._tracer_config.is_enabled:
            return None
        trace_id = 0
        state: TraceState | None = None
        if parent_context:
            parent = get_current_span(parent_context).get_span_context()
            if parent.is_valid:
                if not parent.is_remote:
                    return None  # only extracted (remote) parents are expected here
                flags = parent.trace_flags
                if not (sampled_parent_drops if flags.sampled else unsampled_parent_drops):
                    return None
                if record_start is not None:
                    record_start(parent, drop)
                random = random_flag is not None and bool(flags & random_flag)
                trace_id = parent.trace_id  # valid: never 0
                span_flags = random_flags if random else default_flags
                state = parent.trace_state
        if not trace_id:  # a root
            if ratio_bound is not None:
                trace_id = getrandbits(128) or 1
                if trace_id & _RATIO_MASK < ratio_bound:
                    seed(trace_id)  # type: ignore[misc]  # sampled: the SDK decides the same
                    return None
            elif not root_drops:
                return None
            else:
                trace_id = (getrandbits(128) or 1) if inline_ids else generate_trace_id()
            if record_start is not None:
                record_start(None, drop)
            span_flags = root_flags
        if empty_state is not None:
            context = new_tuple(
                SpanContext,
                (
                    trace_id,
                    getrandbits(64) or 1,
                    False,
                    span_flags,
                    empty_state if state is None else state,
                    True,
                ),
            )
        else:
            context = SpanContext(
                trace_id,
                (getrandbits(64) or 1) if inline_ids else generate_span_id(),
                is_remote=False,
                trace_flags=span_flags,
                trace_state=state,
            )
        if bare_spans:
            span = new_object(NonRecordingSpan)
            span._context = context
            return span
        return NonRecordingSpan(context)

    return span_for


def _seeded_generator_base() -> type:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    return RandomIdGenerator


class _SeededIdGenerator(_seeded_generator_base()):  # type: ignore[misc]
    """The SDK's ``RandomIdGenerator``, except that a trace id seeded on a thread is
    what the next ``generate_trace_id`` call on that thread returns (once).

    Installed on fastprof's own middleware tracer when roots are ratio-sampled: the
    fast path draws the trace id, and for a root the ratio samples, hands it to the
    ``start_span`` call that follows, so the SDK decides on the same id.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def seed(self, trace_id: int) -> None:
        self._local.trace_id = trace_id

    def generate_trace_id(self) -> int:
        local = self._local
        trace_id: int = getattr(local, "trace_id", 0)
        if trace_id:
            local.trace_id = 0
            return trace_id
        return super().generate_trace_id()  # type: ignore[no-any-return]


def _context_layout() -> TraceState | None:
    """What ``SpanContext`` stores for ``trace_state=None``, if ``SpanContext(t, s,
    is_remote=False, trace_flags=f, trace_state=ts)`` for valid ids is the tuple
    ``(t, s, False, f, ts or that state, True)``; else ``None``.

    ``SpanContext`` is a tuple whose Python ``__new__`` (keyword arguments, validation)
    costs about 5,700 instructions; building the tuple directly costs a tenth of that.
    Checked once, with and without a trace state and with every flag the fast path uses.
    """
    try:
        new = tuple.__new__
        empty = SpanContext(0x1234, 0x5678, is_remote=False).trace_state
        given = TraceState([("probe", "1")])
        for flags in (TraceFlags(TraceFlags.DEFAULT), TraceFlags(TraceFlags.SAMPLED | 2)):
            for state, stored in ((None, empty), (given, given)):
                reference = SpanContext(
                    0x1234, 0x5678, is_remote=False, trace_flags=flags, trace_state=state
                )
                built = new(SpanContext, (0x1234, 0x5678, False, flags, stored, True))
                if not (
                    type(built) is SpanContext
                    and built == reference
                    and (built.trace_id, built.span_id, built.is_remote, built.is_valid)
                    == (0x1234, 0x5678, False, True)
                    and built.trace_flags is flags
                    and built.trace_state is reference.trace_state
                ):
                    return None  # pragma: no cover - another API layout
        return empty
    except Exception:  # pragma: no cover - another API layout
        return None


def _bare_span_construction() -> bool:
    """Whether ``NonRecordingSpan(context)`` is an object holding only ``_context``, so
    that ``object.__new__`` plus that attribute builds the same span without the Python
    ``__init__`` call (checked once)."""
    try:
        context = SpanContext(0x1234, 0x5678, is_remote=False)
        reference = NonRecordingSpan(context)
        built = object.__new__(NonRecordingSpan)
        built._context = context
        return (
            vars(reference) == {"_context": context}
            and vars(built) == vars(reference)
            and built.get_span_context() is context
            and not built.is_recording()
        )
    except Exception:  # pragma: no cover - another API layout
        return False


def _agrees_with_sdk(tracer: Any, fast: DropFastPath) -> bool:
    """Probe: for each parent shape the fast path takes, the SDK's span looks the same."""
    ratio = isinstance(tracer.id_generator, _SeededIdGenerator)
    # A ratio-decided root is probed by _ratio_agrees (with ids it certainly drops).
    parents: list[Context] = [] if ratio else [Context()]
    for flags in (TraceFlags.DEFAULT, TraceFlags.SAMPLED):
        remote = SpanContext(
            _PROBE_TRACE_ID,
            _PROBE_SPAN_ID,
            is_remote=True,
            trace_flags=TraceFlags(flags),
            trace_state=TraceState([("probe", "1")]),
        )
        parents.append(trace.set_span_in_context(NonRecordingSpan(remote), Context()))
    checked = 0
    for parent in parents:
        mine = fast(parent)
        if mine is None:
            continue
        theirs = tracer.start_span("probe", context=parent, kind=SpanKind.SERVER)
        if type(theirs) is not type(mine) or theirs.is_recording():
            return False
        a, b = mine.get_span_context(), theirs.get_span_context()
        if (a.is_remote, a.trace_flags, a.trace_state, a.is_valid) != (
            b.is_remote,
            b.trace_flags,
            b.trace_state,
            b.is_valid,
        ):
            return False
        if parent and a.trace_id != b.trace_id:
            return False
        checked += 1
    if ratio:
        return _ratio_agrees(tracer, fast)
    return checked > 0


def _ratio_agrees(tracer: Any, fast: DropFastPath) -> bool:
    """Probe of the ratio path: the SDK's sampler decides as the fast path does, and
    ``start_span`` takes the seeded trace id and builds the span the fast path builds
    (checked with an id the ratio drops, so that the probe records nothing)."""
    root = tracer.sampler._root
    bound = root.bound
    low = bound - 1 if bound > 0 else 0
    for trace_id in ((1 << 64) | low, (2 << 64) | (bound & _RATIO_MASK), _PROBE_TRACE_ID):
        sdk = root.should_sample(None, trace_id, "probe").decision.is_sampled()
        if sdk != (trace_id & _RATIO_MASK < bound):
            return False
    if bound > _RATIO_MASK:
        return True  # ratio 1: never drops, nothing to check with a dropped id
    dropped = (3 << 64) | _RATIO_MASK
    tracer.id_generator.seed(dropped)
    theirs = tracer.start_span("probe", context=Context(), kind=SpanKind.SERVER)
    if (
        type(theirs) is not NonRecordingSpan
        or theirs.get_span_context().trace_id != dropped
        or tracer.id_generator.generate_trace_id() == dropped  # the seed is used once
    ):
        return False
    for _ in range(64):  # a root the fast path drops (unless the ratio is near 1)
        mine = fast(Context())
        if mine is None:
            tracer.id_generator.generate_trace_id()  # sampled: drop its unused seed
            continue
        a, b = mine.get_span_context(), theirs.get_span_context()
        return type(mine) is NonRecordingSpan and (
            a.is_remote,
            a.trace_flags,
            a.trace_state,
            a.is_valid,
        ) == (b.is_remote, b.trace_flags, b.trace_state, b.is_valid)
    return True
