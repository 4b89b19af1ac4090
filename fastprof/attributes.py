"""The names fastprof gives its span attributes, span events and span names.

One place for fastprof's vocabulary: the code records with these constants, the
console printer and the tests read with them, and ``docs/`` lists them. Names
from the OpenTelemetry semantic conventions (``http.route``, ``code.file.path``,
...) are not repeated here. Every value is bounded (see ``docs/reliability.md``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BLOCKED_EVENT",
    "CACHE_HIT",
    "CAPTURE",
    "CACHE_HIT_EVENT",
    "CLIENT_DISCONNECTED",
    "DEPENDENCIES_PHASE_SPAN",
    "DEPENDENCY_KIND",
    "DEPENDENCY_PHASE",
    "DEPENDENCY_SPANS_DROPPED",
    "ENDPOINT_PHASE_SPAN",
    "ENDPOINT_THREADPOOL_WAIT_S",
    "LOOP_BLOCKED_S",
    "LOOP_CAUSE",
    "LOOP_CPU_S",
    "LOOP_GC_S",
    "LOOP_IN_REQUEST",
    "LOOP_SAMPLES",
    "LOOP_SAMPLE_SHARE",
    "LOOP_THRESHOLD_S",
    "OPERATION",
    "OPERATION_KIND",
    "PHASE",
    "PROFILE_DATA",
    "PROFILE_DATA_DROPPED",
    "PROFILE_EVENT",
    "PROFILE_ID",
    "PROFILE_SAMPLES",
    "PROFILE_SKIPPED",
    "PROFILE_TOP_FUNCTION",
    "PROFILE_TOP_LOCATION",
    "PROFILE_TOP_SECONDS",
    "PROFILE_TRIGGER",
    "PROFILE_TRUNCATED",
    "PROFILE_URL",
    "PROFILE_WAITING_SECONDS",
    "PROFILE_WORKER_CALLS",
    "PROFILE_WORKER_CALLS_INCOMPLETE",
    "REQUEST_ID",
    "SERIALIZATION_PHASE_SPAN",
    "THREADPOOL_WAIT_S",
    "TIME_TO_RESPONSE_START_S",
    "WEBSOCKET_ACCEPTED",
    "WEBSOCKET_CLOSE_CODE",
    "WEBSOCKET_MESSAGES_RECEIVED",
    "WEBSOCKET_MESSAGES_SENT",
]

# -- the SERVER span -------------------------------------------------------------------------
#: The request id (validated incoming ``x-request-id`` or generated).
REQUEST_ID: Final = "fastprof.request_id"
#: Seconds from the request's start to ``http.response.start``.
TIME_TO_RESPONSE_START_S: Final = "fastprof.time_to_response_start_s"
#: ``True`` when the client went away before the response completed.
CLIENT_DISCONNECTED: Final = "fastprof.client_disconnected"
#: Dependency spans left out of this request by ``DependencySpans(max_spans=...)``.
DEPENDENCY_SPANS_DROPPED: Final = "fastprof.dependency_spans_dropped"
#: ``slow`` on the SERVER span of a request head sampling dropped and
#: :class:`~fastprof.SlowRequestCapture` exported because it was slow.
CAPTURE: Final = "fastprof.capture"

# -- websocket sessions (on their SERVER span) ------------------------------------------------
WEBSOCKET_MESSAGES_RECEIVED: Final = "fastprof.websocket.messages_received"
WEBSOCKET_MESSAGES_SENT: Final = "fastprof.websocket.messages_sent"
#: Whether the application accepted the handshake.
WEBSOCKET_ACCEPTED: Final = "fastprof.websocket.accepted"
#: The close code sent by the application or received from the client (1005: none given).
WEBSOCKET_CLOSE_CODE: Final = "fastprof.websocket.close_code"

# -- phase and dependency spans ----------------------------------------------------------------
#: ``dependencies``, ``endpoint`` or ``serialization`` on fastprof's phase spans.
PHASE: Final = "fastprof.phase"
DEPENDENCIES_PHASE_SPAN: Final = "fastprof.dependencies"
ENDPOINT_PHASE_SPAN: Final = "fastprof.endpoint"
SERIALIZATION_PHASE_SPAN: Final = "fastprof.serialization"
#: ``async``, ``sync``, ``generator``, ``async_generator`` or ``class``.
DEPENDENCY_KIND: Final = "fastprof.dependency.kind"
#: ``teardown`` on the span of the code after a dependency's ``yield``.
DEPENDENCY_PHASE: Final = "fastprof.dependency.phase"
#: ``True`` on a dependency span that FastAPI's per-request cache served.
CACHE_HIT: Final = "fastprof.dependency.cache_hit"
#: The event put on the span that needed a cached dependency with no span of its own.
CACHE_HIT_EVENT: Final = "fastprof.dependency.cache_hit"
#: Seconds a sync dependency waited for a worker thread.
THREADPOOL_WAIT_S: Final = "fastprof.threadpool.wait_s"
#: Seconds a sync endpoint waited for a worker thread.
ENDPOINT_THREADPOOL_WAIT_S: Final = "fastprof.endpoint.threadpool.wait_s"

# -- the blocked-loop event --------------------------------------------------------------------
BLOCKED_EVENT: Final = "fastprof.loop.blocked"
LOOP_BLOCKED_S: Final = "fastprof.loop.blocked_s"
LOOP_THRESHOLD_S: Final = "fastprof.loop.threshold_s"
LOOP_SAMPLES: Final = "fastprof.loop.samples"
LOOP_SAMPLE_SHARE: Final = "fastprof.loop.sample_share"
#: Seconds the loop thread was on a CPU during the block, and in garbage collection.
LOOP_CPU_S: Final = "fastprof.loop.cpu_s"
LOOP_GC_S: Final = "fastprof.loop.gc_s"
#: Why the loop was blocked: ``cpu``, ``wait`` or ``gc`` (also a metric attribute).
LOOP_CAUSE: Final = "fastprof.loop.cause"
#: Metric attribute: whether a block happened while a request's task ran.
LOOP_IN_REQUEST: Final = "fastprof.loop.in_request"
#: The dependency or endpoint that was running on the loop.
OPERATION: Final = "fastprof.operation"
#: Metric attribute of thread-pool waits: ``dependency``, ``teardown`` or ``endpoint``.
OPERATION_KIND: Final = "fastprof.operation.kind"

# -- profiles ------------------------------------------------------------------------------------
PROFILE_ID: Final = "fastprof.profile.id"
PROFILE_URL: Final = "fastprof.profile.url"
PROFILE_TRIGGER: Final = "fastprof.profile.trigger"
PROFILE_SAMPLES: Final = "fastprof.profile.samples"
PROFILE_SKIPPED: Final = "fastprof.profile.skipped"
PROFILE_TRUNCATED: Final = "fastprof.profile.truncated"
PROFILE_DATA: Final = "fastprof.profile.data"
PROFILE_DATA_DROPPED: Final = "fastprof.profile.data_dropped"
PROFILE_WORKER_CALLS: Final = "fastprof.profile.worker_calls"
PROFILE_WORKER_CALLS_INCOMPLETE: Final = "fastprof.profile.worker_calls_incomplete"
#: The event listing a profile's hottest functions.
PROFILE_EVENT: Final = "fastprof.profile"
PROFILE_TOP_FUNCTION: Final = "fastprof.profile.top.function"
PROFILE_TOP_LOCATION: Final = "fastprof.profile.top.location"
PROFILE_TOP_SECONDS: Final = "fastprof.profile.top.seconds"
#: Time the request's task was suspended while other work ran (pyinstrument's ``[out-of-context]``).
PROFILE_WAITING_SECONDS: Final = "fastprof.profile.waiting_seconds"
