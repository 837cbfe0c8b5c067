"""A real OTLP/HTTP receiver on loopback, and readers of what it received."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)


class Receiver:
    """Keeps the body of every export request, in order of arrival."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.by_path: list[tuple[str, bytes]] = []
        """Every request's path (``/v1/metrics``, ``/v1/traces``) and body."""
        self._lock = threading.Lock()

    def requests(self) -> list[ExportMetricsServiceRequest]:
        with self._lock:
            bodies = list(self.bodies)
        out = []
        for body in bodies:
            request = ExportMetricsServiceRequest()
            request.ParseFromString(body)
            out.append(request)
        return out

    def exports(self) -> list[tuple[dict[str, str | int], dict[str, int]]]:
        """Each export's resource attributes, and its ``poolwatch.wait.duration`` counts by
        pool name."""
        out = []
        for request in self.requests():
            for rm in request.resource_metrics:
                resource: dict[str, str | int] = {}
                for a in rm.resource.attributes:
                    resource[a.key] = a.value.string_value or a.value.int_value
                waits: dict[str, int] = {}
                for scope in rm.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name != "poolwatch.wait.duration":
                            continue
                        for point in metric.histogram.data_points:
                            attributes = {a.key: a.value.string_value for a in point.attributes}
                            name = attributes["pool.name"]
                            waits[name] = waits.get(name, 0) + point.count
                out.append((resource, waits))
        return out


@contextmanager
def receiver() -> Iterator[tuple[Receiver, int]]:
    """A receiver listening on 127.0.0.1, and its port."""
    kept = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with kept._lock:
                kept.bodies.append(body)
                kept.by_path.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield kept, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
