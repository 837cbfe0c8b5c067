"""A small keep-alive HTTP/1.1 server for a WSGI application: the demo serves moto with it.

moto's own server (``ThreadedMotoServer``) runs werkzeug's development server, which
answers every request with ``Connection: close`` — a boto3 client against it opens a new
connection per call, and PoolwatchConnectionChurn would fire on a healthy demo. Real
DynamoDB keeps connections alive; so does this server:

- HTTP/1.1 with keep-alive: every response carries a ``Content-Length`` (the application's
  body is buffered), so the connection stays open unless the client asks to close it;
- one thread per connection, at most ``max_connections`` at once (a connection past that
  is answered ``503`` and closed); request bodies up to ``max_body`` bytes (``413`` past
  that), with a ``Content-Length`` (``411`` for a chunked request);
- an idle keep-alive connection is closed after ``idle_timeout`` seconds;
- ``stop()`` stops accepting, closes every open connection and joins its threads.

It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote_to_bytes

StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_NO_BODY = (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # status, headers and body are separate writes
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.owner.idle_timeout)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:  # the client went away, or stop() closed the connection
            self.close_connection = True

    def _plain(self, status: HTTPStatus) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _serve(self) -> None:
        owner = self.server.owner
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._plain(HTTPStatus.LENGTH_REQUIRED)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._plain(HTTPStatus.BAD_REQUEST)
            return
        if length < 0 or length > owner.max_body:
            self._plain(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return
        body = self.rfile.read(length) if length else b""
        status, headers, payload = self._call(owner.app, self._environ(body))
        code = int(status.split(" ", 1)[0])
        self.send_response(code, status.split(" ", 1)[1] if " " in status else None)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        if code >= 200 and code not in _NO_BODY:
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:  # the client asked (Connection: close, or HTTP/1.0)
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in _NO_BODY:
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

    def _environ(self, body: bytes) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        host, port = self.server.server_address[:2]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_PORT": str(self.client_address[1]),
            "CONTENT_LENGTH": str(len(body)) if body else "",
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            if "_" in name:  # X_Foo could pose as X-Foo (werkzeug drops them too)
                continue
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    @staticmethod
    def _call(app: WSGIApp, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        started: list[tuple[str, list[tuple[str, str]]]] = []
        chunks: list[bytes] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: object = None
        ) -> Callable[[bytes], object]:
            started[:] = [(status, headers)]
            return chunks.append

        try:
            result = app(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:  # the application failed: a 500, and the connection lives on
            return "500 Internal Server Error", [("Content-Type", "text/plain")], b"error\n"
        if not started:
            return "500 Internal Server Error", [("Content-Type", "text/plain")], b"error\n"
        status, headers = started[0]
        return status, headers, b"".join(chunks)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the demo's output is its pool table


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() joins the connection threads itself, bounded
    owner: WSGIServer

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.owner._admit(request):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self.owner._serving(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-request is not the server's problem


class WSGIServer:
    """A WSGI application served over keep-alive HTTP/1.1 on a thread; a context manager."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = 64,
        max_body: int = 16 * 1024 * 1024,
        idle_timeout: float = 60.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._open)

    def _admit(self, request: socket.socket) -> bool:
        with self._lock:
            if len(self._open) >= self.max_connections:
                return False
            self._open.add(request)
            return True

    def _serving(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.add(thread)

    def _release(self, request: socket.socket) -> None:
        with self._lock:
            self._open.discard(request)
            self._threads.discard(threading.current_thread())

    def start(self) -> WSGIServer:
        self._server = _Server((self.host, self.port), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="poolwatch-demo-wsgi",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every open connection, join the threads (bounded)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections, threads = list(self._open), list(self._threads)
        for connection in connections:  # wakes their threads from a keep-alive read
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in [*threads, *([self._thread] if self._thread else [])]:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> WSGIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
