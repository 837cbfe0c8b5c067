"""aiohttp pools: every ``BaseConnector`` (``TCPConnector``, ``UnixConnector``), made by a
``ClientSession`` or by the application, before or after ``instrument()``.

A connector is one pool spanning servers: ``limit`` connections in all (0: unbounded),
``limit_per_host`` per ``(host, port, TLS, proxy)`` key. Its levels are read from the
connector itself at collection: used — connections handed out (``_acquired``), including
the slots of connections being opened, which count against ``limit`` as aiohttp counts
them; idle — open connections kept for reuse (``_conns``; a connection the server has
closed is not counted, it is thrown away as ``stale`` the next time aiohttp looks at it);
both also per server (``Levels.hosts``: ``server.address`` is the host as the request
addresses it); max — ``limit``, absent when 0; pending — requests queued for a slot now
(``_waiters``, every host; per server by the queue's connection key, a server with
callers waiting and no connection yet included). aiohttp's ``limit`` bounds the
connections handed out, not the idle ones: a connector that has talked to several servers
may keep more idle connections than ``limit``. The containers are copied before they are
read: collection runs on the exporter's thread, not the event loop's.

``limit_per_host`` is not a pool-wide maximum and is not exported as one (no metric is
invented for it): ``poolwatch.connections.max`` stays ``limit``. A pool held back by
``limit_per_host`` shows as ``poolwatch.pending_requests`` above 0 while the server's
``used`` (per ``server.address``) sits at ``limit_per_host`` below ``max``; waits queued
that way land in ``poolwatch.wait.duration`` like any other.

Names: a session with ``base_url`` names the pool it creates by the origin of that URL
(``https://api.example.com:8443``; never user, password, path or query); any other
connector is ``aiohttp``, and the registry adds the creation site in user code once a
second place creates one. A connector the application makes is tracked when the first
session takes it (and named by that session's ``base_url``), or at its first
``connect()``; it keeps that name when more sessions share it.

Where it hooks, and why there:

* ``ClientSession.__init__``, ``BaseConnector.__init__`` — new connectors, their name and
  creation site. Connectors made before ``instrument()`` are found once by a heap walk,
  and any connector still unknown at its first ``connect()`` is tracked then.
* ``BaseConnector.connect`` — the caller's whole wait: from the call until a connection is
  handed out, queue wait and a new connection's connect included. A wrapper is the only
  way to see where the wait starts. Outcomes: ``timeout`` when the wait for a slot ran out
  (``ClientTimeout(connect=…)``: aiohttp raises ``asyncio.TimeoutError`` there, which a
  ``ClientSession`` turns into ``ConnectionTimeoutError``, a ``ServerTimeoutError``; or
  the session's ``total`` timeout cancelling a queued request); ``error`` otherwise —
  including a timeout or failure while the new connection was being opened (that one is
  a connect error, not pool exhaustion) and a request cancelled by the application.
* ``BaseConnector._release`` — end of use (``Connection.release()`` and ``close()``).
* ``_create_connection`` of ``TCPConnector`` and ``UnixConnector`` — connect time: DNS
  resolution (usually cached), TCP, proxy tunnel and TLS, as urllib3's ``connect()``
  measures it. A failed or cancelled attempt is ``outcome=error`` (refused, DNS, TLS,
  ``sock_connect`` timeout, or the ``connect`` timeout expiring mid-connect).
* ``ResponseHandler.close`` / ``abort`` — closes, counted only when the connector lets
  go of a connection (the caller's code object tells which connector function it is);
  each connection is counted once, when its pool mark is popped:

  ==========================================  ============================================
  closed by                                    reason
  ==========================================  ============================================
  ``_get``, ``_cleanup``: past                 ``idle_expired``
  ``keepalive_timeout``, still open
  ``_get``, ``_cleanup``: found closed         ``stale`` (the server closed the idle
                                               connection; aiohttp opens a new one, the
                                               request does not fail)
  ``_release`` of a ``force_close`` connector  ``disposed`` (a connection per request, by
                                               design — like SQLAlchemy's ``NullPool``)
  ``_release`` from ``Connection.close()``     ``error``: the request failed, or the
                                               response was closed rather than released
                                               (or a leaked ``Connection`` was collected)
  ``_release``, protocol failed                ``error`` (an exception on the connection,
                                               e.g. the server dropped it mid-response)
  ``_release``, not reusable                   ``invalidated``: ``Connection: close`` or
                                               HTTP/1.0 from the server, a body not read to
                                               the end, an upgraded connection
  ``_close`` (connector / session closed),     ``disposed``
  ``connect`` on a connector closed meanwhile
  ==========================================  ============================================

  aiohttp never closes a connection because the pool is full (it has no idle maximum), so
  ``pool_full`` and ``max_lifetime`` never occur for it. A server closing idle
  connections shows as ``stale`` when aiohttp has seen the EOF before the next request
  (the usual case; the request is unaffected). When it has not yet (the server closed
  the connection just before it was reused), the request fails with
  ``ServerDisconnectedError``, the connection closes as ``error``, and aiohttp retries an
  idempotent request once on a new connection: one checkout more than requests.

Why patching rather than aiohttp's ``TraceConfig``, with the measurements: see
docs/architecture.md ("httpx and aiohttp adapters"). Levels never come from events: they
are read from the connector, so they cannot drift and include connections opened before
``instrument()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine, Hashable
from time import monotonic, perf_counter
from types import CodeType, FrameType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, capture_stack
from poolwatch._models import HostLevels, Levels, Misconfiguration
from poolwatch._naming import creation_site, target_name
from poolwatch.adapters._base import Adapter, Tracker, heap_objects
from poolwatch.adapters._patching import CALLER

_LEDGER = "_poolwatch_ledger"
_MARK = "_poolwatch_mark"
"""On a connection (``ResponseHandler``): ``(born, key)`` — monotonic birth time (None if
opened before poolwatch saw it) and its ``ConnectionKey`` (None if unknown); not None means
"a connection of a pool, not yet counted as closed" (the class default is None)."""
_OUT = "_poolwatch_out"
"""On a connection: the ``perf_counter()`` time it was handed out, while it is out (the class
default is None). Kept on the connection rather than in ``Ledger.active``: a dict set and
pop per request cost about a third of the hooks' time inside a request (measured in situ,
benchmarks/bench_http.py); ``checkouts`` reads them from the connectors at collection."""
_FRESH = "_poolwatch_fresh"
"""On a connection: opened, not handed out yet (the class default is False): the checkout
that gets it is its first (``Adapter.tells_firsts``)."""
_CONNECTING = "_poolwatch_connecting"
"""On a connector: connections being opened, by ``ConnectionKey`` (for per-host used)."""
_SITE = "_poolwatch_site"
"""On a connector the application made: where, until it is tracked."""
_MAKER = "_poolwatch_maker"
"""On a connector aiobotocore made: its :class:`Maker` (service and endpoint)."""
_NAME = "_poolwatch_name"
"""On an aiobotocore client's HTTP session: the name ``track()`` gave the client."""
_TARGET = "aiohttp"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_FRAMES_SEARCHED = 40


class Maker(NamedTuple):
    """Who made a connector other than the application: aiobotocore, for a client."""

    kind: str
    target: str
    attributes: dict[str, str | int]
    name: str | None = None


def aiobotocore_maker(endpoint: Any) -> Maker | None:
    """The maker of the connectors of an aiobotocore ``AioEndpoint``: ``pool.kind``
    botocore, named by service and endpoint as boto3's pools are
    (``dynamodb https://dynamodb.eu-west-1.amazonaws.com``)."""
    service = getattr(endpoint, "_endpoint_prefix", None)
    host = getattr(endpoint, "host", None)
    if not isinstance(service, str) or not isinstance(host, str):
        return None
    url = urlsplit(host)
    scheme = (url.scheme or "https").lower()
    try:
        port = url.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = _DEFAULT_PORTS.get(scheme)
    origin = target_name(scheme, url.hostname, None if port == _DEFAULT_PORTS.get(scheme) else port)
    attributes: dict[str, str | int] = {}
    if url.hostname:
        attributes[c.SERVER_ADDRESS] = url.hostname
        if port:
            attributes[c.SERVER_PORT] = port
    name = getattr(getattr(endpoint, "http_session", None), _NAME, None)
    return Maker("botocore", f"{service} {origin}", attributes, name)


def _maker_of(frame: FrameType | None) -> Maker | None:
    """Find, in the stack that creates a connector, the aiobotocore endpoint asking for it
    (its ``AIOHTTPSession`` makes one connector per proxy, at its first request)."""
    f, depth = frame, 0
    while f is not None and depth < _FRAMES_SEARCHED:
        if f.f_globals.get("__name__", "").startswith("aiobotocore."):
            owner = f.f_locals.get("self")
            if type(owner).__module__.startswith("aiobotocore.") and hasattr(
                owner, "_endpoint_prefix"
            ):
                return aiobotocore_maker(owner)
        f, depth = f.f_back, depth + 1
    return None


_failed_connect: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "poolwatch_aiohttp_failed_connect", default=None
)
"""The request whose new connection just failed to open, in this task: tells a timeout
while connecting (a connect error) from a timeout while queued for a slot."""


def base_url_target(url: Any) -> str:
    """The credential-free origin of a ``yarl.URL``: ``scheme://host[:port]``."""
    scheme = (url.scheme or "http").lower()
    port = url.port
    return target_name(scheme, url.host, None if port == _DEFAULT_PORTS.get(scheme) else port)


class AiohttpAdapter(Adapter):
    """Hooks aiohttp 3.x connectors (``ClientSession`` pools)."""

    name = "aiohttp"
    kind = "aiohttp"
    module = "aiohttp"
    connects_in_checkout = True
    tells_firsts = True
    """Not checkouts less connects: a connect can succeed and its checkout still fail (a
    trace callback raising after it, the connector closed meanwhile)."""
    connects_in_wait = True
    family = "http"
    requires = ("aiohttp >= 3.12.11, < 4",)
    tested_with = ("aiobotocore >= 3.10.0, < 4",)

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._sited: weakref.WeakSet[Any] = weakref.WeakSet()
        """Connectors made since instrument() and not tracked yet (their site is kept)."""
        self._making = threading.local()
        self._placeholder: type = type(None)
        self._closers: dict[CodeType, str] = {}
        self._waits_for_ever: weakref.WeakSet[Any] = weakref.WeakSet()
        """Connectors of sessions whose timeout bounds neither ``total`` nor ``connect``."""
        self._named: weakref.WeakSet[Any] = weakref.WeakSet()
        """aiobotocore HTTP sessions ``track()`` named."""

    # -- patching ----------------------------------------------------------------------
    def instrument(self, *, imported_before: bool) -> None:
        from aiohttp import client, client_proto, connector

        base = connector.BaseConnector
        # The slot of a connection being opened (aiohttp 3.10+); never a connection.
        self._placeholder = getattr(connector, "_TransportPlaceholder", type(None))
        # Who closes a connection tells why (see the table in the module docstring).
        self._closers = {
            base._get.__code__: "get",
            base._cleanup.__code__: "cleanup",
            base._release.__code__: "release",
            base._close.__code__: "close",
            base.connect.__code__: "close",
        }
        # Marks are plain attributes with class defaults, never written through __dict__:
        # reading an instance's __dict__ materialises it, after which every attribute read
        # on that object — aiohttp's own, dozens per request — is slower (measured with
        # valgrind: ~23,000 more instructions per request, 7% of one).
        self._patch(base, _LEDGER, None)  # class default: "untracked"
        self._patch(base, _CONNECTING, None)
        self._patch(base, _SITE, None)
        self._patch(base, _MAKER, None)
        handler = client_proto.ResponseHandler
        self._patch(handler, _MARK, None)
        self._patch(handler, _OUT, None)
        self._patch(handler, _FRESH, False)
        self._hook_all(
            [
                (base, "connect", _connect_hook),
                (base, "_release", _release_hook),
                (connector.TCPConnector, "_create_connection", _create_hook),
                (connector.UnixConnector, "_create_connection", _create_hook),
                (handler, "close", _close_hook),
                (handler, "abort", _close_hook),
            ]
        )
        session = client.ClientSession
        self._wrap_all(
            [(base, "__init__", _connector_init_hook), (session, "__init__", _session_init_hook)]
        )
        if imported_before:
            self._track_existing(session, base)

    def _forget_pools(self) -> None:
        for connector in list(self._tracked):
            try:
                self._unmark(connector)
            except Exception as error:
                self.report("aiohttp uninstrument", error)
        for connector in list(self._sited):
            _forget(connector, _SITE)
            _forget(connector, _MAKER)
        for http_session in list(self._named):
            _forget(http_session, _NAME)
        self._tracked = weakref.WeakSet()
        self._sited = weakref.WeakSet()
        self._named = weakref.WeakSet()

    def _unmark(self, connector: Any) -> None:
        _forget(connector, _LEDGER)
        _forget(connector, _CONNECTING)
        _forget(connector, _SITE)
        _forget(connector, _MAKER)
        protocols = [p for conns in list(connector._conns.values()) for p, _ in list(conns)]
        for proto in protocols + list(connector._acquired):
            _forget(proto, _MARK)
            _forget(proto, _OUT)
            _forget(proto, _FRESH)

    # -- tracking ----------------------------------------------------------------------
    def _track_connector(
        self, connector: Any, target: str, site: str | None, name: str | None = None
    ) -> Ledger:
        maker: Maker | None = getattr(connector, _MAKER)
        kind: str | None = None
        attributes: dict[str, str | int] | None = None
        if maker is not None:  # aiobotocore's: pool.kind botocore, named as boto3's pools
            target, kind, attributes = maker.target, maker.kind, maker.attributes
            name = name or maker.name
        ledger = self.tracker.track(
            connector, self, target=target, site=site, name=name, attributes=attributes, kind=kind
        )
        if getattr(connector, _LEDGER) is None:
            # Connections it already holds were opened before we saw it: mark them as the
            # pool's (lifetime unknown) so their closes are counted.
            for key, conns in list(connector._conns.items()):
                for proto, _ in list(conns):
                    if getattr(proto, _MARK, None) is None:
                        setattr(proto, _MARK, (None, key))
            for proto in list(connector._acquired):
                if type(proto) is not self._placeholder and getattr(proto, _MARK) is None:
                    setattr(proto, _MARK, (None, None))
        _forget(connector, _SITE)
        self._sited.discard(connector)
        if getattr(connector, _CONNECTING) is None:
            setattr(connector, _CONNECTING, {})
        setattr(connector, _LEDGER, ledger)
        self._tracked.add(connector)
        return ledger

    def _track_session(self, session: Any, site: str | None, name: str | None = None) -> bool:
        connector = session._connector
        if connector is None:
            return False
        base_url = session._base_url
        target = base_url_target(base_url) if base_url is not None else _TARGET
        self._track_connector(connector, target, site, name)
        timeout = getattr(session, "timeout", None)
        if timeout is not None and timeout.total is None and timeout.connect is None:
            self._waits_for_ever.add(connector)  # a request may wait for a slot for ever
        return True

    def _discover(self, connector: Any) -> Ledger | None:
        """A connector first seen at its first connect()."""
        if self.stopped:  # a hook still running after uninstrument(): track nothing new
            return None
        try:
            return self._track_connector(connector, _TARGET, getattr(connector, _SITE))
        except Exception as error:
            self.report("aiohttp discover", error)
            return None

    def _track_existing(self, session_cls: type, connector_cls: type) -> None:
        sessions: list[Any] = []
        connectors: list[Any] = []
        endpoints: list[Any] = []
        for obj in heap_objects(
            lambda cls: (
                issubclass(cls, (session_cls, connector_cls))
                or cls.__module__ == "aiobotocore.endpoint"
            )
        ):
            cls = type(obj)  # not isinstance(): a proxy's __class__ may run code, or raise
            if issubclass(cls, session_cls):
                sessions.append(obj)
            elif issubclass(cls, connector_cls):
                connectors.append(obj)
            elif cls.__module__ == "aiobotocore.endpoint":
                endpoints.append(obj)  # an AioEndpoint: a client's (or a helper of its module)
        for endpoint in endpoints:  # aiobotocore clients: their connectors get their maker
            try:
                self._mark_made(endpoint)
            except Exception as error:
                self.report("aiohttp existing aiobotocore client", error)
        for session in sessions:
            try:
                connector = session._connector
                if connector is not None and session._connector_owner and not connector.closed:
                    self._track_session(session, None)
            except Exception as error:
                self.report("aiohttp existing session", error)
        for connector in connectors:
            try:
                if not connector.closed and getattr(connector, _LEDGER) is None:
                    self._track_connector(connector, _TARGET, None)
            except Exception as error:
                self.report("aiohttp existing connector", error)

    def _mark_made(self, endpoint: Any, name: str | None = None) -> list[Any]:
        """Give the connectors of an aiobotocore endpoint their maker; return them."""
        maker = aiobotocore_maker(endpoint)
        http_session = getattr(endpoint, "http_session", None)
        found = []
        for session in list((getattr(http_session, "_sessions", None) or {}).values()):
            connector = getattr(session, "_connector", None)
            if connector is not None and maker is not None:
                setattr(connector, _MAKER, maker._replace(name=name or maker.name))
                found.append(connector)
        return found

    def track(self, obj: Any, name: str | None) -> bool:
        try:
            from aiohttp import ClientSession, connector
        except ImportError:
            return False
        endpoint = getattr(obj, "_endpoint", None)  # an aiobotocore client
        http_session = getattr(endpoint, "http_session", None)
        if type(http_session).__module__.startswith("aiobotocore.") and hasattr(
            http_session, "_sessions"
        ):
            if name is not None:  # its connectors are made at its first request: name them
                setattr(http_session, _NAME, name)
                self._named.add(http_session)
            for made in self._mark_made(endpoint, name):
                self._track_connector(made, _TARGET, None, name)
            return True
        if isinstance(obj, ClientSession):
            return self._track_session(obj, None, name)
        if isinstance(obj, connector.BaseConnector):
            self._track_connector(obj, _TARGET, None, name)
            return True
        return False

    # -- closes ------------------------------------------------------------------------
    def _closing(self, proto: Any, frame: FrameType) -> None:
        """``proto`` is being closed by the function running ``frame``."""
        closer = self._closers.get(frame.f_code)
        if closer is None:
            return  # not the pool letting go: counted when the pool does
        mark = _mark_of(proto)
        if mark is None:
            return  # not a pool's connection, or already counted
        setattr(proto, _MARK, None)
        local = frame.f_locals
        connector = local.get("self")
        ledger: Ledger | None = getattr(connector, _LEDGER, None)
        if ledger is None:
            return
        if closer == "close":
            reason = c.REASON_DISPOSED
        elif closer == "release":
            reason = _release_reason(connector, proto, bool(local.get("should_close")))
        else:  # _get or _cleanup: expired, or found closed
            transport = proto.transport
            open_ = transport is not None and not transport.is_closing()
            reason = c.REASON_IDLE_EXPIRED if open_ else c.REASON_STALE
        born = mark[0]
        ledger.closed_connection(reason, monotonic() - born if born is not None else None)

    # -- levels ------------------------------------------------------------------------
    def checkouts(self, pools: list[Any]) -> dict[Hashable, float]:
        # One C call per connector: the event loop's thread changes _acquired meanwhile.
        # A connection returned since the copy reads None (its hook cleared it first).
        out: dict[Hashable, float] = {}
        for pool in pools:
            for proto in list(pool._acquired):
                start = getattr(proto, _OUT, None)  # a placeholder slot has none
                if isinstance(start, float):  # not a stand-in's attribute (aiohttp's tests)
                    out[proto] = start
        return out

    def levels(self, pool: Any) -> Levels:
        # Copies first, each one C call: the event loop's thread changes these meanwhile.
        acquired = list(pool._acquired)
        conns = list(pool._conns.items())
        waiters = list(pool._waiters.items())
        connecting = list((getattr(pool, _CONNECTING) or {}).items())
        used_at: dict[tuple[str, int], int] = {}
        idle_at: dict[tuple[str, int], int] = {}
        placeholder = self._placeholder
        for proto in acquired:
            if type(proto) is placeholder:
                continue  # a slot for a connection being opened: counted from _CONNECTING
            mark = _mark_of(proto)
            server = _server(mark[1]) if mark is not None and mark[1] is not None else None
            if server is None:
                server = _peer(proto)
            if server is not None:
                used_at[server] = used_at.get(server, 0) + 1
        for key, opening in connecting:
            server = _server(key)
            used_at[server] = used_at.get(server, 0) + opening
        for key, queue in conns:
            server = _server(key)
            count = 0
            for proto, _ in list(queue):
                transport = proto.transport
                if transport is not None and not transport.is_closing():
                    count += 1
            if count:
                idle_at[server] = idle_at.get(server, 0) + count
        pending_at: dict[tuple[str, int], int] = {}
        for key, queued in waiters:
            waiting = sum(1 for waiter in list(queued) if not waiter.done())
            if waiting:
                server = _server(key)
                pending_at[server] = pending_at.get(server, 0) + waiting
        hosts = tuple(
            HostLevels(
                server[0],
                server[1],
                used_at.get(server, 0),
                idle_at.get(server, 0),
                pending_at.get(server, 0),
            )
            for server in {**used_at, **idle_at, **pending_at}
        )
        limit = pool._limit
        return Levels(
            used=len(acquired),
            idle=sum(idle_at.values()),
            max=limit if limit else None,
            pending=sum(pending_at.values()),
            hosts=hosts,
        )

    # -- diagnostics -------------------------------------------------------------------
    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        found = []
        maker: Maker | None = getattr(pool, _MAKER, None)
        if not pool._limit:
            setting = "AioConfig(max_pool_connections=0)" if maker else "TCPConnector(limit=0)"
            found.append(Misconfiguration(c.ANTIPATTERN_UNBOUNDED_POOL, setting))
        if pool not in self._waits_for_ever:
            pass
        elif maker is None:
            found.append(
                Misconfiguration(
                    c.ANTIPATTERN_NO_POOL_TIMEOUT, "ClientTimeout(total=None, connect=None)"
                )
            )
        elif any(not w.done() for q in list(pool._waiters.values()) for w in list(q)):
            # aiobotocore sets no bound on the wait for a connection, whatever its
            # configuration says: reported once a caller is seen waiting, as for urllib3.
            found.append(
                Misconfiguration(
                    c.ANTIPATTERN_NO_POOL_TIMEOUT,
                    "aiobotocore (its aiohttp session has neither a total nor a connect "
                    "timeout), callers waiting for one of max_pool_connections",
                )
            )
        return tuple(found)

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = []
        for protocol in self._protocols(pool):
            transport = protocol.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            fd = sock.fileno() if sock is not None else -1
            if isinstance(fd, int) and fd >= 0:
                found.append(fd)
        return tuple(found)

    def _protocols(self, pool: Any) -> list[Any]:
        """The connector's connections: idle ones and handed-out ones."""
        protocols = [p for conns in list(pool._conns.values()) for p, _ in list(conns)]
        protocols.extend(p for p in list(pool._acquired) if type(p) is not self._placeholder)
        return protocols

    def oldest_connection(self, pool: Any) -> float | None:
        marks = [_mark_of(p) for p in self._protocols(pool)]
        born = [mark[0] for mark in marks if mark is not None and mark[0] is not None]
        return monotonic() - min(born) if born else None


def _mark_of(proto: Any) -> tuple[float | None, Any] | None:
    """A connection's mark (see ``_MARK``), or None — also for whatever stands in for a
    connection without being one (aiohttp's own tests put ``Mock()`` objects in a
    connector, whose every attribute is another ``Mock``)."""
    mark = getattr(proto, _MARK, None)
    return mark if isinstance(mark, tuple) else None


def _forget(obj: Any, attribute: str) -> None:
    """Remove a mark from an instance (its class default stays until uninstrument)."""
    with contextlib.suppress(AttributeError):
        delattr(obj, attribute)


def _server(key: Any) -> tuple[str, int]:
    """The server of a connection key (aiohttp's ``ConnectionKey``; a connector subclass may
    key its connections otherwise: then no server is known)."""
    return (str(getattr(key, "host", None) or ""), getattr(key, "port", None) or 0)


def _peer(proto: Any) -> tuple[str, int] | None:
    """Where a connection opened before poolwatch saw it goes (its key is unknown)."""
    transport = proto.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return (str(peer[0]), int(peer[1]))
    return None


def _release_reason(connector: Any, proto: Any, should_close: bool) -> str:
    """Why ``_release`` closes ``proto`` instead of keeping it (read before the close)."""
    if connector._force_close:
        return c.REASON_DISPOSED
    if should_close or proto._exception is not None:
        return c.REASON_ERROR
    return c.REASON_INVALIDATED


# -- hooks ---------------------------------------------------------------------------------
# Each factory returns the replacement for one aiohttp function. The connect and release
# hooks are the hot path: no OpenTelemetry, no lock, no logging, no method call on the
# ledger beyond the hot-path contract of _ledger.py, inlined.


def _connect_hook(
    adapter: AiohttpAdapter, original: Callable[..., Coroutine[Any, Any, Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    report = adapter.report
    timeout_error = asyncio.TimeoutError
    cancelled = asyncio.CancelledError

    def failed(ledger: Ledger | None, start: float, req: Any, error: BaseException) -> None:
        end = perf_counter()
        try:
            connecting = _failed_connect.get() is req
            if connecting:
                _failed_connect.set(None)
            if ledger is None:
                return
            if isinstance(error, timeout_error):
                timeout = not connecting  # ran out waiting for a slot
            elif isinstance(error, cancelled):
                # The session's total timeout cancels the task; its timer says so.
                timer = getattr(req, "_timer", None)
                timeout = not connecting and getattr(timer, "_cancelled", False) is True
            else:
                timeout = False
            ledger.failed(start, end, timeout=timeout)
        except Exception as bookkeeping:
            report("aiohttp connect", bookkeeping)

    async def connect(self: Any, req: Any, traces: Any, timeout: Any) -> Any:
        try:
            ledger: Ledger | None = self._poolwatch_ledger
            if ledger is None:
                ledger = adapter._discover(self)
        except AttributeError:  # uninstrument() took the class default meanwhile
            ledger = None
        start = perf_counter()
        try:
            conn = await original(self, req, traces, timeout)
        except BaseException as error:
            failed(ledger, start, req, error)
            raise
        if ledger is not None:
            try:
                # Ledger.acquired, inlined (the hot-path contract in _ledger.py), the
                # checkout time kept on the connection (_OUT).
                now = perf_counter()
                proto = conn._protocol
                proto._poolwatch_out = now
                if proto._poolwatch_fresh:  # its first checkout
                    proto._poolwatch_fresh = False
                    ledger.firsts.append(None)
                ledger.waits.append(now - start)
                if now - start > ledger.span_threshold:  # a wait that waited: a span
                    ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                    ledger.stacks[proto] = capture_stack(sys._getframe(1))
            except Exception as error:
                report("aiohttp connect", error)
        return conn

    return connect


def _release_hook(adapter: AiohttpAdapter, original: Callable[..., None]) -> Callable[..., None]:
    report = adapter.report

    def _release(self: Any, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        try:
            ledger = self._poolwatch_ledger
            if ledger is not None:
                # Ledger.released, inlined (the hot-path contract in _ledger.py), the checkout
                # time read from the connection (_OUT); no helper frame and no frame read on
                # the common path (benchmarks/compare.py read +8% on connect+release with both)
                start = protocol._poolwatch_out
                if start is not None:
                    protocol._poolwatch_out = None
                    held = perf_counter() - start
                    if should_close and sys._getframe(1).f_code.co_name == "__del__":
                        # A Connection collected unreleased (aiohttp warns "Unclosed
                        # connection"): the borrower dropped it.
                        ledger.collected(protocol, held)
                    else:
                        ledger.uses.append(held)
                        if held > ledger.leak_threshold:
                            ledger.settle(protocol, held)
                        elif ledger.stacks:
                            ledger.stacks.pop(protocol, None)
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("aiohttp release", error)
        original(self, key, protocol, should_close=should_close)

    return _release


def _create_hook(
    adapter: AiohttpAdapter, original: Callable[..., Coroutine[Any, Any, Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    report = adapter.report

    async def _create_connection(self: Any, req: Any, traces: Any, timeout: Any) -> Any:
        key = req.connection_key
        try:
            connecting: dict[Any, int] | None = self._poolwatch_connecting
            if connecting is not None:
                connecting[key] = connecting.get(key, 0) + 1
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("aiohttp connect", error)
            connecting = None
        start = perf_counter()
        try:
            proto = await original(self, req, traces, timeout)
        except BaseException:
            _connect_done(self, connecting, key, perf_counter() - start, ok=False, report=report)
            _failed_connect.set(req)
            raise
        _connect_done(self, connecting, key, perf_counter() - start, ok=True, report=report)
        try:
            proto._poolwatch_mark = (monotonic(), key)
            proto._poolwatch_fresh = True
        except Exception as error:
            report("aiohttp connect", error)
        return proto

    return _create_connection


def _connect_done(
    connector: Any,
    connecting: dict[Any, int] | None,
    key: Any,
    duration: float,
    *,
    ok: bool,
    report: Callable[[str, BaseException], None],
) -> None:
    try:
        if connecting is not None:
            left = connecting.get(key, 0) - 1
            if left > 0:
                connecting[key] = left
            else:
                connecting.pop(key, None)
        ledger: Ledger | None = connector._poolwatch_ledger
        if ledger is not None:
            ledger.connected(duration, ok=ok)
    except Exception as error:
        report("aiohttp connect", error)


def _close_hook(adapter: AiohttpAdapter, original: Callable[[Any], None]) -> Callable[[Any], None]:
    def close(self: Any) -> None:
        try:
            if self._poolwatch_mark is not None:  # a pool's connection, not yet counted
                adapter._closing(self, sys._getframe(1))
        except Exception as error:
            adapter.report("aiohttp close", error)
        original(self)

    return close


def _connector_init_hook(
    adapter: AiohttpAdapter, original: Callable[..., None]
) -> Callable[..., None]:
    def connector_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped or getattr(adapter._making, "session", False):
            return  # made by ClientSession.__init__, which tracks it
        try:
            maker = _maker_of(sys._getframe(CALLER))
            if maker is not None:  # aiobotocore's, for a client's first request
                self._poolwatch_maker = maker
            # Tracked when a session takes it (named by its base_url) or at its first
            # connect(): ``ClientSession(base_url=…, connector=TCPConnector(…))`` makes the
            # connector first, and a pool's name cannot change once it is tracked.
            self._poolwatch_site = creation_site(sys._getframe(CALLER))
            adapter._sited.add(self)
        except Exception as error:
            adapter.report("aiohttp connector", error)

    return connector_init


def _session_init_hook(
    adapter: AiohttpAdapter, original: Callable[..., None]
) -> Callable[..., None]:
    def session_init(self: Any, *args: Any, **kwargs: Any) -> None:
        making = adapter._making
        outer = getattr(making, "session", False)
        making.session = True
        try:
            original(self, *args, **kwargs)
        finally:
            making.session = outer
        if adapter.stopped:
            return
        try:
            connector = self._connector
            if connector is not None and getattr(connector, _LEDGER) is None:
                site = getattr(connector, _SITE) or creation_site(sys._getframe(CALLER))
                adapter._track_session(self, site)
        except Exception as error:
            adapter.report("aiohttp session", error)

    return session_init
