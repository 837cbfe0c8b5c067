"""The process view: file descriptors against the limit, and every TCP connection of the
process by state and by owner — a tracked pool, nobody poolwatch knows, or a listener.

A pool can look healthy while the process runs out of file descriptors, or while a client
poolwatch does not see (a library with its own sockets, a leak outside any pool) piles up
connections. The process view answers both from the operating system (psutil, the
``process`` extra), not from the pools:

* ``poolwatch.process.file_descriptors`` and ``.max`` (the soft ``RLIMIT_NOFILE``);
* ``poolwatch.process.connections`` by ``network.connection.state`` and ``owner``:
  ``pool`` — the socket of a connection a tracked pool holds (each adapter names its
  pools' sockets, ``Adapter.sockets``); ``untracked`` — any other outbound connection;
  both with the remote ``server.address`` and ``server.port`` (the ``ENDPOINTS_KEPT``
  busiest endpoints of each; the rest as ``_other``); ``inbound`` — accepted by one of
  the process's listening sockets (their remote ends are clients' ephemeral ports: not
  named).

Reading it scans the process's descriptors and the kernel's TCP table (``/proc`` on
Linux): milliseconds on a busy host, so it never runs on a collection. poolwatch's own
thread (``_janitor.py``) refreshes it every ``REFRESH_EVERY`` seconds, collections export
the latest reading, and ``poolwatch.process_view()`` reads afresh.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poolwatch import _catalogue as c
from poolwatch._safe import ErrorLog

REFRESH_EVERY = 10.0
"""Seconds between two readings by poolwatch's thread."""
ENDPOINTS_KEPT = 20
"""Remote endpoints of untracked connections named; further ones are ``OTHER``."""
OTHER = "_other"
"""``server.address`` of the untracked connections past ``ENDPOINTS_KEPT`` endpoints."""

_STATES = {
    "ESTABLISHED": "established",
    "SYN_SENT": "syn_sent",
    "SYN_RECV": "syn_received",
    "FIN_WAIT1": "fin_wait_1",
    "FIN_WAIT2": "fin_wait_2",
    "TIME_WAIT": "time_wait",
    "CLOSE": "closed",
    "CLOSE_WAIT": "close_wait",
    "LAST_ACK": "last_ack",
    "CLOSING": "closing",
}
"""psutil's TCP states as ``network.connection.state`` spells them (listeners are left out)."""
_ANY_ADDRESS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ProcessConnections:
    """TCP connections of the process in one state, held by one kind of owner."""

    state: str
    """``established``, ``close_wait``, … (``network.connection.state``)."""
    owner: str
    """``pool``, ``untracked`` or ``inbound``."""
    count: int
    address: str | None = None
    """For ``pool`` and ``untracked``: the remote address (``_other`` past the endpoints
    kept); None for ``inbound``."""
    port: int | None = None
    """For ``pool`` and ``untracked``: the remote port."""


@dataclass(frozen=True)
class ProcessView:
    """The process's file descriptors and TCP connections at one moment."""

    pid: int
    file_descriptors: int | None
    """Open file descriptors; None where the platform does not say."""
    file_descriptors_max: int | None
    """The soft ``RLIMIT_NOFILE``; None when unlimited or unknown."""
    connections: tuple[ProcessConnections, ...]
    taken_at: float
    """``time.time()`` of the reading."""

    def count(self, owner: str | None = None, state: str | None = None) -> int:
        """Connections held by ``owner`` in ``state`` (either None: all)."""
        return sum(
            group.count
            for group in self.connections
            if (owner is None or group.owner == owner) and (state is None or group.state == state)
        )

    @property
    def untracked(self) -> int:
        """Outbound TCP connections no tracked pool holds."""
        return self.count(c.OWNER_UNTRACKED)

    def __repr__(self) -> str:
        limit = "unlimited" if self.file_descriptors_max is None else self.file_descriptors_max
        return (
            f"<ProcessView pid {self.pid} [file descriptors {self.file_descriptors} of {limit} "
            f"| tcp: pool {self.count(c.OWNER_POOL)}, untracked {self.untracked}, inbound "
            f"{self.count(c.OWNER_INBOUND)}]>"
        )


def _fd_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def read(pool_sockets: set[int], psutil: Any) -> ProcessView:
    """Read the process's descriptors and TCP connections; ``pool_sockets`` are the file
    descriptors the tracked pools' connections use."""
    process = psutil.Process(os.getpid())
    try:
        descriptors: int | None = process.num_fds()
    except (AttributeError, psutil.Error):  # num_fds() is POSIX-only
        descriptors = None
    lister = getattr(process, "net_connections", None) or process.connections  # psutil < 6
    sockets = lister(kind="tcp")
    listening: set[tuple[str, int]] = set()
    for conn in sockets:
        if conn.status == "LISTEN" and conn.laddr:
            listening.add((conn.laddr.ip, conn.laddr.port))
    inbound: dict[str, int] = {}
    outbound: dict[str, dict[tuple[str, str, int], int]] = {c.OWNER_POOL: {}, c.OWNER_UNTRACKED: {}}
    for conn in sockets:
        state = _STATES.get(conn.status)
        if state is None or not conn.raddr:
            continue  # listening, or not connected
        if any(
            port == conn.laddr.port and ip in (conn.laddr.ip, *_ANY_ADDRESS)
            for ip, port in listening
        ):
            inbound[state] = inbound.get(state, 0) + 1  # remote: clients' ephemeral ports
            continue
        owner = c.OWNER_POOL if conn.fd in pool_sockets else c.OWNER_UNTRACKED
        endpoint = (state, str(conn.raddr.ip), int(conn.raddr.port))
        counts = outbound[owner]
        counts[endpoint] = counts.get(endpoint, 0) + 1
    groups = _endpoints(c.OWNER_POOL, outbound[c.OWNER_POOL])
    groups.extend(_endpoints(c.OWNER_UNTRACKED, outbound[c.OWNER_UNTRACKED]))
    groups.extend(ProcessConnections(s, c.OWNER_INBOUND, n) for s, n in sorted(inbound.items()))
    return ProcessView(os.getpid(), descriptors, _fd_limit(), tuple(groups), time.time())


def _endpoints(owner: str, counts: dict[tuple[str, str, int], int]) -> list[ProcessConnections]:
    """Outbound connections by remote endpoint: the busiest ``ENDPOINTS_KEPT``, the rest as
    ``OTHER``."""
    by_endpoint: dict[tuple[str, int], int] = {}
    for (_, address, port), n in counts.items():
        by_endpoint[(address, port)] = by_endpoint.get((address, port), 0) + n
    ranked = sorted(by_endpoint, key=lambda e: (-by_endpoint[e], e))
    kept = set(ranked[:ENDPOINTS_KEPT])
    out: dict[tuple[str, str, int | None], int] = {}
    for (state, address, port), n in counts.items():
        key = (state, address, port) if (address, port) in kept else (state, OTHER, None)
        out[key] = out.get(key, 0) + n
    return [
        ProcessConnections(state, owner, n, address, port)
        for (state, address, port), n in sorted(out.items(), key=lambda item: str(item[0]))
    ]


class ProcessWatcher:
    """Keeps the latest process view; refreshed by poolwatch's thread, read by collections."""

    def __init__(self, pool_sockets: Callable[[], set[int]], errors: ErrorLog) -> None:
        import psutil  # the "process" extra; the caller checked it is installed

        self._psutil = psutil
        self._pool_sockets = pool_sockets
        self._errors = errors
        self._lock = threading.Lock()
        self.latest: ProcessView | None = None
        self._latest_started = float("-inf")
        """``time.monotonic()`` when the reading kept as ``latest`` began."""
        self.created_ns = time.time_ns()
        """Start of the process view's points (cumulative temporality)."""

    def refresh(self) -> ProcessView | None:
        """Read the process now; None (the failure counted) if the platform refuses.

        Readings by poolwatch's thread and by ``poolwatch.process_view()`` can overlap, and
        one taking longer can end last: ``latest`` keeps the reading that began last, so
        an export never goes back to a state older than one already read.
        """
        started = time.monotonic()
        try:
            view = read(self._pool_sockets(), self._psutil)
        except Exception as error:  # a platform psutil does not fully support, a race
            self._errors.report("process view", error)
            return None
        with self._lock:
            if started >= self._latest_started:
                self.latest, self._latest_started = view, started
        return view

    def reset(self) -> None:
        """In a forked child: the parent's reading is not this process's."""
        self._lock = threading.Lock()
        self.latest = None
        self._latest_started = float("-inf")
        self.created_ns = time.time_ns()
