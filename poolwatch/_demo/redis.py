"""A real, throw-away Redis server: the demo's cache when ``redis-server`` is on the machine,
and the test suite's.

It runs Debian's ``redis-server`` as a child process (not daemonized: it dies with a
``stop()``, and the process that started it reaps it) in a temporary directory:

- listening on 127.0.0.1 only, on a free port (chosen by binding a socket to port 0, and
  chosen again if the server lost the race for it), with no Unix socket;
- with a password (``requirepass``), so that the tests can check that credentials never
  reach a pool name or a metric attribute;
- with nothing persisted (no RDB snapshots, no append-only file);
- optionally as a one-node cluster owning every hash slot (``cluster=True``), for
  ``RedisCluster`` clients.

:meth:`RedisServer.command` speaks RESP over a socket of its own, outside any client's
pool: what the server says (``CLIENT LIST``, ``INFO``) is a truth independent of the pools
poolwatch reads, and ``CLIENT KILL`` drops the connections of a pool behind its back.

Usage::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url())      # redis://:password@127.0.0.1:port/0
        server.client_count()                             # connections it holds now

``scripts/test`` installs Debian's ``redis-server`` package when it is missing.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = ["RedisError", "RedisServer", "find_server"]

_START_ATTEMPTS = 3
_START_SECONDS = 20.0
_STOP_SECONDS = 10.0
_REPLY_SECONDS = 10.0

Reply = str | int | bytes | list["Reply"] | None


class RedisError(RuntimeError):
    """Starting, stopping or talking to the server failed (or it answered an error)."""


def find_server() -> Path:
    """The ``redis-server`` binary, or :class:`RedisError` naming the package to install."""
    found = shutil.which("redis-server")
    if found is None:
        raise RedisError(
            "redis-server not found on PATH: install Debian's 'redis-server' package "
            "(scripts/test does this when it is missing)"
        )
    return Path(found)


def _free_port(host: str, *, cluster: bool = False) -> int:
    """A free port; for a cluster node, one of at most 55535 whose bus port (10,000 higher:
    redis-server's rule) is free too."""
    if not cluster:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            return int(probe.getsockname()[1])
    chooser = random.Random()
    for _ in range(200):
        port = chooser.randint(20000, 55535)
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind((host, port))
                second.bind((host, port + 10000))
            except OSError:
                continue
            return port
    raise RedisError("no free pair of ports (port, port + 10000) for a cluster node")


def _encode(*args: str | int | bytes) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Reader:
    """RESP2 replies from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise RedisError("the server closed the connection")
        self._buffer += chunk

    def reply(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) < size + 2:
                self._fill()
            data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
            return data
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.reply() for _ in range(size)]
        raise RedisError(f"unexpected reply {line[:40]!r}")


class RedisServer:
    """One throw-away ``redis-server``: ``start()``, ``stop()``.

    Also a context manager (started on enter, stopped and removed on exit). ``stop()`` is
    idempotent and is also registered to run at interpreter exit while the server runs.
    """

    def __init__(
        self,
        *,
        password: str = "r3dis-pw-never-exported",
        cluster: bool = False,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        """``checkpoint``: called between the steps of ``start()``; what it raises (the
        demo's KeyboardInterrupt on a stop signal) stops and removes the server."""
        self._binary = find_server()
        self._checkpoint = checkpoint or (lambda: None)
        self.host = "127.0.0.1"
        self.port = 0
        self.password = password
        self.cluster = cluster
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, *, username: str | None = None) -> str:
        """``redis://[username]:password@127.0.0.1:port/db``: credentials in the URL, as
        applications write them."""
        user = username or ""
        return f"redis://{user}:{self.password}@{self.host}:{self.port}/{db}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server on a free loopback port; wait until it answers."""
        if self._root is not None:
            raise RedisError("the server is already started")
        self._root = Path(tempfile.mkdtemp(prefix="poolwatch-redis-"))
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                self._checkpoint()
                self.port = _free_port(self.host, cluster=self.cluster)
                self._launch()
                if self._wait_ready():
                    break
                taken = "Address already in use" in self.log_tail()
                self._terminate()
                if attempt == _START_ATTEMPTS or not taken:
                    raise RedisError(f"redis-server did not start:\n{self.log_tail()}")
            self._checkpoint()
            if self.cluster:
                self.command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
                self._wait_cluster_ok()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the server and remove its directory; safe to call again."""
        root = self._root
        if root is None:
            return
        atexit.unregister(self.stop)
        try:
            self._terminate()
        finally:
            shutil.rmtree(root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self.host}:{self.port}" if self.running else "stopped"
        return f"<RedisServer {state}{' cluster' if self.cluster else ''}>"

    def log_tail(self, lines: int = 30) -> str:
        if self._root is None:
            return "(no log)"
        try:
            text = (self._root / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _launch(self) -> None:
        assert self._root is not None
        arguments = [
            str(self._binary),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--unixsocket",
            "",
            "--requirepass",
            self.password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self._root),
            "--logfile",
            str(self._root / "redis.log"),
            "--databases",
            "64",  # a database per test keeps their pools' names apart
        ]
        if self.cluster:
            arguments += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self._process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self._root,
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                if self.command("PING") == "PONG":
                    return True
            except (OSError, RedisError):
                pass
            time.sleep(0.02)
        return False

    def _wait_cluster_ok(self) -> None:
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            info = self.command("CLUSTER", "INFO")
            if isinstance(info, bytes) and b"cluster_state:ok" in info:
                return
            time.sleep(0.05)
        raise RedisError("the one-node cluster did not reach cluster_state:ok")

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # -- talking to it, outside any pool ---------------------------------------------------
    def command(self, *args: str | int | bytes) -> Reply:
        """Send one command on a connection of its own (authenticated), return the reply."""
        with socket.create_connection((self.host, self.port), timeout=_REPLY_SECONDS) as sock:
            reader = _Reader(sock)
            sock.sendall(_encode("AUTH", self.password) + _encode(*args))
            reader.reply()
            return reader.reply()

    def clients(self) -> list[dict[str, str]]:
        """``CLIENT LIST``, each connection's fields (this query's own connection left out)."""
        listed = self.command("CLIENT", "LIST")
        rows = []
        for line in (listed or b"").decode().splitlines() if isinstance(listed, bytes) else []:
            fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part)
            if fields.get("cmd") != "client|list":
                rows.append(fields)
        return rows

    def client_count(self, name: str | None = None) -> int:
        """Connections the server holds open now (named ``name`` if given: ``CLIENT
        SETNAME``, or redis-py's ``client_name=``)."""
        return sum(1 for c in self.clients() if name is None or c.get("name") == name)

    def kill_clients(self, name: str | None = None, *, idle: bool = True) -> int:
        """Close connections from the server's side (``CLIENT KILL ID``): those named
        ``name`` (all if None), only those not blocked in a command when ``idle``. Returns
        how many; waits until the server no longer lists them."""
        chosen = [
            client["id"]
            for client in self.clients()
            if (name is None or client.get("name") == name)
            and not (idle and "b" in client.get("flags", ""))  # blocked (BLPOP…): not idle
        ]
        return self.kill(chosen)

    def kill(self, ids: list[str]) -> int:
        """``CLIENT KILL ID`` each of ``ids``; waits until the server no longer lists them.
        Returns how many it killed."""
        killed = []
        for client_id in ids:
            with contextlib.suppress(RedisError):
                if self.command("CLIENT", "KILL", "ID", client_id) == 1:
                    killed.append(client_id)
        deadline = time.monotonic() + _REPLY_SECONDS
        while time.monotonic() < deadline:
            if not {c["id"] for c in self.clients()}.intersection(killed):
                break
            time.sleep(0.01)
        return len(killed)
