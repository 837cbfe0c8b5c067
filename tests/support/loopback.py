"""Real servers on 127.0.0.1 built on bare sockets, for what tests/support/upstream.py does
not speak: the base they share (a listener, a thread per connection, a stop flag every loop
polls, so ``__exit__`` ends them all), and an HTTP/2 server.

tests/support/proxy.py's tunnelling proxy is one too.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

_S = TypeVar("_S", bound="LoopbackServer")


class LoopbackServer:
    """A context manager listening on a free loopback port from ``__enter__`` to
    ``__exit__``; ``serve`` handles each accepted connection on a thread of its own.
    ``connections`` counts those accepted."""

    def __init__(self) -> None:
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self: _S) -> _S:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(5)
        self._listener.close()

    def serve(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.connections += 1
            self._spawn(self.serve, sock)


class H2Upstream(LoopbackServer):
    """A real HTTP/2 server (cleartext, prior knowledge: httpx with ``http1=False,
    http2=True``), built on the h2 package. Each response is sent ``delay`` seconds after
    its request, so streams overlap; ``streams`` counts the requests received."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.streams = 0

    def serve(self, sock: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        lock = threading.Lock()  # the h2 state machine and the socket, shared with responders

        def respond(stream_id: int) -> None:
            time.sleep(self.delay)
            with lock:
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "3")])
                conn.send_data(stream_id, b"ok\n", end_stream=True)
                with contextlib.suppress(OSError):
                    sock.sendall(conn.data_to_send())

        with sock:
            sock.settimeout(0.05)
            with lock:
                conn.initiate_connection()
                sock.sendall(conn.data_to_send())
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                with lock:
                    events = conn.receive_data(data)
                    sock.sendall(conn.data_to_send())
                for event in events:
                    if isinstance(event, h2.events.StreamEnded):
                        with self._lock:
                            self.streams += 1
                        self._spawn(respond, event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
