"""A fast path for SERVER spans the tracer's sampler certainly drops.

An unsampled request still needs a span context (its trace id and flags propagate
to outgoing calls and child spans), but the SDK's ``Tracer.start_span`` spends
about 17 Python calls to make a ``NonRecordingSpan`` (parent lookups, the sampler,
a ``SamplingResult``, ids, flags). When the decision is known from the sampler's
type alone (``ALWAYS_OFF``, or a ``ParentBased`` sampler whose branch for this
request is ``ALWAYS_OFF``, e.g. an unsampled remote parent), fastprof builds the
same ``NonRecordingSpan`` itself: the same ids from the provider's id generator,
the same trace flags and trace state, the SDK's span metrics still counted.

It is only used when a probe at start-up shows that it produces what the
installed SDK produces; anything else (another sampler, a ratio decision, a
disabled tracer, another SDK version) goes through ``start_span``, so sampling
decisions are never made twice.
"""

from __future__ import annotations

from collections.abc import Callable
from random import getrandbits
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

__all__ = ["DropFastPath", "drop_fast_path"]

#: Returns the span for a request whose extracted parent context is given, or
#: ``None`` when ``tracer.start_span`` must decide.
DropFastPath = Callable[[Context], Span | None]

_PROBE_TRACE_ID: Final = 0x4BF92F3577B34DA6A3CE929D0E0E4736
_PROBE_SPAN_ID: Final = 0x00F067AA0BA902B7


def drop_fast_path(tracer: Any) -> DropFastPath | None:
    """A fast path for ``tracer`` (an SDK tracer with a known dropping sampler), else ``None``."""
    try:
        fast = _build(tracer)
        if fast is None or not _agrees_with_sdk(tracer, fast):
            return None
        return fast
    except Exception:
        return None


def _build(tracer: Any) -> DropFastPath | None:
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler

    if type(tracer) is not SdkTracer:
        return None

    def drops(sampler: Any) -> bool:
        return type(sampler) is StaticSampler and sampler._decision is Decision.DROP

    sampler = tracer.sampler
    if drops(sampler):
        root_drops = sampled_parent_drops = unsampled_parent_drops = True
    elif (
        isinstance(sampler, ParentBased)
        and type(sampler).should_sample is ParentBased.should_sample
    ):
        root_drops = drops(sampler._root)
        sampled_parent_drops = drops(sampler._remote_parent_sampled)
        unsampled_parent_drops = drops(sampler._remote_parent_not_sampled)
    else:
        return None
    if not (root_drops or sampled_parent_drops or unsampled_parent_drops):
        return None

    id_generator = tracer.id_generator
    # The SDK's default generator is inlined below: random.getrandbits, never 0.
    inline_ids = type(id_generator) is RandomIdGenerator
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

    def checked_root_context(trace_id: int, span_id: int) -> SpanContext:
        return SpanContext(trace_id, span_id, is_remote=False, trace_flags=root_flags)

    make_root_context: Callable[[int, int], SpanContext] = checked_root_context
    if inline_ids:  # ids known to be valid: the cheaper tuple, if the layout checks out
        make_root_context = _root_context_factory(root_flags) or checked_root_context

    def span_for(parent_context: Context) -> Span | None:
        if has_config and not tracer._tracer_config.is_enabled:
            return None
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
                return NonRecordingSpan(
                    SpanContext(
                        parent.trace_id,
                        (getrandbits(64) or 1) if inline_ids else generate_span_id(),
                        is_remote=False,
                        trace_flags=random_flags if random else default_flags,
                        trace_state=parent.trace_state,
                    )
                )
        if not root_drops:
            return None
        if record_start is not None:
            record_start(None, drop)
        if inline_ids:
            return NonRecordingSpan(make_root_context(getrandbits(128) or 1, getrandbits(64) or 1))
        return NonRecordingSpan(make_root_context(generate_trace_id(), generate_span_id()))

    return span_for


def _root_context_factory(flags: TraceFlags) -> Callable[[int, int], SpanContext] | None:
    """A cheaper ``SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags)``
    for ids known to be valid, if ``SpanContext``'s layout is the one checked here.

    ``SpanContext`` is a tuple whose Python ``__new__`` (keyword arguments, validation)
    costs about 5,700 instructions; building the tuple directly costs a tenth of that.
    """
    try:
        reference = SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=flags)
        state = reference.trace_state
        new = tuple.__new__

        def make(trace_id: int, span_id: int) -> SpanContext:
            return new(SpanContext, (trace_id, span_id, False, flags, state, True))

        built = make(0x1234, 0x5678)
        if (
            type(built) is SpanContext
            and built == reference
            and (built.trace_id, built.span_id, built.is_remote, built.is_valid)
            == (0x1234, 0x5678, False, True)
            and built.trace_flags is flags
            and built.trace_state is state
        ):
            return make
    except Exception:  # pragma: no cover - another API layout
        pass
    return None  # pragma: no cover


def _agrees_with_sdk(tracer: Any, fast: DropFastPath) -> bool:
    """Probe: for each parent shape the fast path takes, the SDK's span looks the same."""
    from opentelemetry.trace import TraceState

    parents: list[Context] = [Context()]
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
    return checked > 0
