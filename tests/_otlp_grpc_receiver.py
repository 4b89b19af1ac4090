"""A real OTLP/gRPC trace receiver on 127.0.0.1 (needs the ``grpc`` extra)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class GrpcReceived:
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        out = []
        with self.lock:
            for request in self.requests:
                for rs in request.resource_spans:
                    resource = {
                        a.key: getattr(a.value, a.value.WhichOneof("value"))
                        for a in rs.resource.attributes
                    }
                    for ss in rs.scope_spans:
                        out.extend((resource, span) for span in ss.spans)
        return out


@contextmanager
def otlp_grpc_receiver() -> Iterator[tuple[str, GrpcReceived]]:
    received = GrpcReceived()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # gRPC names the method
            with received.lock:
                received.requests.append(request)
                received.metadata.append(dict(context.invocation_metadata()))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None)
