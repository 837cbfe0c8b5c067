"""A real tunnelling (``CONNECT``) HTTP proxy on 127.0.0.1, for proxy pools in the tests.

It answers ``CONNECT host:port`` with ``200 Connection established``, connects to the
target, and relays bytes both ways until either side closes; TLS to the target passes
through it untouched, as through any tunnelling proxy. It counts what happened on the
wire — ``connections`` accepted from clients, ``tunnels`` opened to targets — and keeps
the ``Proxy-Authorization`` headers it was sent (``authorizations``), so that a test can
show that credentials reached the proxy and still never appear in what poolwatch exports.
A thread per connection (tests/support/loopback.py's ``LoopbackServer``).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.loopback import LoopbackServer


class ConnectProxy(LoopbackServer):
    """A context manager: the proxy listens from ``__enter__`` to ``__exit__``."""

    def __init__(self) -> None:
        super().__init__()
        self.tunnels = 0
        self.authorizations: list[bytes] = []

    def serve(self, client: socket.socket) -> None:
        self._tunnel(client)

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            client.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            request, *headers = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            method, target, _ = request.split(b" ", 2)
            if method != b"CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            for header in headers:
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"proxy-authorization":
                    with self._lock:
                        self.authorizations.append(value.strip())
            host, port = target.rsplit(b":", 1)
            with socket.create_connection((host.decode(), int(port)), timeout=5) as upstream:
                with self._lock:
                    self.tunnels += 1
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                back = threading.Thread(target=self._relay, args=(upstream, client), daemon=True)
                back.start()
                self._relay(client, upstream)
                back.join(5)

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
