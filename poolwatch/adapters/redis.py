"""redis-py pools: ``ConnectionPool`` and ``BlockingConnectionPool``, sync and asyncio,
whoever made them — ``Redis(...)``, ``Redis.from_url(...)``, ``ConnectionPool.from_url``, a
``RedisCluster``'s per-node clients, a Sentinel's pools — before or after ``instrument()``.

Where it hooks, and why there:

* ``ConnectionPool.__init__`` (sync and asyncio; ``BlockingConnectionPool`` runs it too) —
  a new pool, its target (from its connection arguments, never its password) and the
  place in user code that made it. Pools made before ``instrument()`` are found once by a
  heap walk, and any pool still unknown at its first checkout is tracked then.
* ``get_connection`` of each pool class — the caller's whole wait: the wait for a free
  slot (``BlockingConnectionPool``), opening a new connection, and the pool's check that
  an idle connection is still usable (``ensure_connection``), which reconnects one the
  server dropped. Outcomes: ``timeout`` for what the pool raises when it is exhausted —
  ``BlockingConnectionPool``'s ``ConnectionError("No connection available.")`` once its
  ``timeout`` ran out, and ``ConnectionPool``'s ``MaxConnectionsError("Too many
  connections")`` (a ``ConnectionError``), raised at once when ``max_connections`` are out:
  the pool is exhausted either way; ``error`` for anything else (a failed connect).
* ``release`` of each pool class — end of use.
* the methods that take a connection for the life of their object (``_HOLDERS``: a
  single-connection client's, a ``PubSub``'s, a ``Monitor``'s) — that checkout is a hold.
* ``make_connection`` — marks a new connection with its pool's ledger before its connect.
* the connection's connect (``connect_check_health``; ``connect`` before redis-py 6) —
  connect time: TCP (or the Unix socket), TLS, and the handshake (``HELLO``/``AUTH``,
  ``CLIENT SETNAME``, ``SELECT``); a connect redis-py retries is timed attempt by attempt.
  A connection closed after an error reconnects on its next command, inside or outside a
  checkout: every connect is counted.
* the connection's ``disconnect`` (and the asyncio connection's ``_close``) — closes by
  reason, told by who closes it:

  ==============================================  ========================================
  closed by                                        reason
  ==============================================  ========================================
  the pool's ``ensure_connection`` at checkout     ``stale``: found closed by the server
                                                   (``timeout``, ``CLIENT KILL``, a restart,
                                                   a proxy); redis-py reconnects it
  ``ensure_connection``, "Connection has data"     ``invalidated``: given back with a reply
                                                   unread
  a failed health check (``health_check_interval``)  ``stale``
  a command failing on it (read or write error,    ``error``
  timeout), any close while an exception is
  handled
  the pool's ``disconnect()`` (``Redis.close()``,  ``disposed``
  ``aclose()``), a connection garbage-collected
  open
  anything else: a PubSub, Monitor or pipeline     ``invalidated``
  letting go of the connection it held, a
  maintenance reconnect
  ==============================================  ========================================

Checkout times are kept on the connection (``_poolwatch``, one slotted object) rather than
in ``Ledger.active``: the pool itself records which connections are out, and
``checkouts()`` reads them from it at collection. A connection taken for the life of a
``PubSub``, a ``Monitor`` or a ``single_connection_client`` is a checkout and is used while
it is out, but holding it is what it is for: its hold is neither a use
(``poolwatch.use.duration``) nor ever a leak. The methods that take such a connection
(``_HOLDERS``) are hooked, and mark the connection held once they ran: the checkout hook
itself never asks who its caller is.

Levels, read from the pool at collection: used — connections out (``ConnectionPool``: its
in-use set; ``BlockingConnectionPool``: the slots taken from its queue); idle — connected
connections ready for reuse (not the queue's ``None`` placeholders, nor connection objects
waiting to reconnect); max — ``max_connections``, absent when unbounded (the default
before redis-py 8: 2**31); pending — callers waiting in a ``BlockingConnectionPool``
(``ConnectionPool`` never waits: it raises at once); idle max — ``max_connections`` too:
the pool keeps every connection it made (idle min 0: it opens none ahead of need).

redis-py 7.2+ emits pool metrics of its own when its observability is initialised
(``redis.observability``: opt-in); the semantic-convention mirrors it emits are left out of
poolwatch's (:meth:`RedisAdapter.library_metrics`; docs/architecture.md says how the two
relate).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import sys
import weakref
from collections.abc import Callable, Coroutine, Hashable
from time import perf_counter
from types import CodeType, FrameType
from typing import Any

from poolwatch import _catalogue as c
from poolwatch._ledger import UNKNOWN_LIFETIME, Ledger, capture_stack
from poolwatch._models import Levels, Misconfiguration
from poolwatch._naming import creation_site, target_name
from poolwatch.adapters._base import Adapter, Tracker, heap_objects, pop_attribute
from poolwatch.adapters._patching import CALLER, Parameters, function_of

_LEDGER = "_poolwatch_ledger"
_MARK = "_poolwatch"
UNBOUNDED = 2**31
"""``max_connections`` redis-py gave a pool that was given none, before redis-py 8 (which
gives 100): no limit, in effect."""
_EXHAUSTED = ("Too many connections", "No connection available.")
"""What the pools raise (``ConnectionError``) when they are exhausted: ``ConnectionPool``
with ``max_connections`` out, ``BlockingConnectionPool`` once its ``timeout`` ran out."""
_HAS_DATA = "Connection has data"
_OWN_CLOSES = frozenset({"disconnect", "_close", "_force_disconnect"})
_STALE_CLOSERS = frozenset({"ensure_connection", "_ping_failed", "check_health"})
_DISPOSING_CLOSERS = frozenset({"close", "aclose", "__del__", "_checkpid"})
_FRAMES_SEARCHED = 8
_CODES_KEPT = 1024

HookFactory = Callable[[Any, Any, bool], Any]
"""Makes one hook: (adapter, the library's function, exact) -> its replacement."""

_disposing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "poolwatch_redis_disposing", default=False
)
"""Set while a pool's ``disconnect()`` runs: the connections it closes are disposed of. A
context variable rather than a frame, because the asyncio pool closes its connections in
tasks of their own (``asyncio.gather``), which copy it when they are made."""


class _Mark:
    """poolwatch's state on one connection of a tracked pool, kept in one attribute."""

    __slots__ = ("born", "dedicated", "fresh", "ledger", "open", "out", "owner")

    def __init__(self, ledger: Ledger, owner: int, *, open_: bool) -> None:
        self.ledger: Ledger | None = ledger
        self.owner = owner
        """``id()`` of its pool: a series (and its ledger) can hold several pools."""
        self.out: float | None = None
        """``perf_counter()`` of its checkout, while it is checked out."""
        self.dedicated = False
        """Checked out for the life of a PubSub, Monitor or single-connection client."""
        self.open = open_
        """Connected, as poolwatch saw it: its next close is to be counted."""
        self.born: float | None = None
        """``perf_counter()`` of the connect that opened it; None if unknown."""
        self.fresh = False
        """Opened while not checked out (inside a checkout's ``get_connection``, or between
        checkouts), not handed out since: the next checkout is its first
        (``Adapter.tells_firsts``). A reconnect while it is out serves that checkout, which
        was handed an open connection."""


def pool_target(
    pool: Any, unix: tuple[type, ...], tls: tuple[type, ...]
) -> tuple[str, dict[str, str | int]]:
    """Credential-free target of a pool (``redis://cache:6379/0``) and its server."""
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    cls = getattr(pool, "connection_class", None)
    db = kwargs.get("db", 0)
    service = getattr(pool, "service_name", None)
    if isinstance(service, str):  # a Sentinel's pool: the servers are whoever is master now
        role = "master" if getattr(pool, "is_master", True) else "replica"
        return f"redis-sentinel://{service}/{db} ({role})", {}
    if isinstance(cls, type) and issubclass(cls, unix):
        path = str(kwargs.get("path") or "")
        suffix = f" db={db}" if db not in (0, "0", None) else ""
        return target_name("unix", None, None, path) + suffix, {}
    scheme = "rediss" if isinstance(cls, type) and issubclass(cls, tls) else "redis"
    host = str(kwargs.get("host") or "localhost")
    port = kwargs.get("port") or 6379
    try:
        port = int(port)
    except (TypeError, ValueError):
        port = 6379
    target = target_name(scheme, host, port, f"/{db}")
    return target, {c.SERVER_ADDRESS: host, c.SERVER_PORT: port}


def _exhausted(error: BaseException, exhaustion: tuple[type, ...]) -> bool:
    """Whether ``error`` is the pool saying it is exhausted (a timeout-like event)."""
    if isinstance(error, exhaustion):
        return True
    args: tuple[Any, ...] = getattr(error, "args", ())
    return len(args) == 1 and args[0] in _EXHAUSTED


class RedisAdapter(Adapter):
    """Hooks redis-py's connection pools (sync and asyncio)."""

    name = "redis"
    kind = "redis"
    module = "redis"
    requires = ("redis >= 8.2.0, < 9",)
    connects_in_checkout = True
    tells_firsts = True
    """Not checkouts less connects: ``get_connection`` can connect and still fail (the
    connection connected, then found with unread data, twice: "Connection not ready")."""
    connects_in_wait = True
    """``get_connection`` opens a new connection inside the caller's wait: a slow wait's
    span has that connect as its child."""
    family = "database"

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._blocking: tuple[type, ...] = ()
        self._sync_pools: tuple[type, ...] = ()
        self._unix: tuple[type, ...] = ()
        self._tls: tuple[type, ...] = ()
        self._exhaustion: tuple[type, ...] = ()
        self._own_close: dict[int, tuple[CodeType, bool]] = {}

    # -- patching ----------------------------------------------------------------------
    def instrument(self, *, imported_before: bool) -> None:
        connection: Any = importlib.import_module("redis.connection")
        aconnection: Any = importlib.import_module("redis.asyncio.connection")
        exceptions: Any = importlib.import_module("redis.exceptions")

        self._exhaustion = tuple(
            cls for cls in (getattr(exceptions, "MaxConnectionsError", None),) if cls is not None
        )
        self._unix = (connection.UnixDomainSocketConnection, aconnection.UnixDomainSocketConnection)
        self._tls = (connection.SSLConnection, aconnection.SSLConnection)
        self._blocking = (connection.BlockingConnectionPool, aconnection.BlockingConnectionPool)
        self._sync_pools = (connection.ConnectionPool,)

        pools = (connection.ConnectionPool, aconnection.ConnectionPool)
        sync_conn = connection.AbstractConnection
        async_conn = aconnection.AbstractConnection
        for cls in pools:
            self._patch(cls, _LEDGER, None)  # class default: "untracked"
        # A class default, so that reading a connection's mark never raises (and never
        # builds an AttributeError on the hot path).
        connection_classes = [sync_conn, async_conn]
        proxy = getattr(connection, "CacheProxyConnection", None)
        if isinstance(proxy, type) and not issubclass(proxy, sync_conn):
            connection_classes.append(proxy)  # client-side caching hands these out
        for cls in connection_classes:
            self._patch(cls, _MARK, None)

        self._wrap_all(
            [(pool, "__init__", _pool_init_hook) for pool in pools]
            + [
                (cls, attribute, _make_hook if attribute == "make_connection" else _dispose_hook)
                for cls in (*pools, *self._blocking)
                for attribute in ("make_connection", "disconnect")
                if attribute in cls.__dict__
            ]
        )
        for cls in (connection.ConnectionPool, connection.BlockingConnectionPool):
            self._hook_or_wrap(cls, "get_connection", _get_connection_hook)
            self._hook_or_wrap(cls, "release", _release_hook)
        for cls in (aconnection.ConnectionPool, aconnection.BlockingConnectionPool):
            self._hook_or_wrap(cls, "get_connection", _async_get_connection_hook)
            self._hook_or_wrap(cls, "release", _async_release_hook)

        # The connect that opens a connection: connect_check_health since redis-py 6 (both
        # connect() and a command's reconnect go through it), connect() before.
        for cls, factory in ((sync_conn, _connect_hook), (async_conn, _async_connect_hook)):
            connect = "connect_check_health" if "connect_check_health" in vars(cls) else "connect"
            self._hook_or_wrap(cls, connect, factory)
        self._wrap_all(
            [
                (sync_conn, "disconnect", _disconnect_hook),
                (async_conn, "disconnect", _async_disconnect_hook),
            ]
        )
        if "_close" in vars(async_conn):
            self._hook(async_conn, "_close", lambda original: _close_hook(self, original))
        self._wrap_all((cls, attribute, _holder_hook) for cls, attribute in _holders_of(_HOLDERS))
        if imported_before:
            self._track_existing(pools)

    def _hook_or_wrap(self, owner: type, attribute: str, factory: HookFactory) -> None:
        """The hand-written hook where the library's function takes exactly its parameters
        (the hot path: one frame), else its generic twin behind a generated function with
        the library's parameters (older releases spell them otherwise).

        ``factory(adapter, original, exact)`` makes the exact hook, or the generic one that
        takes ``(self, *args, **kwargs)`` and finds its caller a frame further out."""
        original = function_of(owner.__dict__.get(attribute) or getattr(owner, attribute))
        exact = factory(self, original, True)
        if Parameters.of(function_of(exact)) == Parameters.of(original):
            self._hook(owner, attribute, lambda original: factory(self, original, True))
        else:
            self._wrap(owner, attribute, lambda original: factory(self, original, False))

    def _forget_pools(self) -> None:
        for pool in list(self._tracked):
            try:
                pop_attribute(pool, _LEDGER)
                for conn in _connections_of(pool):
                    pop_attribute(conn, _MARK)
                    inner = getattr(conn, "_conn", None)
                    if inner is not None:
                        pop_attribute(inner, _MARK)
            except Exception as error:
                self.report("redis uninstrument", error)
        self._tracked = weakref.WeakSet()

    # -- tracking ----------------------------------------------------------------------
    def _track_pool(self, pool: Any, site: str | None, name: str | None = None) -> Ledger:
        target, attributes = pool_target(pool, self._unix, self._tls)
        ledger = self.tracker.track(
            pool, self, target=target, site=site, name=name, attributes=attributes
        )
        setattr(pool, _LEDGER, ledger)
        self._tracked.add(pool)
        for conn in _connections_of(pool):  # connections it already has (a pool found late)
            mark: _Mark | None = getattr(conn, _MARK, None)
            if mark is None or mark.ledger is not ledger:
                self._adopt(pool, conn, ledger)
        return ledger

    def _adopt(self, pool: Any, conn: Any, ledger: Ledger) -> _Mark:
        """Mark ``conn`` as a connection of ``pool`` (connected already: its birth unknown)."""
        mark = _Mark(ledger, id(pool), open_=_connected(conn))
        setattr(conn, _MARK, mark)
        inner = getattr(conn, "_conn", None)  # a client-side caching proxy's connection
        if inner is not None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(inner, _MARK, mark)
        return mark

    def _discover(self, pool: Any) -> Ledger | None:
        """A pool first seen at checkout: made before instrument()."""
        if self.stopped:  # a hook still running after uninstrument(): track nothing new
            return None
        try:
            return self._track_pool(pool, None)
        except Exception as error:
            self.report("redis discover", error)
            return None

    def _track_existing(self, pools: tuple[type, ...]) -> None:
        for pool in heap_objects(lambda cls: issubclass(cls, pools)):
            try:
                if getattr(pool, _LEDGER) is None:
                    self._track_pool(pool, None)
            except Exception as error:
                self.report("redis existing pool", error)

    def track(self, obj: Any, name: str | None) -> bool:
        pools = self._pools_of(obj)
        if not pools:
            return False
        for pool in pools:
            self._track_pool(pool, None, name)
        return True

    def _pools_of(self, obj: Any) -> list[Any]:
        """The pools of a pool, a client (sync or asyncio), or a ``RedisCluster``."""
        try:
            connection: Any = importlib.import_module("redis.connection")
            aconnection: Any = importlib.import_module("redis.asyncio.connection")
        except ImportError:
            return []
        classes = (connection.ConnectionPool, aconnection.ConnectionPool)
        if isinstance(obj, classes):
            return [obj]
        pool = getattr(obj, "connection_pool", None)
        if isinstance(pool, classes):
            return [pool]
        nodes = getattr(getattr(obj, "nodes_manager", None), "nodes_cache", None)
        if isinstance(nodes, dict):  # a sync RedisCluster: a client, so a pool, per node
            found = []
            for node in list(nodes.values()):
                pool = getattr(getattr(node, "redis_connection", None), "connection_pool", None)
                if isinstance(pool, classes):
                    found.append(pool)
            return found
        return []

    # -- closes ------------------------------------------------------------------------
    def _closer(self, conn: Any, caller: FrameType | None) -> str:
        """The name of the function closing ``conn``, past the connection's own close
        methods (a subclass calling ``super()``, a caching proxy closing its connection)."""
        own = self._own_close
        depth = 0
        while caller is not None and depth < _FRAMES_SEARCHED:
            code = caller.f_code
            if code.co_name not in _OWN_CLOSES and code.co_name != "<lambda>":
                return code.co_name
            known = own.get(id(code))
            if known is not None and known[0] is code:
                mine = known[1]
            else:
                holder = caller.f_locals.get("self")
                mine = holder is conn or getattr(holder, "_conn", None) is conn
                if code.co_name == "<lambda>":
                    mine = True  # connect's retry callback, a client's failure callback
                if len(own) < _CODES_KEPT:
                    own[id(code)] = (code, mine)
            if not mine:
                return code.co_name  # a pool's disconnect()
            caller, depth = caller.f_back, depth + 1
        return ""

    def _closing(self, conn: Any, mark: _Mark, caller: FrameType | None) -> None:
        """``conn`` of a tracked pool, open, is being closed: count it, by reason."""
        ledger = mark.ledger
        if ledger is None or not mark.open:
            return
        mark.open = False
        born, mark.born = mark.born, None
        now = perf_counter()
        lifetime = now - born if born is not None else UNKNOWN_LIFETIME
        handling = sys.exc_info()[1]
        if _disposing.get():
            reason = c.REASON_DISPOSED
        else:
            who = self._closer(conn, caller)
            if who in _STALE_CLOSERS:
                has_data = handling is not None and str(handling) == _HAS_DATA
                reason = c.REASON_INVALIDATED if has_data else c.REASON_STALE
            elif who in _DISPOSING_CLOSERS:
                reason = c.REASON_DISPOSED
            elif handling is not None:
                reason = c.REASON_ERROR
            else:
                reason = c.REASON_INVALIDATED
        # Ledger.closed_connection, inlined (the hot-path contract in _ledger.py)
        ledger.closes[reason].append(lifetime)

    # -- levels ------------------------------------------------------------------------
    def checkouts(self, pools: list[Any]) -> dict[Hashable, float]:
        # The connections out, as the pool records them; their checkout time is on them.
        # A connection returned since the copy reads None (its hook cleared it first).
        out: dict[Hashable, float] = {}
        for pool in pools:
            for conn in _out_of(pool, self._blocking):
                mark: _Mark | None = getattr(conn, _MARK, None)
                if mark is not None and not mark.dedicated:
                    start = mark.out
                    if start is not None:
                        out[conn] = start
        return out

    def levels(self, pool: Any) -> Levels:
        limit = pool.max_connections
        bounded = limit if isinstance(limit, int) and 0 < limit < UNBOUNDED else None
        blocking = isinstance(pool, self._blocking)
        sync = isinstance(pool, self._sync_pools)
        if blocking and sync:
            queue = pool.pool  # idle connections and None placeholders
            queued = list(queue.queue)
            used = queue.maxsize - len(queued)
            idle = sum(1 for conn in queued if conn is not None and _connected(conn))
            pending = len(queue.not_empty._waiters)
            return Levels(used, idle, bounded, pending, idle_max=bounded, idle_min=0)
        used = len(list(pool._in_use_connections))
        idle = sum(1 for conn in list(pool._available_connections) if _connected(conn))
        pending = 0
        if blocking:  # asyncio: tasks waiting on its condition
            waiters = pool._condition._waiters
            pending = sum(1 for waiter in list(waiters or ()) if not waiter.done())
        # A redis-py pool keeps every connection it made, idle or not, and opens none ahead
        # of need: up to max_connections idle, none at least.
        return Levels(used, idle, bounded, pending, idle_max=bounded, idle_min=0)

    # -- diagnostics -------------------------------------------------------------------
    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        found = []
        blocking = isinstance(pool, self._blocking)
        cls = "BlockingConnectionPool" if blocking else "ConnectionPool"
        limit = pool.max_connections
        if not isinstance(limit, int) or limit >= UNBOUNDED:
            found.append(
                Misconfiguration(
                    c.ANTIPATTERN_UNBOUNDED_POOL,
                    f"redis.{cls} with max_connections {limit} (redis-py's default before "
                    "8.0: no limit)",
                )
            )
        if blocking and getattr(pool, "timeout", 0) is None:
            found.append(
                Misconfiguration(
                    c.ANTIPATTERN_NO_POOL_TIMEOUT, "redis.BlockingConnectionPool(timeout=None)"
                )
            )
        return tuple(found)

    def oldest_connection(self, pool: Any) -> float | None:
        marks = [getattr(conn, _MARK, None) for conn in _connections_of(pool)]
        born = [m.born for m in marks if m is not None and m.open and m.born is not None]
        return perf_counter() - min(born) if born else None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = []
        for conn in _connections_of(pool):
            fd = _fileno(conn)
            if fd >= 0:
                found.append(fd)
        return tuple(found)

    def library_metrics(self) -> frozenset[str]:
        """The ``db.client.connection.*`` metrics redis-py itself emits now: its
        observability (7.2+) is opt-in, initialised with
        ``get_observability_instance().init(OTelConfig(...))``; its ``CONNECTION_BASIC``
        group (on by default once initialised) records ``db.client.connection.count`` and
        ``.create_time``, its ``CONNECTION_ADVANCED`` group ``.timeouts`` and
        ``.wait_time``."""
        try:
            from redis.observability.config import MetricGroup, TelemetryOption
            from redis.observability.providers import get_observability_instance
        except ImportError:  # before redis-py 7.2: no observability of its own
            return frozenset()
        manager = get_observability_instance().get_provider_manager()
        if manager is None:
            return frozenset()
        config = manager.config
        if not config.enabled_telemetry & TelemetryOption.METRICS:
            return frozenset()
        emitted: set[str] = set()
        if config.metric_groups & MetricGroup.CONNECTION_BASIC:
            emitted.update(("db.client.connection.count", "db.client.connection.create_time"))
        if config.metric_groups & MetricGroup.CONNECTION_ADVANCED:
            emitted.update(("db.client.connection.timeouts", "db.client.connection.wait_time"))
        return frozenset(emitted)


_HOLDERS = (
    ("redis.client", "Redis", ("__init__",)),
    ("redis.client", "PubSub", ("execute_command",)),
    ("redis.client", "Monitor", ("__init__", "__enter__")),
    ("redis.cluster", "ClusterPubSub", ("execute_command",)),
    ("redis.asyncio.client", "Redis", ("initialize",)),
    ("redis.asyncio.client", "PubSub", ("connect",)),
    ("redis.asyncio.client", "Monitor", ("connect",)),
)
"""Where redis-py takes a connection for the life of its object, into its ``connection``
attribute: a single-connection client (sync ``Redis.__init__``, asyncio
``Redis.initialize``), a ``PubSub`` (its first command; asyncio: ``connect``, which the
cluster's ``ClusterPubSub`` inherits) and a ``Monitor``. (module, class, methods)."""


def _holders_of(table: tuple[tuple[str, str, tuple[str, ...]], ...]) -> list[tuple[type, str]]:
    """The (class, method) pairs of ``table`` that this redis-py has (its own methods only:
    a subclass that inherits one is covered by its base's hook)."""
    found: list[tuple[type, str]] = []
    for module_name, class_name, methods in table:
        module = sys.modules.get(module_name)
        if module is None:
            with contextlib.suppress(ImportError):
                module = importlib.import_module(module_name)
        cls = getattr(module, class_name, None)
        if isinstance(cls, type):
            found.extend((cls, name) for name in methods if name in vars(cls))
    return found


def _dedicate(holder: Any) -> None:
    """``holder`` (a PubSub, Monitor or single-connection client) may have just taken its
    connection out of a tracked pool: that checkout is its hold, neither a use nor a leak."""
    conn = getattr(holder, "connection", None)
    mark: _Mark | None = getattr(conn, _MARK, None)
    if mark is None or mark.out is None or mark.dedicated:
        return
    mark.dedicated = True
    ledger = mark.ledger
    if ledger is not None and ledger.stacks:
        ledger.stacks.pop(conn, None)  # its borrower's stack, taken at the checkout


def _connected(conn: Any) -> bool:
    """Whether a connection (sync: ``_sock``; asyncio: ``_reader``/``_writer``) is open."""
    inner = getattr(conn, "_conn", None)  # a client-side caching proxy
    if inner is not None:
        conn = inner
    if getattr(conn, "_sock", None) is not None:
        return True
    return getattr(conn, "_writer", None) is not None and getattr(conn, "_reader", None) is not None


def _fileno(conn: Any) -> int:
    inner = getattr(conn, "_conn", None)
    if inner is not None:
        conn = inner
    sock = getattr(conn, "_sock", None)
    if sock is None:
        writer = getattr(conn, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError):
        return -1


def _connections_of(pool: Any) -> list[Any]:
    """Every connection object a pool holds: idle ones and those out."""
    found: list[Any] = []
    every = getattr(pool, "_connections", None)  # BlockingConnectionPool keeps them all
    if isinstance(every, list):
        return list(every)
    found.extend(list(getattr(pool, "_available_connections", ())))
    found.extend(list(getattr(pool, "_in_use_connections", ())))
    return found


def _out_of(pool: Any, blocking: tuple[type, ...]) -> list[Any]:
    """The connections a pool has out (a copy: one C call each)."""
    every = getattr(pool, "_connections", None)
    if isinstance(every, list) and isinstance(pool, blocking):  # the sync blocking pool
        return list(every)  # those out are the ones marked out
    return list(getattr(pool, "_in_use_connections", ()))


# -- hooks ---------------------------------------------------------------------------------
# Each factory returns the replacement for one redis-py function. get_connection and release
# are the hot path: no OpenTelemetry, no lock, no allocation beyond a float (the Ledger
# contract in _ledger.py, inlined, the checkout time kept on the connection's mark). Every
# statement of poolwatch's own is guarded and the library's function is called exactly once,
# outside the guards: a hook still running when uninstrument() removes the marks and class
# defaults it reads loses that reading only.


def _failed(
    adapter: RedisAdapter, ledger: Ledger | None, start: float, error: BaseException
) -> None:
    if ledger is None:
        return
    try:
        ledger.failed(start, perf_counter(), timeout=_exhausted(error, adapter._exhaustion))
    except Exception as bookkeeping:
        adapter.report("redis checkout", bookkeeping)


def _undecorated(original: Callable[..., Any]) -> Callable[..., Any] | None:
    """The pool's own ``get_connection`` when ``original`` is exactly redis-py's
    ``@deprecated_args`` wrapper around it (redis-py 5.3+), else None.

    The wrapper only checks the arguments for deprecated ones before calling the function;
    a call with none but the pool (``get_connection()``, every caller in redis-py since
    5.3) has nothing to check, so the hook calls the function itself and saves the
    wrapper's frame; a call with arguments is checked first (``_argument_check``)."""
    utils = sys.modules.get("redis.utils")
    layers = getattr(original, "_deprecated_args_layers", None)
    inner = getattr(original, "__wrapped__", None)
    code = getattr(original, "__code__", None)
    if (
        utils is None
        or not isinstance(layers, tuple)
        or not layers
        or inner is not layers[0]
        or code is None
        or code.co_filename != getattr(utils, "__file__", None)
        or not callable(inner)
    ):
        return None
    function: Callable[..., Any] = inner
    return function


def _argument_check(
    original: Callable[..., Any], inner: Callable[..., Any] | None
) -> tuple[Callable[[tuple[Any, ...], dict[str, Any]], None], Callable[..., Any]]:
    """For a call with arguments: what checks them, and what to call after the check.

    With ``original`` exactly redis-py's ``@deprecated_args`` wrapper around ``inner``:
    redis-py's own check, as the wrapper makes it, then ``inner``. The check warns at
    stacklevel 4, the caller of the frame that calls it: called by the hook in the
    wrapper's place, it leaves a deprecation warning at the application's line, as bare.
    The wrapper called from the hook would leave it at the hook's line, where filters by
    module (and Python's default one, which shows a DeprecationWarning raised in
    ``__main__``) judge it otherwise. A ``functools.partial`` adds no frame. Otherwise:
    no check, then ``original``."""
    if inner is None:
        return _no_check, original
    function: Callable[..., Any] = inner
    check = getattr(sys.modules.get("redis.utils"), "_check_deprecated_layers", None)
    code = getattr(original, "__code__", None)
    if callable(check) and code is not None:
        try:
            cells = original.__closure__ or ()
            found = dict(zip(code.co_freevars, (c.cell_contents for c in cells), strict=True))
        except ValueError:  # an empty cell
            found = {}
        checks = found.get("checks")
        if found.get("func") is function and isinstance(checks, tuple):
            return functools.partial(check, function, checks), function
    return _no_check, original


def _no_check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The check of a call whose function warns for itself."""


def _get_connection_hook(
    adapter: RedisAdapter, original: Callable[..., Any], exact: bool
) -> Callable[..., Any]:
    report = adapter.report
    depth = 1 if exact else CALLER  # the frame that asked for a connection
    inner = _undecorated(original) if exact else None
    check, checked = _argument_check(original, inner)

    def get_connection(*args: Any, **kwargs: Any) -> Any:
        if inner is not None and len(args) == 1 and not kwargs:  # get_connection()
            called = inner
        else:  # deprecated arguments: redis-py's own check, called from this frame
            check(args, kwargs)
            called = checked
        try:
            pool = args[0]
            ledger: Ledger | None = pool._poolwatch_ledger
            if ledger is None:
                ledger = adapter._discover(pool)
        except (AttributeError, IndexError):  # uninstrument() took the class default
            ledger = None
        start = perf_counter()
        try:
            conn = called(*args, **kwargs)
        except BaseException as error:
            _failed(adapter, ledger, start, error)
            raise
        if ledger is not None:
            try:
                # Ledger.acquired, inlined (the hot-path contract in _ledger.py), the
                # checkout time kept on the connection's mark; the same in the asyncio hook.
                now = perf_counter()
                mark: _Mark | None = conn._poolwatch
                if mark is None or mark.ledger is not ledger:
                    mark = adapter._adopt(pool, conn, ledger)
                if mark.out is None:  # else counted by a hook it called (super())
                    mark.out = now
                    if mark.fresh:  # its first checkout
                        mark.fresh = False
                        ledger.firsts.append(None)
                    waited = now - start
                    ledger.waits.append(waited)
                    if waited > ledger.span_threshold:  # a wait that waited: a span
                        ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                    if ledger.capture:  # it has leaked, or "always" (a holder pops it)
                        ledger.stacks[conn] = capture_stack(sys._getframe(depth))
            except Exception as error:
                report("redis checkout", error)
        return conn

    return get_connection


def _async_get_connection_hook(
    adapter: RedisAdapter, original: Callable[..., Coroutine[Any, Any, Any]], exact: bool
) -> Callable[..., Coroutine[Any, Any, Any]]:
    report = adapter.report
    depth = 1 if exact else CALLER  # the frame that awaits a connection
    inner = _undecorated(original) if exact else None
    check, checked = _argument_check(original, inner)

    async def get_connection(*args: Any, **kwargs: Any) -> Any:
        if inner is not None and len(args) == 1 and not kwargs:  # get_connection()
            called = inner
        else:  # deprecated arguments: redis-py's own check, called from this frame
            check(args, kwargs)
            called = checked
        try:
            pool = args[0]
            ledger: Ledger | None = pool._poolwatch_ledger
            if ledger is None:
                ledger = adapter._discover(pool)
        except (AttributeError, IndexError):  # uninstrument() took the class default
            ledger = None
        start = perf_counter()
        try:
            conn = await called(*args, **kwargs)
        except BaseException as error:
            _failed(adapter, ledger, start, error)
            raise
        if ledger is not None:
            try:
                # Ledger.acquired, inlined: the sync hook's statements, one for one.
                now = perf_counter()
                mark: _Mark | None = conn._poolwatch
                if mark is None or mark.ledger is not ledger:
                    mark = adapter._adopt(pool, conn, ledger)
                if mark.out is None:
                    mark.out = now
                    if mark.fresh:  # its first checkout
                        mark.fresh = False
                        ledger.firsts.append(None)
                    waited = now - start
                    ledger.waits.append(waited)
                    if waited > ledger.span_threshold:  # a wait that waited: a span
                        ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                    if ledger.capture:
                        ledger.stacks[conn] = capture_stack(sys._getframe(depth))
            except Exception as error:
                report("redis checkout", error)
        return conn

    return get_connection


def _returned(conn: Any) -> None:
    """``conn`` is being given back to its pool (the generic release hooks' helper; the
    exact ones inline it)."""
    # Ledger.released, inlined (the hot-path contract in _ledger.py), the checkout time read
    # from the connection's mark.
    mark: _Mark | None = getattr(conn, _MARK, None)  # None: not marked
    if mark is None:
        return
    start = mark.out
    if start is None:
        return
    mark.out = None
    if mark.dedicated:  # held for the life of its holder: not a use, never a leak
        mark.dedicated = False
        return
    ledger = mark.ledger
    if ledger is None:
        return
    held = perf_counter() - start
    ledger.uses.append(held)
    if held > ledger.leak_threshold:
        ledger.settle(conn, held)
    elif ledger.stacks:
        ledger.stacks.pop(conn, None)


def _release_hook(
    adapter: RedisAdapter, original: Callable[..., Any], exact: bool
) -> Callable[..., Any]:
    report = adapter.report
    if not exact:

        def release_any(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                _returned(args[0] if args else kwargs["connection"])
            except Exception as error:
                report("redis release", error)
            return original(self, *args, **kwargs)

        return release_any

    def release(self: Any, connection: Any) -> Any:
        try:
            # _returned, inlined (a frame is a fifth of these hooks' cost)
            # None also for a connection poolwatch never marked (a class not redis-py's,
            # as redis-py's own tests use) and once uninstrument() took the class default
            try:
                mark: _Mark | None = connection._poolwatch
            except AttributeError:
                mark = None
            start = mark.out if mark is not None else None
            if start is not None:
                mark.out = None  # type: ignore[union-attr]  # not None: it had a start
                ledger = mark.ledger  # type: ignore[union-attr]
                if mark.dedicated:  # type: ignore[union-attr]  # its holder let it go
                    mark.dedicated = False  # type: ignore[union-attr]
                elif ledger is not None:
                    held = perf_counter() - start
                    ledger.uses.append(held)
                    if held > ledger.leak_threshold:
                        ledger.settle(connection, held)
                    elif ledger.stacks:
                        ledger.stacks.pop(connection, None)
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("redis release", error)
        return original(self, connection)

    return release


def _async_release_hook(
    adapter: RedisAdapter, original: Callable[..., Coroutine[Any, Any, Any]], exact: bool
) -> Callable[..., Coroutine[Any, Any, Any]]:
    report = adapter.report
    if not exact:

        async def release_any(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                _returned(args[0] if args else kwargs["connection"])
            except Exception as error:
                report("redis release", error)
            return await original(self, *args, **kwargs)

        return release_any

    async def release(self: Any, connection: Any) -> Any:
        try:
            # _returned, inlined: the sync hook's statements, one for one.
            # None also for a connection poolwatch never marked (a class not redis-py's,
            # as redis-py's own tests use) and once uninstrument() took the class default
            try:
                mark: _Mark | None = connection._poolwatch
            except AttributeError:
                mark = None
            start = mark.out if mark is not None else None
            if start is not None:
                mark.out = None  # type: ignore[union-attr]  # not None: it had a start
                ledger = mark.ledger  # type: ignore[union-attr]
                if mark.dedicated:  # type: ignore[union-attr]  # its holder let it go
                    mark.dedicated = False  # type: ignore[union-attr]
                elif ledger is not None:
                    held = perf_counter() - start
                    ledger.uses.append(held)
                    if held > ledger.leak_threshold:
                        ledger.settle(connection, held)
                    elif ledger.stacks:
                        ledger.stacks.pop(connection, None)
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("redis release", error)
        return await original(self, connection)

    return release


def _connect_hook(
    adapter: RedisAdapter, original: Callable[..., Any], exact: bool
) -> Callable[..., Any]:
    report = adapter.report

    def connecting(conn: Any) -> tuple[_Mark, Ledger] | None:
        """The mark and ledger of a pool's connection about to connect, else None."""
        try:
            mark: _Mark | None = conn._poolwatch
            if mark is None or mark.ledger is None or conn._sock is not None:
                return None  # connected already (every checkout asks), or not a pool's
            return mark, mark.ledger
        except AttributeError:  # uninstrument() took the class default meanwhile
            return None

    def timed(timing: tuple[_Mark, Ledger], conn: Any, start: float, ok: bool) -> None:
        try:
            _connect_done(timing, start, ok=ok, open_=ok and conn._sock is not None)
        except Exception as error:
            report("redis connect", error)

    if not exact:

        def connect_any(self: Any, *args: Any, **kwargs: Any) -> Any:
            timing = connecting(self)
            if timing is None:
                return original(self, *args, **kwargs)
            start = perf_counter()
            try:
                result = original(self, *args, **kwargs)
            except BaseException:
                timed(timing, self, start, False)
                raise
            timed(timing, self, start, True)
            return result

        return connect_any

    def connect_check_health(
        self: Any, check_health: bool = True, retry_socket_connect: bool = True
    ) -> Any:
        # Every checkout asks a connected connection to connect: that case reads one
        # attribute, and calls nothing of poolwatch's.
        timing = connecting(self) if getattr(self, "_sock", None) is None else None
        if timing is None:
            return original(self, check_health, retry_socket_connect)
        start = perf_counter()
        try:
            result = original(self, check_health, retry_socket_connect)
        except BaseException:
            timed(timing, self, start, False)
            raise
        timed(timing, self, start, True)
        return result

    return connect_check_health


def _async_connect_hook(
    adapter: RedisAdapter, original: Callable[..., Coroutine[Any, Any, Any]], exact: bool
) -> Callable[..., Coroutine[Any, Any, Any]]:
    report = adapter.report

    def connecting(conn: Any) -> tuple[_Mark, Ledger] | None:
        try:
            mark: _Mark | None = conn._poolwatch
            if mark is None or mark.ledger is None or conn._writer is not None:
                return None  # connected already (every checkout asks), or not a pool's
            return mark, mark.ledger
        except AttributeError:  # uninstrument() took the class default meanwhile
            return None

    def timed(timing: tuple[_Mark, Ledger], conn: Any, start: float, ok: bool) -> None:
        try:
            _connect_done(timing, start, ok=ok, open_=ok and conn._writer is not None)
        except Exception as error:
            report("redis connect", error)

    if not exact:

        async def connect_any(self: Any, *args: Any, **kwargs: Any) -> Any:
            timing = connecting(self)
            if timing is None:
                return await original(self, *args, **kwargs)
            start = perf_counter()
            try:
                result = await original(self, *args, **kwargs)
            except BaseException:
                timed(timing, self, start, False)
                raise
            timed(timing, self, start, True)
            return result

        return connect_any

    async def connect_check_health(
        self: Any, check_health: bool = True, retry_socket_connect: bool = True
    ) -> Any:
        timing = connecting(self) if getattr(self, "_writer", None) is None else None
        if timing is None:
            return await original(self, check_health, retry_socket_connect)
        start = perf_counter()
        try:
            result = await original(self, check_health, retry_socket_connect)
        except BaseException:
            timed(timing, self, start, False)
            raise
        timed(timing, self, start, True)
        return result

    return connect_check_health


def _connect_done(timing: tuple[_Mark, Ledger], start: float, *, ok: bool, open_: bool) -> None:
    """A connect attempt of a pool's connection ended (``ok``: it returned)."""
    mark, ledger = timing
    now = perf_counter()
    if not ok:
        ledger.connected(now - start, ok=False)
        return
    if not open_:
        return  # it returned closed (a failed handshake closed it): not a connection
    # Ledger.connected(ok=True), inlined (the hot-path contract in _ledger.py)
    ledger.connects.append(now - start)
    mark.born = now
    mark.open = True
    if mark.out is None:
        mark.fresh = True
    if ledger.tracer is not None:  # kept for the span of the wait it is part of
        ledger.slow_connect(start, now, True)


def _disconnect_hook(adapter: RedisAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def disconnect(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            mark: _Mark | None = self._poolwatch
            if mark is not None and mark.open and _connected(self):
                adapter._closing(self, mark, sys._getframe(CALLER))
        except Exception as error:
            adapter.report("redis close", error)
        return original(self, *args, **kwargs)

    return disconnect


def _async_disconnect_hook(
    adapter: RedisAdapter, original: Callable[..., Coroutine[Any, Any, Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def disconnect(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            mark: _Mark | None = self._poolwatch
            if mark is not None and mark.open and _connected(self):
                adapter._closing(self, mark, sys._getframe(CALLER))
        except Exception as error:
            adapter.report("redis close", error)
        return await original(self, *args, **kwargs)

    return disconnect


def _close_hook(adapter: RedisAdapter, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def _close(self: Any) -> Any:
        try:
            mark: _Mark | None = self._poolwatch
            if mark is not None and mark.open and _connected(self):
                adapter._closing(self, mark, sys._getframe(1))
        except Exception as error:
            adapter.report("redis close", error)
        return original(self)

    return _close


def _holder_hook(adapter: RedisAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    """A method that may take a connection for the life of its object (``_HOLDERS``):
    afterwards, the connection it holds is marked as held (also when it raised: it may
    hold one still)."""
    report = adapter.report
    if _is_coroutine(original):

        async def take_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await original(self, *args, **kwargs)
            finally:
                try:
                    _dedicate(self)
                except Exception as error:
                    report("redis holder", error)

        return take_async

    def take(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            try:
                _dedicate(self)
            except Exception as error:
                report("redis holder", error)

    return take


def _pool_init_hook(adapter: RedisAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            adapter._track_pool(self, creation_site(sys._getframe(CALLER)))
        except Exception as error:
            adapter.report("redis pool", error)

    return __init__


def _make_hook(adapter: RedisAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def make_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = original(self, *args, **kwargs)
        try:
            ledger = self._poolwatch_ledger
            if ledger is not None and getattr(conn, _MARK, None) is None:
                adapter._adopt(self, conn, ledger)
        except Exception as error:
            adapter.report("redis new connection", error)
        return conn

    return make_connection


def _dispose_hook(adapter: RedisAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    """A pool's ``disconnect()``: the connections it closes meanwhile are disposed of."""
    if _is_coroutine(original):

        async def disconnect_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            token = _disposing.set(True)
            try:
                return await original(self, *args, **kwargs)
            finally:
                _disposing.reset(token)

        return disconnect_async

    def disconnect(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _disposing.set(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            _disposing.reset(token)

    return disconnect


def _is_coroutine(function: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(function)
