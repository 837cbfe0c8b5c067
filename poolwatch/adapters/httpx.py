"""httpx pools: every httpcore ``ConnectionPool`` and ``AsyncConnectionPool`` (proxy pools
included), made by an ``httpx.Client`` / ``AsyncClient``, an ``httpx.HTTPTransport``, or
used directly.

Levels, read from the pool at collection (the pool's lists are copied first: other threads
and event loops mutate them; no method that makes a system call, such as ``has_expired``
or ``is_readable``, is ever called from a reading):

* used — connections serving at least one request, or still connecting; idle — open
  connections serving none; both per server (``Levels.hosts``: ``server.address`` and
  ``server.port`` of the origin; through a proxy, the origin behind it).
* max — ``max_connections`` (absent when None). It is one limit for the whole pool, over
  every origin it talks to, which is why the pool is one series and its servers are
  attributes of its points.
* ``idle_max`` — ``max_keepalive_connections`` (absent when None).
* pending — requests queued in the pool without a connection while it is at its limit,
  also per server (the queued request's origin; through a proxy, the origin behind it).

HTTP/2: one connection carries many concurrent requests (streams). poolwatch counts
*connections*, as httpcore's ``max_connections`` does: an HTTP/2 connection with five
streams in flight is one used connection, and becomes idle when its last stream ends.
Every request is still one checkout: ``wait.duration`` and ``use.duration`` are per
request (per stream), so checkouts can far exceed connections, and several requests can be
"using" the same connection at once.

Names: a client with ``base_url`` names its pools by that origin (no credentials, no
query string); any other client is ``httpx``, and a pool used without httpx is
``httpcore``. The registry adds the creation site when a second place creates one. A
proxy pool adds ``via`` and the proxy's origin (``httpx via http://proxy:3128``), never the
proxy's credentials.

Finding pools: ``Client.__init__`` / ``AsyncClient.__init__`` track their transports'
pools with the creation site; clients and pools that exist when ``instrument()`` runs are
found by one walk of the heap; any other pool (an ``httpcore`` pool made before, or by a
library poolwatch does not know) is tracked at its first request.

Hooks, and why there:

* ``ConnectionPool.handle_request`` / ``AsyncConnectionPool.handle_async_request`` — put
  the pool's ledger on the request (the request travels with the pool request and to the
  connection); a failure after the request had its connection ends its use, one before it
  could wait (the pool closing an expired connection, an unsupported scheme) is a wait
  with outcome ``error``, timed from the call.
* ``PoolRequest.wait_for_connection`` (and the async one) — the queue wait alone; when it
  returns, the request is out with its connection. A request the pool gave a connection
  before it asked (one was free: the usual case) waited for none, and its wait is
  recorded as 0 without reading the clock; only a request still queued is timed.
  ``PoolTimeout`` from the wait is a wait with outcome ``timeout`` and one
  ``poolwatch.timeouts``; any other failure while waiting (a cancelled waiter) a wait with
  outcome ``error``.
* ``HTTP11Connection._send_request_headers`` / ``HTTP2Connection._send_request_headers``
  (and async) — the connection accepts the request: the checkout is counted here, with
  its wait. Not at the pool's hand-over: httpcore may give two queued requests the same
  idle connection, or take an HTTP/1.1 connection for HTTP/2, and the request that finds
  it unavailable (``ConnectionNotAvailable``) waits again; it checks out the connection it
  is given next, and its wait covers both. A request whose connection never accepts it
  (its connect failed) is a wait with outcome ``error``, not a checkout — as for
  SQLAlchemy and aiohttp, whose connects are part of the checkout.
* ``PoolByteStream.close`` / ``aclose`` — the response is closed: end of use.
* ``HTTPConnection._connect`` (and async) — connect time: TCP, then TLS for ``https``
  (with ``retries``, the failed attempts and their back-off are part of it). Through a
  forwarding proxy it is the connect to the proxy (TCP, and TLS to an ``https`` proxy).
  Through a tunnelling (``CONNECT``) proxy it is the whole tunnel: the connect to the
  proxy, the ``CONNECT`` exchange and the TLS handshake with the origin — its start is
  kept on the application's request and the connect is counted once the tunnel's
  HTTP/1.1 or HTTP/2 connection is born (``ok``), or when the request fails before that
  (``error``: the proxy refused, TLS with the origin failed). All of it happens once per
  connection, never per request. SOCKS proxies' connects are not timed.
* ``HTTP11Connection.__init__`` / ``HTTP2Connection.__init__`` (and async) — a connection
  is born: the mark its close is counted by, with the ledger found from the request; for
  a tunnel, the end of its connect.
* ``HTTP11Connection.close`` / ``HTTP2Connection.close`` (and ``aclose``) — every close,
  counted once (the mark is cleared), the reason told by who closed it:

  - the pool dropping an idle connection it found expired: ``idle_expired`` once
    ``keepalive_expiry`` passed, ``stale`` when the server had closed it (found on reuse);
  - the pool dropping an idle connection past ``max_keepalive_connections``, or to make
    room under ``max_connections`` for another origin: ``pool_full``;
  - the connection itself after a response it cannot be reused for (``Connection:
    close``, an HTTP/2 ``GOAWAY``): ``invalidated``;
  - a request failing on it (read timeout, protocol error, an exception while its
    response was being closed): ``error``;
  - the pool or client closed: ``disposed``.

  Connections open before a pool was tracked are counted when they close, without a
  lifetime (their birth was not seen).

Marks are plain attributes with class-level defaults (``_poolwatch_ledger`` on pools and
requests, ``_poolwatch_connection`` on HTTP/1.1 and HTTP/2 connections), never written
through ``__dict__``, which would make every later attribute read on the object slower
(docs/architecture.md gives the measurement).
"""

from __future__ import annotations

import contextlib
import sys
import time
import weakref
from collections.abc import Callable, Hashable
from time import perf_counter
from types import FrameType
from typing import Any

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, capture_stack
from poolwatch._models import HostLevels, Levels, Misconfiguration
from poolwatch._naming import creation_site, target_name
from poolwatch.adapters._base import Adapter, HookFactory, Tracker, heap_objects
from poolwatch.adapters._patching import CALLER

_LEDGER = "_poolwatch_ledger"
"""On pools: the pool's ledger (``_UNTRACKED`` if tracking failed). On requests: the ledger
of the pool serving it."""
_MARK = "_poolwatch_connection"
"""On HTTP/1.1 and HTTP/2 connections: (ledger, birth) until the close is counted."""
_OUT = "_poolwatch_out"
"""On a request: the ``perf_counter()`` time it was given its connection, until its response
is closed (the class default is None). Kept on the request rather than in
``Ledger.active``, as for aiohttp (docs/architecture.md, section 2): at collection,
``checkouts`` reads the pool's requests holding one, keyed by their ``PoolRequest``."""
_WAIT_FAILED = "_poolwatch_wait_failed"
"""On a request whose wait for a connection failed: that failure is counted (set on the
failure path only; read there with a default, so it needs no class default)."""
_WAITED = "_poolwatch_waited"
"""On a request given a connection that has not accepted it yet: how long it waited for one
(None, the class default, once its checkout is counted). See ``_accepted``."""
_TUNNEL = "_poolwatch_tunnel"
"""On a request whose tunnel through a proxy is being set up: when its connect began."""
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNBOUNDED = sys.maxsize
_FRAMES = 8
"""Frames looked through, off the hot path, for who closes or who opens a connection."""


class _Untracked:
    def __repr__(self) -> str:
        return "<untracked>"


_UNTRACKED = _Untracked()


def _origin(scheme: bytes | str, host: bytes | str, port: int | None) -> str:
    scheme = scheme.decode() if isinstance(scheme, bytes) else scheme
    host = host.decode() if isinstance(host, bytes) else host
    return target_name(scheme, host, None if port == _DEFAULT_PORTS.get(scheme) else port)


def pool_name(pool: Any, base: str) -> str:
    """``base`` (an origin, or "httpx"), with the proxy's origin when the pool is a proxy's."""
    proxy = getattr(pool, "_proxy_url", None)
    if proxy is None:
        proxy = getattr(getattr(pool, "_proxy", None), "url", None)
    if proxy is None:
        return base
    return f"{base} via {_origin(proxy.scheme, proxy.host, proxy.port)}"


def _tunnelled_request(frame: FrameType | None) -> Any:
    """The application's request (the one carrying a ledger) up the stack from the connect
    of a tunnel's ``CONNECT`` request; None if not found."""
    depth = 0
    while frame is not None and depth < _FRAMES:
        request = frame.f_locals.get("request")
        if isinstance(getattr(request, _LEDGER, None), Ledger):
            return request
        frame = frame.f_back
        depth += 1
    return None


def _tunnel_done(ledger: Ledger, request: Any, *, ok: bool) -> None:
    """Count the connect of the tunnel set up for ``request``, if one is pending."""
    start = getattr(request, _TUNNEL, None)
    if start is not None:
        setattr(request, _TUNNEL, None)
        ledger.connected(perf_counter() - start, ok=ok)


def _ledger_from_frames(frame: FrameType | None) -> Ledger | None:
    """The ledger of the request (or pool) being served further up the stack.

    Behind a proxy the connection is opened for a request of the proxy connection's own
    (``CONNECT``, or the request rewritten for a forwarding proxy); the application's
    request, which carries the ledger, is a few frames up. Called per connection only.
    """
    depth = 0
    while frame is not None and depth < _FRAMES:
        local = frame.f_locals
        for candidate in (local.get("request"), local.get("self")):
            ledger = getattr(candidate, _LEDGER, None)
            if isinstance(ledger, Ledger):
                return ledger
        frame = frame.f_back
        depth += 1
    return None


class HTTPXAdapter(Adapter):
    """Hooks httpcore 1.x connection pools (httpx 0.2x clients)."""

    name = "httpx"
    kind = "httpx"
    module = "httpx"
    connects_in_checkout = True
    """A checkout is counted when the connection accepts the request (``_accepted``): after
    its connect, which is counted first, as for SQLAlchemy and aiohttp."""
    """Hooked when httpx is imported: it imports httpcore first, so hooking at httpcore's
    import would meet a half-initialised httpx. A pool used through httpcore alone is hooked
    once httpx is imported too (httpcore has no users that do not also install httpx)."""
    family = "http"
    requires = ("httpx >= 0.26.0, < 1", "httpcore >= 1.0.3, < 2")

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._protocols: tuple[type[Any], ...] = ()
        self.pool_timeout: type[BaseException] = TimeoutError
        """httpcore.PoolTimeout once hooked (counted by the wait hook, not as an error)."""
        self._waits_for_ever: weakref.WeakSet[Any] = weakref.WeakSet()
        """Pools of clients made with ``httpx.Timeout(pool=None)``."""

    # -- patching ----------------------------------------------------------------------
    def instrument(self, *, imported_before: bool) -> None:
        import httpcore
        from httpcore._async import connection as aconn
        from httpcore._async import connection_pool as apool
        from httpcore._async import http11 as ah11
        from httpcore._sync import connection as sconn
        from httpcore._sync import connection_pool as spool
        from httpcore._sync import http11 as sh11

        sync_protocols: list[type[Any]] = [sh11.HTTP11Connection]
        async_protocols: list[type[Any]] = [ah11.AsyncHTTP11Connection]
        accept2: list[tuple[type[Any], str, HookFactory]] = []
        try:  # HTTP/2 needs the optional h2 package
            from httpcore._async import http2 as ah2
            from httpcore._sync import http2 as sh2
        except ImportError:
            pass
        else:
            sync_protocols.append(sh2.HTTP2Connection)
            async_protocols.append(ah2.AsyncHTTP2Connection)
            accept2 = [
                (sh2.HTTP2Connection, "_send_request_headers", _accept2_hook),
                (ah2.AsyncHTTP2Connection, "_send_request_headers", _aaccept2_hook),
            ]
        self._protocols = (*sync_protocols, *async_protocols)

        self.pool_timeout = httpcore.PoolTimeout
        for owner in (spool.ConnectionPool, apool.AsyncConnectionPool, httpcore.Request):
            self._patch(owner, _LEDGER, None)
        self._patch(httpcore.Request, _TUNNEL, None)
        self._patch(httpcore.Request, _OUT, None)
        self._patch(httpcore.Request, _WAITED, None)
        for protocol in self._protocols:
            self._patch(protocol, _MARK, None)
        # What is hooked: each sync function and its async twin (both thin shells over the
        # same helpers below). The async module's byte stream is also named PoolByteStream.
        self._hook_all(
            [
                (spool.ConnectionPool, "handle_request", _handle_hook),
                (apool.AsyncConnectionPool, "handle_async_request", _ahandle_hook),
                (spool.PoolRequest, "wait_for_connection", _wait_hook),
                (apool.AsyncPoolRequest, "wait_for_connection", _await_hook),
                (spool.PoolByteStream, "close", _release_hook),
                (apool.PoolByteStream, "aclose", _arelease_hook),
                (sconn.HTTPConnection, "_connect", _connect_hook),
                (aconn.AsyncHTTPConnection, "_connect", _aconnect_hook),
                *((cls, "close", _conn_close_hook) for cls in sync_protocols),
                *((cls, "aclose", _conn_aclose_hook) for cls in async_protocols),
                (sh11.HTTP11Connection, "_send_request_headers", _accept11_hook),
                (ah11.AsyncHTTP11Connection, "_send_request_headers", _aaccept11_hook),
                *accept2,
            ]
        )
        import httpx

        self._wrap_all(
            [
                *((protocol, "__init__", _born_hook) for protocol in self._protocols),
                (httpx.Client, "__init__", _client_init_hook),
                (httpx.AsyncClient, "__init__", _client_init_hook),
            ]
        )
        if imported_before:
            self._find_existing(
                httpx.Client, httpx.AsyncClient, spool.ConnectionPool, apool.AsyncConnectionPool
            )

    def _find_existing(self, *types: type[Any]) -> None:
        """One heap walk: clients first (their pools get the clients' names), then pools
        no client of which was found."""
        clients: list[Any] = []
        pools: list[Any] = []
        client_types, pool_types = types[:2], types[2:]
        for obj in heap_objects(lambda cls: issubclass(cls, (*client_types, *pool_types))):
            if isinstance(obj, client_types):
                clients.append(obj)
            elif isinstance(obj, pool_types):
                pools.append(obj)
        for client in clients:
            try:
                self._track_client(client, None, None)
            except Exception as error:
                self.report("httpx existing client", error)
        for pool in pools:
            if pool not in self._tracked:
                self._discover(pool)

    def _forget_pools(self) -> None:
        for pool in list(self._tracked):
            try:
                for protocol in self._protocols_of(pool):
                    _forget_attribute(protocol, _MARK)
                _forget_attribute(pool, _LEDGER)
            except Exception as error:
                self.report("httpx uninstrument", error)
        self._tracked = weakref.WeakSet()

    # -- tracking ----------------------------------------------------------------------
    def _protocols_of(self, pool: Any) -> list[Any]:
        """The HTTP/1.1 and HTTP/2 connections inside the pool's connections now."""
        found = []
        for connection in list(pool._connections):
            inner = connection
            for _ in range(4):  # proxy connection → HTTPConnection → HTTP11Connection
                if isinstance(inner, self._protocols):
                    found.append(inner)
                    break
                inner = getattr(inner, "_connection", None)
                if inner is None:
                    break
        return found

    def _track_pool(self, pool: Any, base: str, site: str | None, name: str | None) -> Ledger:
        ledger = self.tracker.track(pool, self, target=pool_name(pool, base), site=site, name=name)
        setattr(pool, _LEDGER, ledger)  # an attribute, not __dict__: see the docstring
        self._tracked.add(pool)
        for protocol in self._protocols_of(pool):  # open before it was tracked
            if getattr(protocol, _MARK) is None and not protocol.is_closed():
                setattr(protocol, _MARK, (ledger, None))
        return ledger

    def _track_client(self, client: Any, site: str | None, name: str | None) -> bool:
        base_url = client.base_url
        base = _origin(base_url.scheme, base_url.host, base_url.port) if base_url.host else "httpx"
        found = False
        transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
        timeout = getattr(client, "timeout", None)
        for transport in transports:
            pool = getattr(transport, "_pool", None)
            if pool is not None and hasattr(pool, "_connections"):
                self._track_pool(pool, base, site, name)
                if timeout is not None and timeout.pool is None:
                    self._waits_for_ever.add(pool)
                found = True
        return found

    def _discover(self, pool: Any) -> Any:
        """Track a pool met at its first request (or in the heap): a Ledger, or _UNTRACKED."""
        if self.stopped:  # a hook still running after uninstrument(): track nothing new
            return _UNTRACKED
        try:
            return self._track_pool(pool, "httpcore", None, None)
        except Exception as error:
            self.report("httpx discover", error)
            try:
                setattr(pool, _LEDGER, _UNTRACKED)  # do not try again on every request
                self._tracked.add(pool)
            except Exception as again:
                self.report("httpx discover", again)
            return _UNTRACKED

    def track(self, obj: Any, name: str | None) -> bool:
        try:
            import httpx
            from httpcore import AsyncConnectionPool, ConnectionPool
        except ImportError:
            return False
        if isinstance(obj, (httpx.Client, httpx.AsyncClient)):
            return self._track_client(obj, None, name)
        if isinstance(obj, (httpx.HTTPTransport, httpx.AsyncHTTPTransport)):
            obj = obj._pool
        if isinstance(obj, (ConnectionPool, AsyncConnectionPool)):
            self._track_pool(obj, "httpcore", None, name)
            return True
        return False

    # -- closes ------------------------------------------------------------------------
    def _closing(
        self, connection: Any, mark: tuple[Ledger, float | None], caller: FrameType | None
    ) -> None:
        handling = sys.exc_info()[1] is not None
        ledger, born = mark
        frames: list[FrameType] = []
        frame = caller
        while frame is not None and len(frames) < _FRAMES:
            frames.append(frame)
            frame = frame.f_back
        names = [f.f_code.co_name for f in frames]
        if names[:1] == ["_response_closed"]:
            reason = c.REASON_ERROR if handling else c.REASON_INVALIDATED
        elif "_close_connections" in names:
            after = frames[names.index("_close_connections") + 1 :]
            owner = after[0].f_locals.get("self") if after else None
            if (
                after
                and after[0].f_code.co_name in ("close", "aclose")
                and hasattr(owner, "_connections")
            ):
                reason = c.REASON_DISPOSED  # the pool (its client) was closed
            else:
                reason = _dropped_reason(connection)
        else:
            reason = c.REASON_ERROR if handling else c.REASON_DISPOSED
        ledger.closed_connection(reason, None if born is None else perf_counter() - born)

    # -- levels ------------------------------------------------------------------------
    def levels(self, pool: Any) -> Levels:
        connections = list(pool._connections)  # the event loop or another thread mutates it
        requests = list(pool._requests)
        hosts: dict[tuple[str, int], list[int]] = {}  # server: [used, idle, pending]
        used = idle = opened = 0
        for connection in connections:
            if connection.is_closed():
                continue
            opened += 1
            origin = getattr(connection, "_remote_origin", None) or connection._origin
            key = (origin.host.decode("ascii", "replace"), origin.port)
            counts = hosts.setdefault(key, [0, 0, 0])
            if connection.is_idle():
                idle += 1
                counts[1] += 1
            else:
                used += 1
                counts[0] += 1
        limit = pool._max_connections
        pending = 0
        # A request is queued for an instant between joining the queue and being given a
        # connection; it waits only while the pool is at its limit.
        if opened >= limit:
            for queued in requests:
                if queued.connection is None:
                    pending += 1
                    origin = queued.request.url.origin  # through a proxy: the origin behind it
                    key = (origin.host.decode("ascii", "replace"), origin.port)
                    hosts.setdefault(key, [0, 0, 0])[2] += 1
        keepalive = pool._max_keepalive_connections
        return Levels(
            used=used,
            idle=idle,
            max=None if limit >= _UNBOUNDED else limit,
            pending=pending,
            idle_max=None if keepalive >= _UNBOUNDED else keepalive,
            hosts=tuple(HostLevels(a, p, *counts) for (a, p), counts in sorted(hosts.items())),
        )

    # -- diagnostics -------------------------------------------------------------------
    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        found = []
        if pool._max_connections >= _UNBOUNDED:
            found.append(
                Misconfiguration(c.ANTIPATTERN_UNBOUNDED_POOL, "httpx.Limits(max_connections=None)")
            )
        if pool in self._waits_for_ever:
            found.append(
                Misconfiguration(c.ANTIPATTERN_NO_POOL_TIMEOUT, "httpx.Timeout(pool=None)")
            )
        return tuple(found)

    def oldest_connection(self, pool: Any) -> float | None:
        marks = [getattr(p, _MARK, None) for p in self._protocols_of(pool) if not p.is_closed()]
        born = [mark[1] for mark in marks if mark is not None and mark[1] is not None]
        return perf_counter() - min(born) if born else None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = []
        for protocol in self._protocols_of(pool):
            stream = getattr(protocol, "_network_stream", None)
            sock = stream.get_extra_info("socket") if stream is not None else None
            fd = sock.fileno() if sock is not None else -1
            if fd >= 0:
                found.append(fd)
        return tuple(found)

    def find_abandoned(self, ledger: Ledger, active: dict[Hashable, float]) -> None:
        """Requests whose response was collected without being closed.

        httpcore never takes such a request out of its pool (no finaliser closes the
        response stream), so its connection stays in use for good: the pool's own list of
        requests is then the only reference left besides poolwatch's checkout table. Each
        counts as a leak as soon as two collections in a row see it so.
        """
        orphans = ledger.orphans(1, active)  # 1: the pool's _requests list
        now = perf_counter()
        for key in orphans:
            start = active.pop(key, None)
            pool_request: Any = key
            pool_request.request._poolwatch_out = None  # its use ends: not read out again
            ledger.collected(key, now - start if start is not None else 0.0)

    def checkouts(self, pools: list[Any]) -> dict[Hashable, float]:
        # One C call per pool: other threads and event loops change _requests meanwhile.
        # Queued requests have no connection yet, and read None.
        out: dict[Hashable, float] = {}
        for pool in pools:
            for pool_request in list(pool._requests):
                start = getattr(pool_request.request, _OUT, None)
                if start is not None:
                    out[pool_request] = start
        return out


def _forget_attribute(obj: Any, attribute: str) -> None:
    """Remove a mark (``vars()`` is not read: it would materialise the instance dict)."""
    with contextlib.suppress(AttributeError):
        delattr(obj, attribute)


def _dropped_reason(connection: Any) -> str:
    """Why the pool dropped an idle connection (read on the close path, not a gauge's)."""
    expire_at = getattr(connection, "_expire_at", None)
    if expire_at is not None and time.monotonic() > expire_at:
        return c.REASON_IDLE_EXPIRED
    stream = getattr(connection, "_network_stream", None)
    try:
        readable = stream is not None and stream.get_extra_info("is_readable")
    except Exception:
        readable = False
    if readable:
        return c.REASON_STALE  # idle yet readable: the server closed it
    return c.REASON_POOL_FULL  # surplus idle (max_keepalive), or closed to make room


# -- hooks ---------------------------------------------------------------------------------
# Each factory returns the replacement for one httpcore function, taking exactly its
# parameters (adapters/_patching.py checks them). The request path (handle_request,
# wait_for_connection, PoolByteStream.close) is the hot path: no OpenTelemetry, no lock, no
# logging; only the Ledger contract of _ledger.py, inlined, the checkout time kept on the
# request (_OUT), and the request's ledger. Every statement of poolwatch's own is guarded
# and the library's function is called exactly once, outside the guards: a hook still
# running when uninstrument() removes the class defaults it reads (a request waiting for a
# connection) loses that reading only.


def _failed(adapter: HTTPXAdapter, ledger: Ledger, request: Any, start: float) -> None:
    """A request failed inside the pool (not on the hot path)."""
    try:
        _tunnel_done(ledger, request, ok=False)  # its tunnel failed after the TCP connect
        begun = request._poolwatch_out
        if begun is not None:
            request._poolwatch_out = None
            for key in [k for k in list(ledger.stacks) if getattr(k, "request", None) is request]:
                ledger.stacks.pop(key, None)
        if begun is not None and request._poolwatch_waited is None:
            # Its connection accepted it (a checkout, counted): its use ends here.
            ledger.uses.append(perf_counter() - begun)
        elif not getattr(request, _WAIT_FAILED, False):
            # It never had a connection that accepted it: it failed before it could wait
            # (the pool closing an expired connection, an unsupported scheme), or after it
            # was given one that could not take it (its connect failed). Failures while it
            # waited were counted by the wait hook (_wait_failed).
            request._poolwatch_waited = None
            ledger.failed(start, perf_counter(), timeout=False)
    except Exception as error:
        adapter.report("httpx request", error)


def _ledger_of(adapter: HTTPXAdapter, pool: Any) -> Any:
    """The pool's ledger, tracking the pool if new; ``_UNTRACKED`` if it cannot be had."""
    try:
        ledger = pool._poolwatch_ledger
        if ledger is None:
            ledger = adapter._discover(pool)
        return ledger
    except AttributeError:  # uninstrument() took the class default meanwhile
        return _UNTRACKED


def _handle_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def handle_request(self: Any, request: Any) -> Any:
        ledger = _ledger_of(adapter, self)
        if ledger is _UNTRACKED:
            return original(self, request)
        request._poolwatch_ledger = ledger  # an attribute of its own: cannot fail
        start = perf_counter()
        try:
            return original(self, request)
        except BaseException:
            _failed(adapter, ledger, request, start)
            raise

    return handle_request


def _ahandle_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def handle_async_request(self: Any, request: Any) -> Any:
        ledger = _ledger_of(adapter, self)
        if ledger is _UNTRACKED:
            return await original(self, request)
        request._poolwatch_ledger = ledger
        start = perf_counter()
        try:
            return await original(self, request)
        except BaseException:
            _failed(adapter, ledger, request, start)
            raise

    return handle_async_request


def _wait_failed(adapter: HTTPXAdapter, pool_request: Any, start: float, exc: Any) -> None:
    """The wait for a connection failed: ``PoolTimeout`` (outcome ``timeout``), or anything
    else — a cancelled waiter, an interrupt (outcome ``error``)."""
    end = perf_counter()
    try:
        request = pool_request.request
        ledger = request._poolwatch_ledger
        if ledger is not None:
            # A request waiting again (the connection it was given could not take it) waited
            # for that one too.
            start -= request._poolwatch_waited or 0.0
            ledger.failed(start, end, timeout=isinstance(exc, adapter.pool_timeout))
            setattr(request, _WAIT_FAILED, True)  # counted: not again by _failed
    except Exception as error:
        adapter.report("httpx wait", error)


def _acquired(adapter: HTTPXAdapter, pool_request: Any, waited: float, now: float) -> None:
    """``pool_request`` was given its connection at ``now`` after waiting ``waited``: it is
    out from now on, and its checkout is counted when that connection accepts it."""
    try:
        request = pool_request.request
        if request._poolwatch_ledger is None:
            return
        if request._poolwatch_out is None:
            request._poolwatch_out = now
            request._poolwatch_waited = waited
            ledger = request._poolwatch_ledger
            if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                ledger.stacks[pool_request] = capture_stack(sys._getframe(2))
        else:  # given another after the first turned out unavailable: it waited for both,
            # and holds the one it is given now (its use, and its wait span, end here)
            request._poolwatch_out = now
            request._poolwatch_waited = (request._poolwatch_waited or 0.0) + waited
    except Exception as error:  # AttributeError: uninstrument() ran meanwhile
        adapter.report("httpx wait", error)


def _accepted(adapter: HTTPXAdapter, request: Any) -> None:
    """A connection accepts ``request`` (it sends its headers): the checkout is counted now.

    Not when the pool gives the request its connection: httpcore may give two queued
    requests the same idle connection, or take an HTTP/1.1 connection for HTTP/2, and the
    request that finds it unavailable (``ConnectionNotAvailable``) waits again — often, under
    contention. Counted at the pool's hand-over, such a request made a checkout it never
    had, and one that could not be taken back once exported. Here, past that check, a
    checkout is one the request really had. (Through a forwarding proxy the connection sends
    a rewritten request: that checkout is counted when its response is closed.)
    """
    try:
        waited = request._poolwatch_waited
        if waited is not None:
            request._poolwatch_waited = None
            # Ledger.acquired, inlined (the hot-path contract in _ledger.py): the request was
            # marked out (_OUT) when it was given its connection.
            ledger = request._poolwatch_ledger
            ledger.waits.append(waited)
            if waited > ledger.span_threshold:  # a wait that waited: a span
                given = request._poolwatch_out
                ledger.slow_wait(given - waited, given, c.OUTCOME_ACQUIRED)
    except Exception as error:  # AttributeError: uninstrument() ran meanwhile
        adapter.report("httpx accept", error)


def _accept11_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def _send_request_headers(self: Any, request: Any) -> None:
        _accepted(adapter, request)
        original(self, request)

    return _send_request_headers


def _aaccept11_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def _send_request_headers(self: Any, request: Any) -> None:
        _accepted(adapter, request)
        await original(self, request)

    return _send_request_headers


def _accept2_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def _send_request_headers(self: Any, request: Any, stream_id: int) -> None:
        _accepted(adapter, request)
        original(self, request, stream_id)

    return _send_request_headers


def _aaccept2_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def _send_request_headers(self: Any, request: Any, stream_id: int) -> None:
        _accepted(adapter, request)
        await original(self, request, stream_id)

    return _send_request_headers


def _wait_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def wait_for_connection(self: Any, timeout: float | None = None) -> Any:
        if self.connection is None:  # not given a connection yet: it may have to wait
            start = perf_counter()
            try:
                connection = original(self, timeout)
            except BaseException as exc:
                _wait_failed(adapter, self, start, exc)
                raise
            now = perf_counter()
            _acquired(adapter, self, now - start, now)
        else:  # given one before it asked (the pool had one free): it waits for none
            connection = original(self, timeout)
            _acquired(adapter, self, 0.0, perf_counter())
        return connection

    return wait_for_connection


def _await_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def wait_for_connection(self: Any, timeout: float | None = None) -> Any:
        if self.connection is None:
            start = perf_counter()
            try:
                connection = await original(self, timeout)
            except BaseException as exc:
                _wait_failed(adapter, self, start, exc)
                raise
            now = perf_counter()
            _acquired(adapter, self, now - start, now)
        else:
            connection = await original(self, timeout)
            _acquired(adapter, self, 0.0, perf_counter())
        return connection

    return wait_for_connection


def _released(adapter: HTTPXAdapter, stream: Any) -> None:
    """The response stream ``stream`` is being closed: the use of its connection ends."""
    try:
        if stream._closed:
            return
        pool_request = stream._pool_request
        request = pool_request.request
        ledger = request._poolwatch_ledger
        if ledger is None:
            return
        start = request._poolwatch_out
        if start is not None:
            request._poolwatch_out = None
            waited = request._poolwatch_waited
            if waited is not None:  # accepted on a rewritten request (forwarding proxy)
                request._poolwatch_waited = None
                ledger.waits.append(waited)
            held = perf_counter() - start
            ledger.uses.append(held)
            if held > ledger.leak_threshold:
                ledger.settle(pool_request, held)
            elif ledger.stacks:
                ledger.stacks.pop(pool_request, None)
    except Exception as error:  # AttributeError: uninstrument() ran meanwhile
        adapter.report("httpx release", error)


def _release_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def close(self: Any) -> None:
        _released(adapter, self)
        original(self)

    return close


def _arelease_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def aclose(self: Any) -> None:
        _released(adapter, self)
        await original(self)

    return aclose


def _connected(
    adapter: HTTPXAdapter, request: Any, caller: FrameType | None, start: float, ok: bool
) -> None:
    try:
        ledger = getattr(request, _LEDGER, None)
        if not isinstance(ledger, Ledger):  # a proxy connection's own request
            if ok and request.method == b"CONNECT":
                # A tunnel: counted once it is up, CONNECT exchange and origin TLS included
                # (_born_hook), or when the request fails before that (_failed).
                tunnelled = _tunnelled_request(caller)
                if tunnelled is not None:
                    setattr(tunnelled, _TUNNEL, start)
                    return
            ledger = _ledger_from_frames(caller)
        if ledger is not None:
            ledger.connected(perf_counter() - start, ok=ok)
    except Exception as error:
        adapter.report("httpx connect", error)


def _connect_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def _connect(self: Any, request: Any) -> Any:
        start = perf_counter()
        try:
            stream = original(self, request)
        except BaseException:
            _connected(adapter, request, sys._getframe(1), start, False)
            raise
        _connected(adapter, request, sys._getframe(1), start, True)
        return stream

    return _connect


def _aconnect_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def _connect(self: Any, request: Any) -> Any:
        start = perf_counter()
        try:
            stream = await original(self, request)
        except BaseException:
            _connected(adapter, request, sys._getframe(1), start, False)
            raise
        _connected(adapter, request, sys._getframe(1), start, True)
        return stream

    return _connect


def _born_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            caller = sys._getframe(CALLER)
            ledger = _ledger_from_frames(caller)
            if ledger is not None:
                setattr(self, _MARK, (ledger, perf_counter()))
                # Born in a tunnel's handle_request: the tunnel is up, its connect ends.
                _tunnel_done(ledger, caller.f_locals.get("request"), ok=True)
        except Exception as error:
            adapter.report("httpx connection", error)

    return __init__


def _connection_closing(adapter: HTTPXAdapter, connection: Any, caller: FrameType) -> None:
    """An HTTP/1.1 or HTTP/2 connection is being closed by the function running ``caller``."""
    try:
        mark = connection._poolwatch_connection
        if mark is not None:
            connection._poolwatch_connection = None  # counted once, whoever closes it again
            adapter._closing(connection, mark, caller)
    except Exception as error:  # AttributeError: uninstrument() ran meanwhile
        adapter.report("httpx close", error)


def _conn_close_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def close(self: Any) -> None:
        _connection_closing(adapter, self, sys._getframe(1))
        original(self)

    return close


def _conn_aclose_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def aclose(self: Any) -> None:
        _connection_closing(adapter, self, sys._getframe(1))
        await original(self)

    return aclose


def _client_init_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            adapter._track_client(self, creation_site(sys._getframe(CALLER)), None)
        except Exception as error:
            adapter.report("httpx client", error)

    return __init__
