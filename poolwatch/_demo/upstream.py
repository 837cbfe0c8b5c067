"""A keep-alive HTTP/1.1 server for the demo (and the test suite): slow, or closing, on demand.

Knobs: ``delay`` — seconds before each response (a request may ask for its own with
``/?delay=0.2``); ``idle_timeout`` — seconds after which the server closes an idle
keep-alive connection (clients then find it dropped on reuse); ``keep_alive`` — False
answers every request with ``Connection: close``, as does any request that asks for it.
Counters record what happened on the wire: ``connections`` accepted, ``requests``
answered, ``closed_idle`` connections closed for being idle.

It binds 127.0.0.1 unless told otherwise (the compose stack's upstream container binds
0.0.0.0 explicitly).
"""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

BODY = b"ok\n"
"""Every response's body."""


class Counters:
    """What the server saw, counted under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.closed_idle = 0

    def add(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)


def delay_of(path: str, default: float) -> float:
    """The delay a request asks for with ``?delay=``, else ``default``."""
    query = parse_qs(urlsplit(path).query)
    try:
        return min(float(query["delay"][0]), 60.0) if "delay" in query else default
    except ValueError:
        return default


class Upstream:
    """The knobs, counters and address every server flavour shares."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        idle_timeout: float | None = None,
        keep_alive: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.delay = delay
        self.idle_timeout = idle_timeout
        self.keep_alive = keep_alive
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.counters = Counters()

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def origin(self) -> str:
        """The pool name poolwatch derives for this server."""
        return self.url

    @property
    def connections(self) -> int:
        return self.counters.connections

    @property
    def requests(self) -> int:
        return self.counters.requests

    @property
    def closed_idle(self) -> int:
        return self.counters.closed_idle


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stall
    server: _Server

    def setup(self) -> None:
        upstream = self.server.upstream
        upstream.counters.add("connections")
        super().setup()
        self.connection.settimeout(upstream.idle_timeout)  # read timeout between requests

    def log_error(self, format: str, *args: Any) -> None:
        # http.server handles the read timeout itself: closes the connection, logs this.
        if format.startswith("Request timed out"):
            self.server.upstream.counters.add("closed_idle")

    def _respond(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        upstream = self.server.upstream
        delay = delay_of(self.path, upstream.delay)
        if delay:
            time.sleep(delay)
        upstream.counters.add("requests")  # before the client can see the response
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        closing = not upstream.keep_alive or self.headers.get("Connection", "") == "close"
        if closing:
            self.send_header("Connection", "close")  # also makes http.server close it
        self.end_headers()
        self.wfile.write(BODY)

    do_GET = do_POST = do_PUT = _respond

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: counters say what happened


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    upstream: ThreadedUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-request are part of the demo's scenarios


class ThreadedUpstream(Upstream):
    """``http.server`` with a thread per connection; a context manager."""

    def start(self) -> ThreadedUpstream:
        self._server = _Server((self.host, self.port), _Handler)
        self._server.upstream = self
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(
                self._server.socket, server_side=True
            )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="poolwatch-demo-upstream",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ThreadedUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
