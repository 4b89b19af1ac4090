"""``fastprof.Profiling``: the options object and per-request hooks of on-demand profiling."""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import itertools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl

from starlette.types import Message, Scope

from fastprof import _internal_errors
from fastprof._context import RequestState
from fastprof._http import find_header
from fastprof._options import check_header_name, check_int, check_rate, check_seconds
from fastprof._workers import worker_count
from fastprof.attributes import (
    PROFILE_DATA,
    PROFILE_DATA_DROPPED,
    PROFILE_EVENT,
    PROFILE_ID,
    PROFILE_SAMPLES,
    PROFILE_SKIPPED,
    PROFILE_TOP_FUNCTION,
    PROFILE_TOP_LOCATION,
    PROFILE_TOP_SECONDS,
    PROFILE_TRIGGER,
    PROFILE_TRUNCATED,
    PROFILE_URL,
    PROFILE_WAITING_SECONDS,
    PROFILE_WORKER_CALLS,
    PROFILE_WORKER_CALLS_INCOMPLETE,
)
from fastprof.hooks import RequestHooks
from fastprof.profiling import _documents
from fastprof.profiling._budget import Budget
from fastprof.profiling._capture import ProfileCapture, hot_frames
from fastprof.profiling._tokens import ReplayCache, TokenClaims, TokenVerifier, normalize_secrets
from fastprof.profiling._writer import Writer
from fastprof.profiling.stores import MemoryStore, ProfileMeta, ProfileStore

__all__ = ["Profiling"]

logger = logging.getLogger("fastprof.profiling")

T = TypeVar("T")

_QUERY_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_DURATION_CAP_S: Final = 300.0


class _ProfileIds:
    """Profile ids: 128 bits of keyed BLAKE2b over a counter, as 32 hex characters.

    Unpredictable without the per-process key (from ``os.urandom``, drawn again
    in a forked child), and no system call per id: ``os.urandom`` releases the
    GIL, which in the middle of a request hands it to any thread waiting for it
    (the profile writer, typically) and makes the request wait to get it back.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._key = b""
        self._counter = itertools.count()

    def new(self) -> str:
        pid = os.getpid()
        if pid != self._pid:
            self._key = os.urandom(32)
            self._counter = itertools.count()
            self._pid = pid
        n = next(self._counter)
        return hashlib.blake2b(n.to_bytes(8, "little"), key=self._key, digest_size=16).hexdigest()


class Profiling(RequestHooks):
    """On-demand pyinstrument profiles of single requests, linked to their span.

    Nothing is profiled unless configured: give a ``secret`` to enable the signed
    header trigger, a ``sample_rate`` / ``sample_routes`` for continuous low-rate
    profiling, or both. Pass the object to ``fastprof.instrument(app,
    profiling=Profiling(...))`` (or in ``hooks=[...]``).

    Args:
        secret: Server secret (or a list: the first signs, all verify, for key
            rotation), each at least 32 bytes. Enables the header trigger.
        header: Request header carrying a token (``None`` disables the header trigger).
        max_token_ttl_s: Tokens expiring further in the future are refused; also the
            lifetime of entries in the replay cache.
        replay_cache_size: Nonces remembered per process (single use). When full of
            unexpired nonces, new tokens are refused. With a store that claims nonces
            (:class:`~fastprof.profiling.FileStore`) a token is single use across every
            worker process sharing the store; with the default MemoryStore, per process.
        sample_rate: Fraction of requests profiled, in [0, 1].
        sample_routes: Per route-template rates, e.g. ``{"/items/{item_id}": 0.05}``;
            routes not listed use ``sample_rate``.
        dev_mode: Also accept a token in the query parameter ``query_param``. For
            development only: URLs (with the token) end up in access logs.
        query_param: Name of that query parameter.
        max_concurrent: Profiles running at once in this process.
        max_per_minute: Profiles started per minute in this process.
        interval_s: pyinstrument sampling interval (default 1 ms).
        max_duration_s: Sampling stops after this long; the profile is marked truncated.
        store: Where profiles go (default: an in-memory ring buffer of 32, per
            process: with several workers use a FileStore on a local directory).
        base_url: Public URL of the mounted viewer; ``fastprof.profile.url`` is
            ``base_url + "/" + id``.
        response_header: Response header giving the profile id to the client that
            asked for it (token-triggered requests only; ``None`` for none).
        top_frames: Hottest frames listed in the span event.
        embed_max_bytes: If > 0, the compressed profile is also put on the span as
            ``fastprof.profile.data`` (base64) when it is at most this large. The
            encoding then happens on the event loop at request end.
        writer_queue_size: Profiles waiting to be stored; beyond, they are dropped.
        rng: Random number source in [0, 1) for sampling (tests inject one).
        clock: Wall clock for token expiry (tests inject one).
    """

    order = -100  # decides first: the other components read state.profile_id
    _never_raises = True  # run_in_worker: ProfileCapture.worker_hook contains its failures
    # wants_unsampled is exact: no token (and no sample rate) means no profile, so an
    # unsampled request another component wants does not run these hooks at all.
    skip_when_unwanted = True

    def __init__(
        self,
        *,
        secret: str | bytes | Sequence[str | bytes] | None = None,
        header: str | None = "X-Fastprof-Profile",
        max_token_ttl_s: float = 3600.0,
        replay_cache_size: int = 10_000,
        sample_rate: float = 0.0,
        sample_routes: Mapping[str, float] | None = None,
        dev_mode: bool = False,
        query_param: str = "fastprof_profile",
        max_concurrent: int = 1,
        max_per_minute: int = 6,
        interval_s: float = 0.001,
        max_duration_s: float = 30.0,
        store: ProfileStore | None = None,
        base_url: str | None = None,
        response_header: str | None = "X-Fastprof-Profile-Id",
        top_frames: int = 10,
        embed_max_bytes: int = 0,
        writer_queue_size: int = 8,
        rng: Callable[[], float] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        header_key = check_header_name("header", header)
        response_header_key = check_header_name("response_header", response_header)
        self._secrets: tuple[bytes, ...] = ()
        if secret is not None:
            self._secrets = normalize_secrets(secret, "secret")
        if dev_mode and not self._secrets:
            raise ValueError(
                "dev_mode: the query parameter trigger still needs a token: set secret"
            )
        if not isinstance(query_param, str) or not _QUERY_RE.fullmatch(query_param):
            raise ValueError("query_param: expected 1-64 characters of [A-Za-z0-9_-]")
        check_seconds("max_token_ttl_s", max_token_ttl_s, 1, 7 * 86400)
        check_int("replay_cache_size", replay_cache_size, 1, 10_000_000)
        check_rate("sample_rate", sample_rate)
        rules: dict[str, float] = {}
        for route, rate in dict(sample_routes or {}).items():
            if not isinstance(route, str) or not route.startswith("/"):
                raise ValueError(
                    f"sample_routes: keys are route templates starting with '/', got {route!r}"
                )
            check_rate(f"sample_routes[{route!r}]", rate)
            rules[route] = float(rate)
        check_int("max_concurrent", max_concurrent, 1, 64)
        check_int("max_per_minute", max_per_minute, 1, 10_000)
        check_seconds("interval_s", interval_s, 0.0001, 1.0)
        check_seconds("max_duration_s", max_duration_s, 0.001, MAX_DURATION_CAP_S)
        if store is not None and not isinstance(store, ProfileStore):
            raise ValueError(
                "store: expected a ProfileStore (put/get/list), e.g. fastprof.profiling.FileStore"
            )
        if base_url is not None and (
            not isinstance(base_url, str) or not re.match(r"https?://|/", base_url)
        ):
            raise ValueError("base_url: expected an http(s) URL or an absolute path")
        check_int("top_frames", top_frames, 0, 100)
        check_int("embed_max_bytes", embed_max_bytes, 0, 1024 * 1024)
        check_int("writer_queue_size", writer_queue_size, 1, 1024)

        self._header = header_key if self._secrets else None
        self.query_param = query_param  # redacted from url.query by instrument()
        self._query_key = query_param if dev_mode else None
        self._query_probe = (query_param + "=").encode("latin-1")
        self._sample_rate = float(sample_rate)
        self._sample_routes = rules
        self._max_rate = max([self._sample_rate, *rules.values()])
        self._rng = rng if rng is not None else random.random
        # A store shared by several worker processes (FileStore) makes a token
        # single-use across all of them.
        shared_claim = getattr(store, "claim_nonce", None) if self._secrets else None
        self._verifier = TokenVerifier(
            self._secrets,
            max_ttl_s=float(max_token_ttl_s),
            replay_cache=ReplayCache(replay_cache_size, shared_claim),
            clock=clock if clock is not None else time.time,
        )
        self._budget = Budget(max_concurrent, max_per_minute)
        self.interval_s = float(interval_s)
        self.max_duration_s = float(max_duration_s)
        self.store: ProfileStore = store if store is not None else MemoryStore()
        if isinstance(self.store, MemoryStore) and (self._secrets or self._max_rate > 0):
            _warn_if_several_workers()
        self.base_url = base_url.rstrip("/") if base_url is not None else None
        self._response_header = response_header_key
        self._top_frames = top_frames
        self._embed_max_bytes = embed_max_bytes
        self._writer = Writer(writer_queue_size)
        self._ids = _ProfileIds()
        self._counts_lock = threading.Lock()
        self._counts: dict[str, int] = {}
        #: Whether any trigger is configured (without one the middleware never calls this).
        self.enabled = self._header is not None or self._query_key is not None or self._max_rate > 0

    # -- introspection -------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters: ``started``, ``stored``, ``refused.<reason>``, ``skipped.<reason>``, ..."""
        out = {"started": 0, "stored": 0, "store_failed": 0}
        with self._counts_lock:
            out.update(self._counts)
        out["active"] = self._budget.active
        out["writer_dropped"] = self._writer.dropped
        return out

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def viewer(self, *, auth: Callable[[Scope], bool] | None = None) -> Any:
        """The viewer ASGI app over this object's store (see :func:`viewer_app`).

        Without ``auth``, it requires ``Authorization: Bearer <viewer_token(secret)>``.
        """
        from fastprof.profiling.viewer import viewer_app

        if auth is None and not self._secrets:
            raise ValueError(
                "viewer: pass auth=<callable>, or configure a secret for the default auth"
            )
        return viewer_app(self.store, auth=auth, secret=self._secrets or None)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until queued profiles are stored (not from the event loop)."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the writer thread after the queued profiles are stored."""
        self._writer.close(timeout)

    # -- decision -------------------------------------------------------------

    def _decide(self, state: RequestState, scope: Scope) -> str | None:
        """Which trigger fires for this request, if any. Cheapest checks first."""
        if self._header is not None:
            raw = find_header(scope.get("headers") or (), self._header)
            if raw is not None and self._token_allows(raw, state):
                return "header"
        if self._query_key is not None:
            query: bytes = scope.get("query_string", b"")
            if self._query_probe in query:
                for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                    if key == self._query_key:
                        if self._token_allows(value.encode("latin-1"), state):
                            return "query"
                        break
        if self._max_rate > 0:
            draw = self._rng()
            if draw < self._max_rate:
                rate = self._sample_rate
                if self._sample_routes:
                    route = state.route  # the route this request matches
                    if route is not None:
                        rate = self._sample_routes.get(route, rate)
                if draw < rate:
                    return "sampling"
        return None

    def _token_allows(self, raw: bytes, state: RequestState) -> bool:
        result = self._verifier.verify(raw)
        if isinstance(result, TokenClaims):
            reason = None
            if result.method is not None and result.method != state.method.upper():
                reason = "wrong_method"
            elif result.route is not None and state.route != result.route:
                reason = "wrong_route"
            if reason is None:
                return True
        else:
            reason = result
        self._count(f"refused.{reason}")
        logger.debug("fastprof: profile token refused (%s); request served unprofiled", reason)
        return False

    # -- hooks ----------------------------------------------------------------

    def wants_unsampled(self, scope: Scope) -> bool:
        """Whether an unsampled request may be profiled: it carries the token header (or,
        in dev mode, the query parameter), or a sample rate is configured.

        A cheap pre-check (no token verification) for the middleware: an unsampled
        request for which it is ``False`` cannot start a profile, so it needs none of
        the per-request hooks profiling brings along (this one, and dependency timings
        for profiled requests) and can take the middleware's lean path.
        """
        if self._max_rate > 0:
            return True
        if self._header is not None:
            headers = scope.get("headers")
            if headers and find_header(headers, self._header) is not None:
                return True
        if self._query_key is not None:
            return self._query_probe in scope.get("query_string", b"")
        return False

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        trigger = self._decide(state, scope)
        if trigger is None:
            return
        reason = self._budget.try_acquire()
        if reason is not None:
            self._count(f"skipped.{reason}")
            if state.span.is_recording():
                state.span.set_attribute(PROFILE_SKIPPED, reason)
            return
        capture = ProfileCapture(
            self._ids.new(), trigger=trigger, interval_s=self.interval_s, on_done=self._done
        )
        try:
            capture.start(inspect.currentframe().f_back, self.max_duration_s)  # type: ignore[union-attr]
        except Exception as exc:
            self._budget.release()
            self._count("skipped.start_failed")
            _internal_errors.report("profile.start", exc)
            return
        self._count("started")
        state._profile = capture
        state.profile_id = capture.profile_id

    def _done(self, capture: ProfileCapture) -> None:
        self._budget.release()

    def run_in_worker(self, state: RequestState, call: Callable[[], T]) -> T:
        capture: ProfileCapture | None = state._profile
        if capture is None:
            return call()
        return capture.worker_hook(call)  # type: ignore[no-any-return]

    def on_response_start(self, state: RequestState, message: Message) -> None:
        if self._response_header is None:
            return
        capture: ProfileCapture | None = state._profile
        if capture is None or capture.trigger == "sampling":
            return
        headers = list(message.get("headers", []))
        headers.append((self._response_header, capture.profile_id.encode("ascii")))
        message["headers"] = headers

    def on_response_complete(self, state: RequestState) -> None:
        capture: ProfileCapture | None = state._profile
        if capture is not None:
            try:
                capture.stop()  # the profile ends with the response, before fastprof's own work
            except Exception as exc:
                _internal_errors.report("profile.stop", exc)

    def on_request_end(self, state: RequestState) -> None:
        capture: ProfileCapture | None = state._profile
        if capture is None:
            return
        state._profile = None
        session = capture.stop()  # normally stopped already, by on_response_complete
        if session is None:
            return
        span = state.span
        recording = span.is_recording()
        trace_id = format(span.get_span_context().trace_id, "032x")
        meta = ProfileMeta(
            capture.profile_id,
            created=capture.started_at,
            method=state.method,
            route=state.route or "",
            duration_s=round(session.duration, 6),
            trace_id=trace_id,
            trigger=capture.trigger,
        )
        document: bytes | None = None
        attrs: dict[str, Any] = {}
        if self._embed_max_bytes and recording:
            document = _documents.encode(session, meta.to_dict(), always_compress=True)
            encoded = base64.b64encode(document)
            if len(encoded) <= self._embed_max_bytes:
                attrs[PROFILE_DATA] = encoded.decode("ascii")
            else:
                attrs[PROFILE_DATA_DROPPED] = "too_large"
        if self._keep(meta, session, document):
            attrs[PROFILE_ID] = capture.profile_id
            if self.base_url is not None:
                attrs[PROFILE_URL] = f"{self.base_url}/{capture.profile_id}"
        else:
            self._count("skipped.writer_queue_full")
            attrs[PROFILE_SKIPPED] = "writer_queue_full"
        if not recording:
            return
        attrs[PROFILE_TRIGGER] = capture.trigger
        attrs[PROFILE_SAMPLES] = session.sample_count
        if capture.worker_calls:
            attrs[PROFILE_WORKER_CALLS] = capture.worker_calls
        if capture.worker_calls_incomplete:
            attrs[PROFILE_WORKER_CALLS_INCOMPLETE] = capture.worker_calls_incomplete
        if capture.truncated:
            attrs[PROFILE_TRUNCATED] = True
        span.set_attributes(attrs)
        if self._top_frames and session.frame_records:
            # A profile without samples has no hot frames: no event (the span's
            # ``fastprof.profile.samples`` already says 0).
            top, waiting_s = hot_frames(session, self._top_frames)
            span.add_event(
                PROFILE_EVENT,
                {
                    PROFILE_ID: capture.profile_id,
                    PROFILE_TOP_FUNCTION: [f for f, _, _ in top],
                    PROFILE_TOP_LOCATION: [loc for _, loc, _ in top],
                    PROFILE_TOP_SECONDS: [s for _, _, s in top],
                    # Suspended while other work ran: waiting, not a function's time.
                    PROFILE_WAITING_SECONDS: waiting_s,
                },
            )

    def _keep(self, meta: ProfileMeta, session: Any, document: bytes | None) -> bool:
        """Hand the profile to the store; ``False`` when it had to be dropped."""
        store = self.store
        put_lazy = getattr(store, "put_lazy", None)
        if put_lazy is not None and document is None and session.sample_count <= LAZY_MAX_SAMPLES:
            # A store that takes documents lazily (the default MemoryStore) keeps a
            # small profile as it is and encodes it when fetched: no encoding on the
            # loop, no writer thread competing with it for the GIL.
            try:
                put_lazy(meta, functools.partial(_encode, session, meta), _size_hint(session))
            except Exception as exc:
                self._count("store_failed")
                _internal_errors.report("profile.store", exc)
                return False
            self._count("stored")
            return True
        return self._writer.submit(self._store_job(meta, session, document))

    def _store_job(
        self, meta: ProfileMeta, session: Any, document: bytes | None
    ) -> Callable[[], None]:
        def job() -> None:
            try:
                self.store.put(meta, document if document is not None else _encode(session, meta))
            except Exception as exc:
                self._count("store_failed")
                _internal_errors.report("profile.store", exc)
            else:
                self._count("stored")

        return job


def _warn_if_several_workers() -> None:
    """Say at start-up what a per-process MemoryStore means with several workers."""
    workers = worker_count()
    if workers > 1:
        logger.warning(
            "fastprof: profiles are kept in a per-process MemoryStore while this server "
            "runs %d workers: the viewer of one worker lists only that worker's profiles "
            "and a profile token can be used once per worker; pass "
            "store=fastprof.profiling.FileStore('/some/local/dir') to share them",
            workers,
        )


def _encode(session: Any, meta: ProfileMeta) -> bytes:
    """The stored document of a profile (in the writer or viewer thread, not on the loop)."""
    return _documents.encode(session, meta.to_dict())


#: Profiles with at most this many samples (0.2 s at the default 1 ms interval) go
#: to a store with ``put_lazy`` (the default MemoryStore) unencoded; longer ones are
#: encoded by the writer.
LAZY_MAX_SAMPLES: Final = 200


def _size_hint(session: Any) -> int:
    """What an unencoded profile counts against ``MemoryStore.max_bytes``: about
    what its frame records hold (generous: the encoded document is smaller)."""
    return 1024 + 96 * sum(len(stack) for stack, _ in session.frame_records)
