"""Real HTTP/1.1 servers on 127.0.0.1 for the HTTP pool tests: threaded and asyncio.

The threaded server is the demo's own (``poolwatch._demo.upstream``); this module adds TLS
with a throw-away certificate and an asyncio flavour with the same knobs:

* ``delay`` — seconds each response waits before it is sent (a slow upstream); a request
  may also ask for its own with ``/?delay=0.2``;
* ``idle_timeout`` — seconds after which an idle keep-alive connection is closed by the
  server (to make clients find stale connections on reuse); None keeps them open;
* ``tls`` — serve HTTPS with a throw-away self-signed certificate (``ca_file`` trusts it);
* ``handshake_delay`` — with ``tls``, seconds the server sleeps inside every TLS handshake
  (after the client's hello, before its answer), so that a client's connect time
  includes the handshake by a known amount;
* ``keep_alive`` — False answers every request with ``Connection: close`` and closes, as
  does any request that asks for it;
* (asyncio flavour) ``/?size=N`` — a body of N bytes instead of ``ok``: large enough, the
  client cannot have received it whole until it reads it.

They count what really happened on the wire: ``connections`` accepted, ``requests``
answered, ``closed_idle`` connections the server closed for being idle.
``refusing_port()`` gives a loopback port where connects are refused.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from poolwatch._demo import upstream as demo
from poolwatch._demo.upstream import BODY, delay_of


class _Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, in a temporary directory."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poolwatch test upstream")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self._dir = tempfile.TemporaryDirectory(prefix="poolwatch-tls-")
        self.cert_file = str(Path(self._dir.name) / "cert.pem")
        self.key_file = str(Path(self._dir.name) / "key.pem")
        Path(self.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(self.key_file).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def close(self) -> None:
        self._dir.cleanup()


def _tls(
    enabled: bool, handshake_delay: float = 0.0
) -> tuple[_Certificate | None, ssl.SSLContext | None]:
    if not enabled:
        assert not handshake_delay, "handshake_delay needs tls=True"
        return None, None
    certificate = _Certificate()
    context = certificate.server_context()
    if handshake_delay:
        context.sni_callback = _slow_handshake(handshake_delay)
    return certificate, context


def _slow_handshake(
    seconds: float,
) -> Callable[[ssl.SSLSocket | ssl.SSLObject, str | None, ssl.SSLContext], None]:
    """A server-name callback that sleeps: OpenSSL calls it in the middle of every
    handshake, once the client's hello is read, with or without SNI (``None`` for a client
    connecting to an IP address), and the server's answer waits for it."""

    def callback(
        sock: ssl.SSLSocket | ssl.SSLObject, name: str | None, ctx: ssl.SSLContext
    ) -> None:
        time.sleep(seconds)

    return callback


class _TLSFiles:
    _certificate: _Certificate | None

    @property
    def ca_file(self) -> str:
        assert self._certificate is not None, "not a TLS upstream"
        return self._certificate.cert_file

    def _cleanup(self) -> None:
        if self._certificate is not None:
            self._certificate.close()


class ThreadedUpstream(_TLSFiles, demo.ThreadedUpstream):
    """The demo's threaded server, optionally over TLS."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        idle_timeout: float | None = None,
        tls: bool = False,
        keep_alive: bool = True,
        handshake_delay: float = 0.0,
    ) -> None:
        self._certificate, context = _tls(tls, handshake_delay)
        super().__init__(
            delay=delay, idle_timeout=idle_timeout, keep_alive=keep_alive, ssl_context=context
        )

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._cleanup()


class AsyncioUpstream(_TLSFiles, demo.Upstream):
    """An ``asyncio`` server on its own event loop in a background thread."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        idle_timeout: float | None = None,
        tls: bool = False,
        keep_alive: bool = True,
        handshake_delay: float = 0.0,
    ) -> None:
        self._certificate, context = _tls(tls, handshake_delay)
        super().__init__(
            delay=delay, idle_timeout=idle_timeout, keep_alive=keep_alive, ssl_context=context
        )

    def __enter__(self) -> AsyncioUpstream:
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("asyncio upstream did not start")
        return self

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(
                self._connection, "127.0.0.1", 0, ssl=self.ssl_context
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.add("connections")
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
                except TimeoutError:
                    self.counters.add("closed_idle")
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                delay = delay_of(target, self.delay)
                if delay:
                    await asyncio.sleep(delay)
                closing = not self.keep_alive or headers.get("connection", "") == "close"
                body = _body(target)
                self.counters.add("requests")  # before the client can see the response
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + (b"Connection: close\r\n" if closing else b"")
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                if closing:
                    return
        except asyncio.CancelledError:
            writer.transport.abort()  # the server is stopping: no TLS goodbye to wait for
        finally:
            writer.close()
            self._tasks.discard(task)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            while self._tasks:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)  # let the transports finish closing
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
        self._cleanup()


def _body(target: str) -> bytes:
    """The response body: ``BODY``, or with ``?size=N`` N bytes (at most 8 MiB) — a body
    too large for the client to have received whole, so that its connection stays out
    until the client reads it."""
    query = parse_qs(urlsplit(target).query)
    try:
        size = min(int(query["size"][0]), 8 << 20) if "size" in query else 0
    except ValueError:
        size = 0
    return b"x" * size if size > 0 else BODY


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) while in use."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
