"""The middleware's options, validated once and frozen: what every request reads."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypedDict

from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer, TracerProvider
from starlette.types import Scope

from fastprof._http import SENSITIVE_QUERY_KEYS, QueryPolicy
from fastprof._options import check_header_name, check_int
from fastprof._otel import fastprof_tracer
from fastprof._sampling import drop_fast_path
from fastprof.hooks import HookSet, RequestHooks, ordered

__all__ = ["ExcludeOption", "MiddlewareOptions", "Settings"]

ExcludeOption = Iterable[str] | str | re.Pattern[str] | Callable[[Scope], bool] | None

_QUERY_POLICIES = ("redact_sensitive", "redact_all", "omit")


class MiddlewareOptions(TypedDict, total=False):
    """The keyword options of :class:`~fastprof.FastprofMiddleware` (and of ``instrument()``).

    Defaults: see :class:`~fastprof.FastprofMiddleware`.
    """

    tracer_provider: TracerProvider | None
    exclude: ExcludeOption
    request_id_header: str | None
    response_request_id_header: str | None
    query: QueryPolicy
    redact_query_keys: Iterable[str]
    max_attribute_length: int
    hooks: Iterable[RequestHooks]


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a request needs of the middleware's configuration, decided once."""

    tracer: Tracer
    #: Builds the dropped span of an unsampled request without the SDK (``None``
    #: when the SDK's sampler cannot be reproduced; see ``_sampling``).
    drop_fast_path: Callable[[Context], Span | None] | None
    exclude: Callable[[Scope], bool] | None
    request_id_header: bytes | None
    response_request_id_header: bytes | None
    query: QueryPolicy
    sensitive_keys: frozenset[str]
    max_attribute_length: int
    sampled_hooks: HookSet
    unsampled_hooks: HookSet
    #: An unsampled request that no hook needs and whose response fastprof does
    #: not change runs the app with the send/receive callables untouched.
    lean_unsampled: bool
    #: When not every unsampled request is lean: the ``wants_unsampled`` checks of
    #: the hooks, if every one of them has one (an unsampled request none of them
    #: wants is lean), else ``None``.
    unsampled_gates: tuple[Callable[[Scope], bool], ...] | None

    @classmethod
    def build(
        cls,
        *,
        tracer_provider: TracerProvider | None = None,
        exclude: ExcludeOption = None,
        request_id_header: str | None = "x-request-id",
        response_request_id_header: str | None = None,
        query: QueryPolicy = "redact_sensitive",
        redact_query_keys: Iterable[str] = (),
        max_attribute_length: int = 2048,
        hooks: Iterable[RequestHooks] = (),
    ) -> Settings:
        """Validate the options (``ValueError`` naming the option) and decide what they mean."""
        tracer = fastprof_tracer(tracer_provider)
        if query not in _QUERY_POLICIES:
            raise ValueError(f"query: expected one of {_QUERY_POLICIES}, got {query!r}")
        check_int("max_attribute_length", max_attribute_length, 16, 65536)
        request_id_key = check_header_name("request_id_header", request_id_header)
        response_id_key = check_header_name(
            "response_request_id_header", response_request_id_header
        )
        if isinstance(redact_query_keys, str) or not all(
            isinstance(k, str) for k in redact_query_keys
        ):
            raise ValueError("redact_query_keys: expected a list of query parameter names")
        enabled = tuple(h for h in ordered(hooks) if h.enabled)
        sampled = HookSet(enabled)
        unsampled = HookSet(
            tuple(h for h in enabled if getattr(h, "unsampled_requests", True)),
            skip_unwanted=True,
        )
        fast = drop_fast_path(tracer)
        lean = unsampled.empty and response_id_key is None
        gates = None if lean or response_id_key is not None else unsampled.gates
        return cls(
            tracer=tracer,
            drop_fast_path=fast,
            exclude=compile_exclude(exclude),
            request_id_header=request_id_key,
            response_request_id_header=response_id_key,
            query=query,
            sensitive_keys=SENSITIVE_QUERY_KEYS | {k.lower() for k in redact_query_keys},
            max_attribute_length=max_attribute_length,
            sampled_hooks=sampled,
            unsampled_hooks=unsampled,
            lean_unsampled=lean,
            unsampled_gates=gates,
        )


def compile_exclude(exclude: ExcludeOption) -> Callable[[Scope], bool] | None:
    """``exclude`` as a predicate on the ASGI scope (``None``: nothing excluded)."""
    if exclude is None:
        return None
    if callable(exclude) and not isinstance(exclude, re.Pattern):
        return exclude
    if isinstance(exclude, re.Pattern):
        pattern = exclude
        return lambda scope: pattern.search(scope.get("path", "")) is not None
    if isinstance(exclude, str):
        try:
            pattern = re.compile(exclude)
        except re.error as exc:
            raise ValueError(f"exclude: invalid regular expression {exclude!r}: {exc}") from exc
        return lambda scope: pattern.search(scope.get("path", "")) is not None
    try:
        paths = frozenset(exclude)
    except TypeError:
        raise ValueError(
            "exclude: expected a list of paths, a regex (str or re.Pattern) or a callable "
            f"taking the ASGI scope, got {type(exclude).__name__}"
        ) from None
    if not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise ValueError("exclude: every path in the list must be a string starting with '/'")
    return lambda scope: scope.get("path") in paths
