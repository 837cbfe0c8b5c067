"""httpx pools: every httpcore ``ConnectionPool`` and ``AsyncConnectionPool`` (proxy pools
included), made by an ``httpx.Client`` / ``AsyncClient`` or used directly.

A pool spans servers: ``max_connections`` in all, over every origin it talks to. Levels
are read from the pool at collection: used — connections serving requests (an HTTP/2
connection serving several streams is one connection: poolwatch counts connections, as
the pool's limit does), idle — open idle connections, both per server
(``Levels.hosts``); max — ``max_connections`` (absent when None); ``idle_max`` —
``max_keepalive_connections``; pending — requests queued for a connection. The pool's
lists are copied before they are read, and no method that makes a system call
(``has_expired``) is ever called from a reading.

Names: a client with ``base_url`` names its pools by that origin; any other is ``httpx``
(``httpcore`` for a pool used without httpx), and the registry adds the creation site when a
second place creates one. A proxy pool adds ``via`` and the proxy's origin, never its
credentials.

Where it hooks, and why there:

* ``Client.__init__`` / ``AsyncClient.__init__`` — the client's pools, named, with the
  creation site; a pool not known by its first request (made without httpx, or before
  ``instrument()``) is tracked then.
* the pool's ``handle_request`` / ``handle_async_request`` — marks the request with the
  pool's ledger (the request object travels to the connection that serves it); an
  exception there ends the request's use; ``PoolTimeout`` from the queue is the timeout.
* ``PoolRequest.wait_for_connection`` (and the async one) — the queue wait alone; from
  its return the request holds the connection: ``wait.duration`` and the checkout.
* ``PoolByteStream.close`` / ``aclose`` — the response is done: end of use.
* ``HTTPConnection._connect`` (and async) — connect time: TCP and TLS (and retries).
* ``HTTP11Connection.close`` / ``HTTP2Connection.close`` (and async) — every close of a
  connection, its reason told by who closed it: the pool dropping an idle connection
  (``idle_expired`` once ``keepalive_expiry`` passed; ``stale`` when the server had closed
  it; ``pool_full`` for an idle connection past ``max_keepalive_connections``, or closed
  to make room), the connection itself after a response it cannot reuse
  (``invalidated``: ``Connection: close``), a request failing on it (``error``), the pool
  or client closed (``disposed``).
"""

from __future__ import annotations

import gc
import sys
import time
import weakref
from collections.abc import Callable
from time import perf_counter
from types import FrameType
from typing import Any

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, capture_stack
from poolwatch._naming import creation_site, target_name
from poolwatch.adapters._base import Adapter, HostLevels, Levels, Tracker

_LEDGER = "_poolwatch_ledger"
_MARK = "_poolwatch_connection"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNBOUNDED = sys.maxsize


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


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


class HTTPXAdapter(Adapter):
    """Hooks httpcore 1.x connection pools (httpx 0.2x clients)."""

    name = "httpx"
    kind = "httpx"
    module = "httpx"
    """Hooked when httpx is imported: it imports httpcore first, so hooking at httpcore's
    import would meet a half-initialised httpx. A pool used through httpcore alone is hooked
    once httpx is imported too."""
    family = "http"

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._patches: list[tuple[Any, str, Any]] = []
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- patching ----------------------------------------------------------------------
    def _patch(self, owner: Any, attribute: str, replacement: Any) -> None:
        self._patches.append((owner, attribute, owner.__dict__.get(attribute, _ABSENT)))
        setattr(owner, attribute, replacement)

    def instrument(self, *, imported_before: bool) -> None:
        import httpcore
        from httpcore._async import connection as aconn
        from httpcore._async import connection_pool as apool
        from httpcore._async import http11 as ah11
        from httpcore._sync import connection as sconn
        from httpcore._sync import connection_pool as spool
        from httpcore._sync import http11 as sh11

        sync_connections: list[Any] = [sh11.HTTP11Connection]
        async_connections: list[Any] = [ah11.AsyncHTTP11Connection]
        try:  # HTTP/2 needs the optional h2 package
            from httpcore._async import http2 as ah2
            from httpcore._sync import http2 as sh2
        except ImportError:
            pass
        else:
            sync_connections.append(sh2.HTTP2Connection)
            async_connections.append(ah2.AsyncHTTP2Connection)

        timeout = httpcore.PoolTimeout
        for pool_cls in (spool.ConnectionPool, apool.AsyncConnectionPool):
            self._patch(pool_cls, _LEDGER, None)
        self._patch(
            spool.ConnectionPool,
            "handle_request",
            _handle_hook(self, spool.ConnectionPool.handle_request, timeout),
        )
        self._patch(
            apool.AsyncConnectionPool,
            "handle_async_request",
            _ahandle_hook(self, apool.AsyncConnectionPool.handle_async_request, timeout),
        )
        self._patch(spool.PoolRequest, "wait_for_connection", _wait_hook(spool.PoolRequest))
        self._patch(
            apool.AsyncPoolRequest, "wait_for_connection", _await_hook(apool.AsyncPoolRequest)
        )
        self._patch(spool.PoolByteStream, "close", _close_stream_hook(self, spool.PoolByteStream))
        # the async module's byte stream is also named PoolByteStream
        self._patch(apool.PoolByteStream, "aclose", _aclose_stream_hook(self, apool.PoolByteStream))
        self._patch(sconn.HTTPConnection, "_connect", _connect_hook(self, sconn.HTTPConnection))
        self._patch(
            aconn.AsyncHTTPConnection, "_connect", _aconnect_hook(self, aconn.AsyncHTTPConnection)
        )
        for sync_cls in sync_connections:
            self._patch(sync_cls, "close", _conn_close_hook(self, sync_cls.__dict__["close"]))
        for async_cls in async_connections:
            self._patch(async_cls, "aclose", _conn_aclose_hook(self, async_cls.__dict__["aclose"]))
        import httpx

        for client_cls in (httpx.Client, httpx.AsyncClient):
            self._patch(client_cls, "__init__", _client_init_hook(self, client_cls.__init__))
        if imported_before:
            for obj in gc.get_objects():
                if type(obj) in (httpx.Client, httpx.AsyncClient):
                    try:
                        self._track_client(obj, None, None)
                    except Exception as error:
                        self.tracker.report("httpx existing client", error)

    def uninstrument(self) -> None:
        for pool in list(self._tracked):
            pool.__dict__.pop(_LEDGER, None)
        for owner, attribute, original in reversed(self._patches):
            if original is _ABSENT:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self._patches.clear()

    # -- tracking ----------------------------------------------------------------------
    def _track_pool(self, pool: Any, base: str, site: str | None, name: str | None) -> Ledger:
        ledger = self.tracker.track(pool, self, target=pool_name(pool, base), site=site, name=name)
        pool.__dict__[_LEDGER] = ledger
        self._tracked.add(pool)
        return ledger

    def _track_client(self, client: Any, site: str | None, name: str | None) -> bool:
        base_url = client.base_url
        base = _origin(base_url.scheme, base_url.host, base_url.port) if base_url.host else "httpx"
        found = False
        transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
        for transport in transports:
            pool = getattr(transport, "_pool", None)
            if pool is not None and hasattr(pool, "_connections"):
                self._track_pool(pool, base, site, name)
                found = True
        return found

    def _discover(self, pool: Any) -> Ledger | None:
        try:
            return self._track_pool(pool, "httpcore", None, None)
        except Exception as error:
            self.tracker.report("httpx discover", error)
            return None

    def track(self, obj: Any, name: str | None) -> bool:
        try:
            import httpx
            from httpcore import AsyncConnectionPool, ConnectionPool
        except ImportError:
            return False
        if isinstance(obj, (httpx.Client, httpx.AsyncClient)):
            return self._track_client(obj, None, name)
        if isinstance(obj, (ConnectionPool, AsyncConnectionPool)):
            self._track_pool(obj, "httpcore", None, name)
            return True
        return False

    # -- closes ------------------------------------------------------------------------
    def _closing(self, connection: Any, caller: FrameType | None, handling: bool) -> None:
        stream = getattr(connection, "_network_stream", None)
        mark = stream.__dict__.pop(_MARK, None) if stream is not None else None
        if mark is None:
            return  # not opened under poolwatch, or already counted
        ledger, born = mark
        frames: list[FrameType] = []
        frame = caller
        while frame is not None and len(frames) < 4:
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
        ledger.closed_connection(reason, perf_counter() - born)

    # -- levels ------------------------------------------------------------------------
    def levels(self, pool: Any) -> Levels:
        connections = list(pool._connections)  # the event loop or another thread mutates it
        requests = list(pool._requests)
        hosts: dict[tuple[str, int], list[int]] = {}
        used = idle = 0
        for connection in connections:
            if connection.is_closed():
                continue
            origin = getattr(connection, "_remote_origin", None) or connection._origin
            key = (origin.host.decode("ascii", "replace"), origin.port)
            counts = hosts.setdefault(key, [0, 0])
            if connection.is_idle():
                idle += 1
                counts[1] += 1
            else:
                used += 1
                counts[0] += 1
        limit = pool._max_connections
        # A request is queued for an instant between joining the queue and being given a
        # connection; it waits only while the pool is at its limit.
        opened = sum(1 for connection in connections if not connection.is_closed())
        queued = sum(1 for r in requests if r.connection is None)
        pending = queued if opened >= limit else 0
        keepalive = pool._max_keepalive_connections
        return Levels(
            used=used,
            idle=idle,
            max=None if limit >= _UNBOUNDED else limit,
            pending=pending,
            idle_max=None if keepalive >= _UNBOUNDED else keepalive,
            hosts=tuple(HostLevels(a, p, u, i) for (a, p), (u, i) in sorted(hosts.items())),
        )


def _dropped_reason(connection: Any) -> str:
    """Why the pool dropped an idle connection (its state is read off the hot path)."""
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
# The request path (handle_request, wait_for_connection, PoolByteStream.close) is the hot
# path: no OpenTelemetry, no lock, only the Ledger contract of _ledger.py, inlined.


def _mark_request(adapter: HTTPXAdapter, pool: Any, request: Any) -> Ledger | None:
    ledger: Ledger | None = pool._poolwatch_ledger
    if ledger is None:
        ledger = adapter._discover(pool)
    if ledger is not None:
        request.__dict__[_LEDGER] = ledger
    return ledger


def _failed(
    adapter: HTTPXAdapter, ledger: Ledger, request: Any, start: float, timeout: bool
) -> None:
    try:
        queued = [key for key in list(ledger.active) if getattr(key, "request", None) is request]
        if queued:  # it had its connection: the use ends here, the wait was counted
            for key in queued:
                begun = ledger.active.pop(key, None)
                ledger.stacks.pop(key, None)
                if begun is not None:
                    ledger.uses.append(perf_counter() - begun)
        else:
            ledger.failed(start, perf_counter(), timeout=timeout)
    except Exception as error:
        adapter.tracker.report("httpx request", error)


def _handle_hook(
    adapter: HTTPXAdapter, original: Callable[..., Any], timeout: type[BaseException]
) -> Callable[..., Any]:
    def handle_request(self: Any, request: Any) -> Any:
        ledger = _mark_request(adapter, self, request)
        if ledger is None:
            return original(self, request)
        start = perf_counter()
        try:
            return original(self, request)
        except timeout:
            _failed(adapter, ledger, request, start, True)
            raise
        except BaseException:
            _failed(adapter, ledger, request, start, False)
            raise

    return handle_request


def _ahandle_hook(
    adapter: HTTPXAdapter, original: Callable[..., Any], timeout: type[BaseException]
) -> Callable[..., Any]:
    async def handle_async_request(self: Any, request: Any) -> Any:
        ledger = _mark_request(adapter, self, request)
        if ledger is None:
            return await original(self, request)
        start = perf_counter()
        try:
            return await original(self, request)
        except timeout:
            _failed(adapter, ledger, request, start, True)
            raise
        except BaseException:
            _failed(adapter, ledger, request, start, False)
            raise

    return handle_async_request


def _acquired(pool_request: Any, start: float) -> None:
    ledger: Ledger | None = pool_request.request.__dict__.get(_LEDGER)
    # A request whose connection became unavailable waits again: still one checkout.
    if ledger is not None and pool_request not in ledger.active:
        now = perf_counter()
        ledger.waits.append(now - start)
        ledger.active[pool_request] = now
        if ledger.capture:
            ledger.stacks[pool_request] = capture_stack(sys._getframe(2))


def _wait_hook(cls: Any) -> Callable[..., Any]:
    original = cls.wait_for_connection

    def wait_for_connection(self: Any, timeout: float | None = None) -> Any:
        start = perf_counter()
        connection = original(self, timeout)
        _acquired(self, start)
        return connection

    return wait_for_connection


def _await_hook(cls: Any) -> Callable[..., Any]:
    original = cls.wait_for_connection

    async def wait_for_connection(self: Any, timeout: float | None = None) -> Any:
        start = perf_counter()
        connection = await original(self, timeout)
        _acquired(self, start)
        return connection

    return wait_for_connection


def _released(adapter: HTTPXAdapter, stream: Any) -> None:
    pool_request = stream._pool_request
    ledger: Ledger | None = pool_request.request.__dict__.get(_LEDGER)
    if ledger is None:
        return
    start = ledger.active.pop(pool_request, None)
    if start is not None:
        held = perf_counter() - start
        ledger.uses.append(held)
        if held > ledger.leak_threshold:
            try:
                ledger.settle(pool_request, held)
            except Exception as error:
                adapter.tracker.report("httpx release", error)
        elif ledger.stacks:
            ledger.stacks.pop(pool_request, None)


def _close_stream_hook(adapter: HTTPXAdapter, cls: Any) -> Callable[..., Any]:
    original = cls.close

    def close(self: Any) -> None:
        if not self._closed:
            _released(adapter, self)
        original(self)

    return close


def _aclose_stream_hook(adapter: HTTPXAdapter, cls: Any) -> Callable[..., Any]:
    original = cls.aclose

    async def aclose(self: Any) -> None:
        if not self._closed:
            _released(adapter, self)
        await original(self)

    return aclose


def _connected(adapter: HTTPXAdapter, request: Any, start: float, stream: Any) -> None:
    try:
        ledger: Ledger | None = request.__dict__.get(_LEDGER)
        if ledger is None:
            return
        now = perf_counter()
        ledger.connected(now - start, ok=stream is not None)
        if stream is not None:
            stream.__dict__[_MARK] = (ledger, now)
    except Exception as error:
        adapter.tracker.report("httpx connect", error)


def _connect_hook(adapter: HTTPXAdapter, cls: Any) -> Callable[..., Any]:
    original = cls._connect

    def _connect(self: Any, request: Any) -> Any:
        start = perf_counter()
        try:
            stream = original(self, request)
        except BaseException:
            _connected(adapter, request, start, None)
            raise
        _connected(adapter, request, start, stream)
        return stream

    return _connect


def _aconnect_hook(adapter: HTTPXAdapter, cls: Any) -> Callable[..., Any]:
    original = cls._connect

    async def _connect(self: Any, request: Any) -> Any:
        start = perf_counter()
        try:
            stream = await original(self, request)
        except BaseException:
            _connected(adapter, request, start, None)
            raise
        _connected(adapter, request, start, stream)
        return stream

    return _connect


def _conn_close_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def close(self: Any) -> None:
        try:
            adapter._closing(self, sys._getframe(1), sys.exc_info()[1] is not None)
        except Exception as error:
            adapter.tracker.report("httpx close", error)
        original(self)

    return close


def _conn_aclose_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    async def aclose(self: Any) -> None:
        try:
            adapter._closing(self, sys._getframe(1), sys.exc_info()[1] is not None)
        except Exception as error:
            adapter.tracker.report("httpx close", error)
        await original(self)

    return aclose


def _client_init_hook(adapter: HTTPXAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            adapter._track_client(self, creation_site(sys._getframe(1)), None)
        except Exception as error:
            adapter.tracker.report("httpx client", error)

    return __init__
