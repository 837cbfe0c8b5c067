"""urllib3 pools, and through them requests and botocore/boto3.

Every ``HTTPConnectionPool`` (and ``HTTPSConnectionPool``) is one pool of one server,
whoever made it: the application directly, a ``PoolManager`` or ``ProxyManager``, a
requests ``HTTPAdapter`` (``pool.kind`` = ``requests``) or a botocore ``URLLib3Session``
(``pool.kind`` = ``botocore``, named by service and endpoint, e.g.
``dynamodb https://dynamodb.eu-west-1.amazonaws.com``).

Where it hooks, and why there:

* ``PoolManager.__init__`` — who made the manager (requests, botocore and which service,
  or the application) and where in user code: a ``requests.get()`` creates a Session, so a
  manager, per call; its pools all land in the series of that call site, as many
  short-lived pool instances. ``PoolManager._new_pool`` hands this to the pool it creates.
* ``HTTPConnectionPool.__init__`` — a new pool: its server, its maker, its series.
* ``HTTPConnectionPool._get_conn`` — the caller's whole wait for a connection (queue wait
  when ``block=True``, and the stale check); ``EmptyPoolError`` is the pool's timeout.
* ``HTTPConnectionPool._put_conn`` — end of use.
* ``HTTPConnectionPool._new_conn`` — marks the connection with its pool's ledger.
* ``HTTPConnection.connect`` / ``HTTPSConnection.connect`` — the real connect (TCP, proxy
  tunnel, TLS); connection objects are reused after a close, so each connect starts a
  new lifetime.
* ``HTTPConnection.close`` — every close of an open connection, its reason told by who
  closed it:

  ============================  =============================================================
  closed by                      reason
  ============================  =============================================================
  ``_get_conn``                  ``stale``: the server dropped the idle keep-alive connection
  ``_put_conn``, pool open       ``pool_full``: urllib3 logs "Connection pool is full,
                                 discarding connection" (``block=False`` overflow)
  ``_put_conn``, pool closed     ``disposed``
  ``urlopen``                    ``error``: the request failed; the connection is thrown away
                                 and never returned, so its use ends here
  ``getresponse``                ``invalidated``: the server ended the connection
                                 (``Connection: close``, HTTP/1.0); ``error`` if it failed
  pool ``close()``, collection   ``disposed`` (``PoolManager.clear()``, a pool evicted from
                                 a manager and garbage-collected, a closed botocore client)
  anything else                  ``invalidated`` (``error`` while an exception is handled)
  ============================  =============================================================

Levels, read at collection: used — connections checked out of this pool, including
those beyond ``maxsize`` that a ``block=False`` pool opens and later discards; idle —
connected sockets in the queue (not its ``None`` placeholders); max — ``maxsize``;
pending — threads blocked on the queue (``block=True``). A pool a ``PoolManager`` evicts
from its LRU is no longer the manager's, but while a response still holds one of its
connections the pool is alive, so that connection stays visible until it is closed.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping
from time import perf_counter
from types import CodeType, FrameType
from typing import Any, NamedTuple

from poolwatch import _catalogue as c
from poolwatch._ledger import UNKNOWN_LIFETIME, Ledger, capture_stack
from poolwatch._models import Levels, Misconfiguration
from poolwatch._naming import creation_site, target_name
from poolwatch.adapters._base import Adapter, Tracker, heap_objects, pop_attribute
from poolwatch.adapters._patching import CALLER

_LEDGER = "_poolwatch_ledger"
_MARK = "_poolwatch"
_CONTEXT = "_poolwatch_context"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FRAMES_SEARCHED = 40
_CLOSE_CODES_KEPT = 64


class _Maker(NamedTuple):
    """Who made a PoolManager, and where in user code."""

    kind: str
    site: str | None
    service: str | None = None
    name: str | None = None


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


class _Mark:
    """poolwatch's state on one connection of a tracked pool, kept in one attribute.

    One, because CPython (3.11 and later) keeps an instance's attributes in a compact
    array shared by its class only while the class's instances have few enough of them:
    botocore's connections have 27, and four more marks made every attribute read of
    every connection — urllib3's and http.client's own, on every request — a dict lookup
    (about 20,000 instructions per boto3 request against a server answering
    ``Connection: close``, counted with valgrind).
    """

    __slots__ = ("born", "ended", "ledger", "owner")

    def __init__(self, ledger: Ledger, owner: int) -> None:
        self.ledger: Ledger | None = ledger
        """None once poolwatch closed the connection itself (its close is not counted)."""
        self.owner = owner
        """``id()`` of its pool: a series (and its ledger) can hold several pools."""
        self.born: float | None = None
        """``perf_counter()`` of the connect that opened it; None while not connected."""
        self.ended: float | _Absent | None = _ABSENT
        """Its lifetime, once the server ended it and the pool has yet to let go of it."""


def _owner(conn: Any) -> int | None:
    mark: _Mark | None = getattr(conn, _MARK, None)
    return mark.owner if mark is not None else None


def _botocore_service(frame: FrameType) -> str | None:
    """The AWS service a botocore frame works for (``create_endpoint`` or ``Endpoint``)."""
    local = frame.f_locals
    model = local.get("service_model")
    prefix = getattr(model, "endpoint_prefix", None)
    if isinstance(prefix, str):
        return prefix
    prefix = getattr(local.get("self"), "_endpoint_prefix", None)
    return prefix if isinstance(prefix, str) else None


def _maker_of(frame: FrameType | None) -> _Maker:
    """Find, in the stack that creates a PoolManager, the library that asked for it."""
    site = creation_site(frame)
    f, depth = frame, 0
    while f is not None and depth < _FRAMES_SEARCHED:
        module = f.f_globals.get("__name__", "")
        if module.startswith("requests."):
            return _Maker("requests", site)
        if module.startswith("botocore."):
            while f is not None and depth < _FRAMES_SEARCHED:
                service = _botocore_service(f)
                if service is not None:
                    return _Maker("botocore", site, service)
                f, depth = f.f_back, depth + 1
            return _Maker("botocore", site)
        f, depth = f.f_back, depth + 1
    return _Maker("urllib3", site)


def pool_target(pool: Any) -> tuple[str, dict[str, str | int]]:
    """Credential-free origin of a pool (``https://api.example.com``) and its server."""
    scheme = getattr(pool, "scheme", "http")
    host = pool.host
    port = pool.port or _DEFAULT_PORTS.get(scheme)
    target = target_name(scheme, host, None if port == _DEFAULT_PORTS.get(scheme) else port)
    proxy = getattr(pool, "proxy", None)
    if proxy is not None and proxy.host:
        if (proxy.host, proxy.port) == (host, pool.port):
            target = f"{target} (proxy)"  # plain-HTTP requests forwarded by the proxy
        else:  # a tunnel through the proxy to the target
            target = f"{target} via {target_name(proxy.scheme or 'http', proxy.host, proxy.port)}"
    attributes: dict[str, str | int] = {c.SERVER_ADDRESS: host}
    if port:
        attributes[c.SERVER_PORT] = port
    return target, attributes


class Urllib3Adapter(Adapter):
    """Hooks urllib3 2.x connection pools (requests and botocore included)."""

    name = "urllib3"
    kind = "urllib3"
    module = "urllib3"
    family = "http"
    requires = ("urllib3 >= 2.0.2, < 3",)
    tested_with = ("requests >= 2.30.0, < 3", "botocore >= 1.31.63, < 2")

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._making = threading.local()
        self._queue_empty: type[BaseException] = Exception
        self._own_close: dict[CodeType, bool] = {}
        """By the code of a function named ``close``: whether it is a connection's own."""
        self._get_conn_code: Any = None
        """The code of urllib3's own ``_get_conn``: a waiting caller's frame runs it."""

    # -- patching ----------------------------------------------------------------------
    def instrument(self, *, imported_before: bool) -> None:
        from urllib3 import connection, connectionpool, exceptions, poolmanager

        pools = connectionpool.HTTPConnectionPool
        https_pools = connectionpool.HTTPSConnectionPool
        self._patch(pools, _LEDGER, None)  # class default: "untracked"
        # A class default, so that reading a connection's mark never raises: a missed
        # getattr builds an AttributeError and its message, thousands of instructions,
        # twice per close (boto3 against a server answering Connection: close paid ~40,000
        # instructions a request for them, measured with valgrind).
        self._patch(connection.HTTPConnection, _MARK, None)
        self._wrap(pools, "__init__", lambda original: _pool_init_hook(self, original))
        self._get_conn_code = pools._get_conn.__code__
        self._hook(
            pools,
            "_get_conn",
            lambda original: _get_conn_hook(self, original, exceptions.EmptyPoolError),
        )
        self._hook(pools, "_put_conn", lambda original: _put_conn_hook(self, original))
        for pool_cls in (pools, https_pools):
            self._hook(pool_cls, "_new_conn", lambda original: _new_conn_hook(self, original))
        for conn_cls in (connection.HTTPConnection, connection.HTTPSConnection):
            self._hook(conn_cls, "connect", lambda original: _connect_hook(self, original))
        self._hook(connection.HTTPConnection, "close", lambda original: _close_hook(self, original))
        managers = poolmanager.PoolManager
        self._wrap(managers, "__init__", lambda original: _manager_init_hook(self, original))
        self._wrap(managers, "_new_pool", lambda original: _new_pool_hook(self, original))
        if imported_before:
            self._track_existing(managers, pools)

    def _forget_pools(self) -> None:
        for pool in list(self._tracked):
            pop_attribute(pool, _LEDGER)
            queue = pool.pool
            for conn in list(queue.queue) if queue is not None else ():
                if conn is not None:
                    pop_attribute(conn, _MARK)

    # -- tracking ----------------------------------------------------------------------
    def _track_pool(self, pool: Any, maker: _Maker | None, name: str | None = None) -> Ledger:
        target, attributes = pool_target(pool)
        kind = maker.kind if maker else self.kind
        if maker is not None and maker.service:
            target = f"{maker.service} {target}"
        ledger = self.tracker.track(
            pool,
            self,
            target=target,
            site=maker.site if maker else None,
            name=name or (maker.name if maker else None),
            attributes=attributes,
            kind=kind,
        )
        setattr(pool, _LEDGER, ledger)
        self._tracked.add(pool)
        queue = pool.pool
        if queue is not None:  # connections it already has (a pool found late)
            for conn in list(queue.queue):
                if conn is not None:
                    self._adopt(pool, conn, ledger)
        return ledger

    @staticmethod
    def _adopt(pool: Any, conn: Any, ledger: Ledger) -> None:
        setattr(conn, _MARK, _Mark(ledger, id(pool)))

    def _discover(self, pool: Any) -> Ledger | None:
        """A pool first seen at checkout: made before instrument()."""
        if self.stopped:  # a hook still running after uninstrument(): track nothing new
            return None
        try:
            return self._track_pool(pool, None)
        except Exception as error:
            self.report("urllib3 discover", error)
            return None

    def _track_existing(self, managers: type, pools: type) -> None:
        """Pools made before instrument(): managers first, so that pools get their maker."""
        found_managers: list[Any] = []
        found_pools: list[Any] = []
        candidates: list[tuple[Any, _Maker | None]] = []
        makers: dict[int, _Maker] = {}
        for obj in heap_objects(
            lambda cls: issubclass(cls, (managers, pools)) or cls.__module__ in _MAKER_MODULES
        ):
            if isinstance(obj, managers):
                found_managers.append(obj)
            elif isinstance(obj, pools):
                found_pools.append(obj)
            else:
                owned = _existing_maker(obj)
                # A botocore Endpoint names its service; its URLLib3Session does not.
                if owned is not None and (owned[1].service or id(owned[0]) not in makers):
                    makers[id(owned[0])] = owned[1]
        for manager in found_managers:
            maker = makers.get(id(manager))
            if maker is not None:
                setattr(manager, _CONTEXT, maker)
            candidates.extend((pool, maker) for pool in _pools_of(manager))
        candidates.extend((pool, None) for pool in found_pools)
        for pool, maker in candidates:
            if self.tracker.kind_of(pool) is None:
                try:
                    self._track_pool(pool, maker)
                except Exception as error:
                    self.report("urllib3 existing pool", error)

    def track(self, obj: Any, name: str | None) -> bool:
        try:
            from urllib3.connectionpool import HTTPConnectionPool
            from urllib3.poolmanager import PoolManager
        except ImportError:
            return False
        managers = _managers_of(obj, PoolManager)
        if isinstance(obj, HTTPConnectionPool):
            kind = self.tracker.kind_of(obj) or self.kind
            self._track_pool(obj, _Maker(kind, None, None, name))
            return True
        if not managers:
            return False
        for manager in managers:
            maker = getattr(manager, _CONTEXT, None) or _Maker(self.kind, None)
            maker = maker._replace(name=name)
            setattr(manager, _CONTEXT, maker)
            for pool in _pools_of(manager):
                self._track_pool(pool, maker, name)
        return True

    # -- closes ------------------------------------------------------------------------
    def _closer(self, conn: Any, caller: FrameType | None) -> FrameType | None:
        """The frame of whoever closes ``conn``, past its class's own ``close`` methods
        (botocore's AWSConnection closes through ``super()``).

        Whether a ``close`` is the connection's own is a property of its code, learnt once:
        reading a frame's ``f_locals`` builds a dict of all its locals (~5,000 instructions).
        """
        own_close = self._own_close
        while caller is not None and caller.f_code.co_name == "close":
            own = own_close.get(caller.f_code)
            if own is None:
                own = caller.f_locals.get("self") is conn
                if len(own_close) < _CLOSE_CODES_KEPT:
                    own_close[caller.f_code] = own
            if not own:
                break
            caller = caller.f_back
        return caller

    def _closing(self, conn: Any, mark: _Mark, ledger: Ledger, caller: FrameType | None) -> None:
        """``conn`` of a tracked pool closes: count the close, by reason and lifetime, now
        or (closed by the server's ``Connection: close``) when the pool lets go of it.

        A server that closes every connection makes one of these per request, twice (the
        response closes it, then the pool): the common steps come first and cheapest.
        """
        if caller is not None and caller.f_code.co_name == "close":
            caller = self._closer(conn, caller)  # a subclass's close, calling super()
        who = caller.f_code.co_name if caller is not None else ""
        now = perf_counter()
        if who == "urlopen":  # thrown away after an error, never returned: its use ends
            start = ledger.active.pop(conn, None)
            ledger.stacks.pop(conn, None)
            if start is not None:
                ledger.uses.append(now - start)

        ended = mark.ended
        if conn.sock is None and ended is _ABSENT:
            return  # never connected (a refused connect), or its close was counted
        born = mark.born
        if born is not None:
            mark.born = None
        lifetime = now - born if born is not None else None
        if ended is not _ABSENT:
            mark.ended = _ABSENT
            # The server ended it earlier; the pool lets go of the connection object now.
            lifetime = ended  # type: ignore[assignment]  # not _ABSENT (an `is` test: cheap)
            if who == "_put_conn" and not _pool_closed(caller):
                reason = c.REASON_POOL_FULL
            else:
                reason = c.REASON_INVALIDATED
        elif who == "getresponse" and sys.exc_info()[1] is None:
            # The server ended it (Connection: close). Counted when the pool lets go of the
            # object: urllib3 may yet discard it as "pool is full", which must count as such.
            mark.ended = lifetime
            return
        else:
            reason = _close_reason(who, caller, sys.exc_info()[1] is not None)
        # Ledger.closed_connection, inlined (the hot-path contract in _ledger.py)
        ledger.closes[reason].append(UNKNOWN_LIFETIME if lifetime is None else lifetime)

    # -- levels ------------------------------------------------------------------------
    def levels(self, pool: Any) -> Levels:
        ledger: Ledger | None = pool._poolwatch_ledger
        owner = id(pool)
        tracked = 0  # checkouts poolwatch saw, beyond maxsize too (block=False)
        if ledger is not None:
            tracked = sum(1 for conn in list(ledger.active) if _owner(conn) == owner)
        queue = pool.pool
        if queue is None:  # closed: what is still out comes back to be discarded
            return Levels(tracked, 0, None, 0)
        # A blocking pool counts for itself: every slot taken from its queue (which holds
        # idle connections and None placeholders) is a connection out, checkouts made before
        # poolwatch saw the pool included, and a slot whose response was dropped unreleased
        # stays out for good — capacity the pool has lost, which its callers will wait for.
        # A non-blocking pool opens past maxsize instead of waiting and refills a lost slot
        # with the next connection returned once it runs dry: its queue says nothing exact
        # about what is out, so there the checkout table (every checkout since poolwatch
        # saw the pool, those past maxsize included) is the count.
        limit = queue.maxsize
        used = max(limit - queue.qsize(), tracked) if pool.block and limit else tracked
        idle = sum(1 for conn in list(queue.queue) if conn is not None and conn.sock is not None)
        pending = len(queue.not_empty._waiters) if pool.block else 0
        return Levels(used, idle, limit or None, pending, idle_max=limit or None)

    # -- diagnostics -------------------------------------------------------------------
    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        if not pool.block:
            return ()  # never waits: opens a connection past maxsize instead
        if self.tracker.kind_of(pool) == "requests":
            # requests never passes urllib3 a pool_timeout: a blocked caller waits for ever
            return (
                Misconfiguration(c.ANTIPATTERN_NO_POOL_TIMEOUT, "HTTPAdapter(pool_block=True)"),
            )
        if self._waiting_for_ever(pool):
            return (
                Misconfiguration(
                    c.ANTIPATTERN_NO_POOL_TIMEOUT, "block=True, and urlopen() without pool_timeout"
                ),
            )
        return ()

    def _waiting_for_ever(self, pool: Any) -> bool:
        """Whether a thread is blocked in ``pool``'s ``_get_conn`` with no timeout (the
        caller's ``pool_timeout`` is a local of that frame: read only when callers wait)."""
        code = self._get_conn_code
        if code is None or not pool.pool or not len(pool.pool.not_empty._waiters):
            return False
        for top in list(sys._current_frames().values()):
            frame: FrameType | None = top
            depth = 0
            while frame is not None and depth < _FRAMES_SEARCHED:
                if frame.f_code is code and frame.f_locals.get("self") is pool:
                    return frame.f_locals.get("timeout", 0) is None
                frame, depth = frame.f_back, depth + 1
        return False

    def oldest_connection(self, pool: Any) -> float | None:
        marks = (getattr(conn, _MARK, None) for conn in self._connections_of(pool))
        known = [mark.born for mark in marks if mark is not None and mark.born is not None]
        return perf_counter() - min(known) if known else None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = (conn.sock.fileno() for conn in self._connections_of(pool))
        return tuple(fd for fd in found if fd >= 0)

    def _connections_of(self, pool: Any) -> list[Any]:
        """Open connections of ``pool``: idle in its queue, and checked out."""
        ledger: Ledger | None = pool._poolwatch_ledger
        owner = id(pool)
        out: list[Any] = (
            [conn for conn in list(ledger.active) if _owner(conn) == owner] if ledger else []
        )
        queue = pool.pool
        if queue is not None:
            out.extend(conn for conn in list(queue.queue) if conn is not None)
        return [conn for conn in out if conn.sock is not None]

    def unconnected(self, active: Mapping[Hashable, float]) -> int:
        # A connection is born (its mark's ``born`` set) just after its connect is counted,
        # and loses it when it closes: one out without it is connecting, or will.
        marks = (getattr(conn, _MARK, None) for conn in list(active))
        return sum(1 for mark in marks if mark is not None and mark.born is None)

    def find_abandoned(self, ledger: Ledger, active: dict[Hashable, float]) -> None:
        """Checked-out connections whose response the application dropped unreleased.

        Nothing returns them to their pool, and only poolwatch's checkout table still
        references them (urllib3 keeps no list of connections it handed out): left there,
        poolwatch would keep them, and their sockets, alive. Each counts as a leak. A
        collected response usually closed its connection already (``io.IOBase.__del__``
        calls ``close()``: counted then, as ``invalidated``); one still open is closed here,
        as the garbage collector would have, and counted as ``error``.
        """
        orphans: list[Any] = ledger.orphans(0, active)
        if not orphans:
            return
        now = perf_counter()
        for conn in orphans:
            start = active.get(conn)
            ledger.collected(conn, now - start if start is not None else 0.0)
            mark: _Mark | None = getattr(conn, _MARK, None)
            born = mark.born if mark is not None else None
            if conn.sock is not None:
                ledger.closed_connection(c.REASON_ERROR, now - born if born is not None else None)
            if mark is not None:
                mark.born, mark.ledger = None, None  # its close below is not counted again
            with contextlib.suppress(Exception):
                conn.close()


def _close_reason(who: str, caller: FrameType | None, handling: bool) -> str:
    """Why an open connection is closed, by the name of the function closing it."""
    if who == "_get_conn":
        return c.REASON_STALE  # found dropped by the server when about to be reused
    if who == "_put_conn":
        return c.REASON_DISPOSED if _pool_closed(caller) else c.REASON_POOL_FULL
    if who == "_close_pool_connections":
        return c.REASON_DISPOSED
    # urlopen after an error, getresponse failing, a response closed early, user code
    return c.REASON_ERROR if handling or who == "urlopen" else c.REASON_INVALIDATED


def _pool_closed(frame: FrameType | None) -> bool:
    """Whether the pool whose method runs in ``frame`` is closed (its queue is gone)."""
    pool = frame.f_locals.get("self") if frame is not None else None
    return getattr(pool, "pool", None) is None


def _pools_of(manager: Any) -> list[Any]:
    container = getattr(manager.pools, "_container", None)
    return list(container.values()) if container is not None else []


def _managers_of(obj: Any, manager_cls: type) -> list[Any]:
    """The PoolManagers of a PoolManager, a requests Session or adapter, a botocore client."""
    if isinstance(obj, manager_cls):
        return [obj]
    found: list[Any] = []
    adapters = getattr(obj, "adapters", None)  # requests.Session
    if isinstance(adapters, dict):
        for adapter in adapters.values():
            found.extend(_managers_of(adapter, manager_cls))
        return found
    manager = getattr(obj, "poolmanager", None)  # requests.adapters.HTTPAdapter
    if isinstance(manager, manager_cls):
        found.append(manager)
        found.extend(getattr(obj, "proxy_manager", {}).values())
        return found
    endpoint = getattr(obj, "_endpoint", None)  # a botocore client
    session = getattr(endpoint, "http_session", None)
    manager = getattr(session, "_manager", None)
    if isinstance(manager, manager_cls):
        found.append(manager)
        found.extend(getattr(session, "_proxy_managers", {}).values())
    return found


_MAKER_MODULES = frozenset({"requests.adapters", "botocore.httpsession", "botocore.endpoint"})
"""Modules of the objects that own PoolManagers (``_existing_maker``)."""


def _existing_maker(obj: Any) -> tuple[Any, _Maker] | None:
    """For an object found at instrument(): the PoolManager it owns and who it is."""
    module = type(obj).__module__
    if module == "requests.adapters" and hasattr(obj, "poolmanager"):
        return obj.poolmanager, _Maker("requests", None)
    if module == "botocore.httpsession" and hasattr(obj, "_manager"):
        return obj._manager, _Maker("botocore", None)
    if module == "botocore.endpoint" and hasattr(obj, "http_session"):  # a client's Endpoint
        manager = getattr(obj.http_session, "_manager", None)
        service = getattr(obj, "_endpoint_prefix", None)
        if manager is not None and isinstance(service, str):
            return manager, _Maker("botocore", None, service)
    return None


# -- hooks ---------------------------------------------------------------------------------
# Each factory returns the replacement for one urllib3 function, taking exactly its
# parameters (adapters/_patching.py checks them). _get_conn and _put_conn are the hot path:
# no OpenTelemetry, no lock, no allocation beyond a float (the Ledger contract in
# _ledger.py, inlined). Every statement of poolwatch's own is guarded and the library's
# function is called exactly once, outside the guards: a hook still running when
# uninstrument() removes the marks and class defaults it reads loses that reading only.


def _get_conn_hook(
    adapter: Urllib3Adapter, original: Callable[..., Any], empty: type[BaseException]
) -> Callable[..., Any]:
    report = adapter.report

    def failed(ledger: Ledger | None, start: float, *, timeout: bool) -> None:
        if ledger is not None:
            try:
                ledger.failed(start, perf_counter(), timeout=timeout)
            except Exception as error:
                report("urllib3 checkout", error)

    def _get_conn(self: Any, timeout: float | None = None) -> Any:
        try:
            ledger: Ledger | None = self._poolwatch_ledger
            if ledger is None:
                ledger = adapter._discover(self)
        except AttributeError:  # uninstrument() took the class default meanwhile
            ledger = None
        start = perf_counter()
        try:
            conn = original(self, timeout)
        except empty:
            failed(ledger, start, timeout=True)
            raise
        except BaseException:
            failed(ledger, start, timeout=False)
            raise
        if ledger is not None:
            try:
                now = perf_counter()
                ledger.active[conn] = now
                ledger.waits.append(now - start)
                if now - start > ledger.span_threshold:  # a wait that waited: a span
                    ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                    ledger.stacks[conn] = capture_stack(sys._getframe(1))
            except Exception as error:
                report("urllib3 checkout", error)
        return conn

    return _get_conn


def _put_conn_hook(adapter: Urllib3Adapter, original: Callable[..., Any]) -> Callable[..., Any]:
    report = adapter.report

    def _put_conn(self: Any, conn: Any) -> None:
        try:
            ledger: Ledger | None = self._poolwatch_ledger
            if ledger is not None and conn is not None:
                start = ledger.active.pop(conn, None)
                if start is not None:
                    held = perf_counter() - start
                    ledger.uses.append(held)
                    if held > ledger.leak_threshold:
                        ledger.settle(conn, held)
                    elif ledger.stacks:
                        ledger.stacks.pop(conn, None)
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("urllib3 checkin", error)
        original(self, conn)

    return _put_conn


def _new_conn_hook(adapter: Urllib3Adapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def _new_conn(self: Any) -> Any:
        conn = original(self)
        try:
            ledger = self._poolwatch_ledger
            if ledger is not None:
                adapter._adopt(self, conn, ledger)
        except Exception as error:
            adapter.report("urllib3 new connection", error)
        return conn

    return _new_conn


def _connect_hook(adapter: Urllib3Adapter, original: Callable[..., Any]) -> Callable[..., Any]:
    report = adapter.report

    def connect(self: Any) -> None:
        try:
            mark: _Mark | None = self._poolwatch
            ledger = mark.ledger if mark is not None else None
        except AttributeError:  # uninstrument() took the class default meanwhile
            mark = ledger = None
        if ledger is None:
            return original(self)  # type: ignore[no-any-return]
        start = perf_counter()
        try:
            original(self)
        except BaseException:
            try:
                ledger.connected(perf_counter() - start, ok=False)
            except Exception as error:
                report("urllib3 connect", error)
            raise
        now = perf_counter()
        try:  # Ledger.connected(ok=True), inlined (the hot-path contract in _ledger.py)
            ledger.connects.append(now - start)
            mark.born = now  # type: ignore[union-attr]  # not None: it has a ledger
            if now - start > ledger.span_threshold:  # a slow connect: a span
                ledger.slow_connect(start, now, True)
        except Exception as error:
            report("urllib3 connect", error)
        return None

    return connect


def _close_hook(adapter: Urllib3Adapter, original: Callable[..., Any]) -> Callable[..., Any]:
    closing = adapter._closing

    def close(self: Any) -> None:
        try:
            mark: _Mark | None = self._poolwatch
            if mark is not None and mark.ledger is not None:
                closing(self, mark, mark.ledger, sys._getframe(1))
        except Exception as error:
            adapter.report("urllib3 close", error)
        original(self)

    return close


def _pool_init_hook(adapter: Urllib3Adapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            maker: _Maker | None = getattr(adapter._making, "maker", None)
            if maker is None:
                maker = _Maker(adapter.kind, creation_site(sys._getframe(CALLER)))
            adapter._track_pool(self, maker)
        except Exception as error:
            adapter.report("urllib3 pool", error)

    return __init__


def _manager_init_hook(adapter: Urllib3Adapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            if not hasattr(self, _CONTEXT):
                setattr(self, _CONTEXT, _maker_of(sys._getframe(CALLER)))
        except Exception as error:
            adapter.report("urllib3 pool manager", error)

    return __init__


def _new_pool_hook(adapter: Urllib3Adapter, original: Callable[..., Any]) -> Callable[..., Any]:
    making = adapter._making

    def _new_pool(self: Any, *args: Any, **kwargs: Any) -> Any:
        making.maker = getattr(self, _CONTEXT, None)
        try:
            return original(self, *args, **kwargs)
        finally:
            making.maker = None

    return _new_pool
