"""asyncpg pools: every ``asyncpg.Pool`` (``asyncpg.create_pool()``), made before or after
``instrument()``.

Where each figure comes from (asyncpg's holders for used, idle and pending; every count from
the hooks: asyncpg keeps none), where it hooks, and each close reason:
docs/architecture.md, "asyncpg adapter".
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import weakref
from collections.abc import Callable, Coroutine, Hashable
from time import monotonic, perf_counter
from types import CodeType, FrameType
from typing import Any, NamedTuple

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, capture_stack
from poolwatch._models import Levels, Misconfiguration
from poolwatch._naming import creation_site
from poolwatch.adapters._base import Adapter, Tracker, heap_objects
from poolwatch.adapters._patching import CALLER
from poolwatch.adapters._postgres import from_environment, postgres_target

_PROXY_REFERENCES = 2
"""References asyncpg keeps to a checked-out connection proxy: its holder's ``_proxy`` and
its connection's ``_proxy``. A proxy nothing else references was dropped unreleased."""

_failed_connect: contextvars.ContextVar[weakref.ref[Any] | None] = contextvars.ContextVar(
    "poolwatch_asyncpg_failed_connect", default=None
)
"""The wrapper whose connect just failed in this task (weakly): tells an ``acquire()`` that
timed out while its connection was being opened from one that found no holder free."""


class _Watch:
    """Stands in for an asyncpg pool (which cannot be weakly referenced or marked): its
    ``_connect``, timed, with the pool's ledger."""

    __slots__ = ("__weakref__", "adapter", "ledger", "original", "pool", "untimed")

    def __init__(self, adapter: AsyncpgAdapter, pool: Any, original: Any) -> None:
        self.adapter = adapter
        self.pool = pool
        self.original = original
        self.ledger: Ledger | None = None
        self.untimed = False
        """Whether an ``acquire()`` without ``timeout=`` found no holder free: such a
        caller waits for ever if none comes back."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = perf_counter()
        try:
            con = await self.original(*args, **kwargs)
        except BaseException:
            self._connected(None, perf_counter() - start)
            raise
        self._connected(con, perf_counter() - start)
        return con

    def _connected(self, con: Any, duration: float) -> None:
        try:
            if con is None:
                _failed_connect.set(weakref.ref(self))
            ledger = self.ledger
            if ledger is None:
                return
            # A connect= function may return something else: asyncpg refuses it next
            # (InterfaceError), a failed connect.
            ok = isinstance(con, self.adapter._connection_class)
            ledger.connected(duration, ok=ok)
            if ok:
                self.adapter._born(con, ledger, monotonic())
        except Exception as error:
            self.adapter.report("asyncpg connect", error)

    def __repr__(self) -> str:
        return f"<poolwatch's watch of {self.pool!r}: {self.original!r}>"


class _Codes(NamedTuple):
    """asyncpg's own functions, by code object: who closes a connection tells why."""

    close: CodeType
    terminate: CodeType
    deactivate: CodeType
    release: CodeType
    holder_acquire: CodeType
    holder_close: CodeType
    holder_terminate: CodeType
    get_new_connection: CodeType
    maintain: CodeType | None
    initialize: CodeType | None
    connection_del: CodeType


class AsyncpgAdapter(Adapter):
    """Hooks asyncpg's ``Pool``."""

    name = "asyncpg"
    kind = "asyncpg"
    module = "asyncpg"
    connects_in_checkout = True
    tells_firsts = True
    connects_in_wait = True  # acquire() opens a holder's missing connection itself
    requires = ("asyncpg >= 0.30.0, < 1",)
    family = "database"

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._watches: weakref.WeakSet[_Watch] = weakref.WeakSet()
        self._connection_class: type = type(None)
        """``asyncpg.Connection``, once instrumented."""
        self._conns: weakref.WeakKeyDictionary[Any, tuple[Ledger, float | None]] = (
            weakref.WeakKeyDictionary()
        )
        """Every open connection of a tracked pool: its pool's ledger and when it opened
        (None: before poolwatch saw it). Popped when the connection closes: counted once.
        Never the pool or its wrapper: a value is held strongly, and one that led back to
        its key (pool, holder, connection) would keep a pool the application dropped
        unclosed alive, with its connections, for as long as poolwatch runs."""
        self._codes: _Codes | None = None

    # -- patching ----------------------------------------------------------------------
    def instrument(self, *, imported_before: bool) -> None:
        from asyncpg import connection, pool

        holder, pool_class, conn = pool.PoolConnectionHolder, pool.Pool, connection.Connection
        self._connection_class = conn
        self._codes = _Codes(
            close=conn.close.__code__,
            terminate=conn.terminate.__code__,
            deactivate=holder._deactivate_inactive_connection.__code__,
            release=holder.release.__code__,
            holder_acquire=holder.acquire.__code__,
            holder_close=holder.close.__code__,
            holder_terminate=holder.terminate.__code__,
            get_new_connection=pool_class._get_new_connection.__code__,
            maintain=_code(pool_class, "_maintain_min_size"),  # asyncpg 0.32+
            initialize=_code(pool_class, "_async__init__"),
            connection_del=conn.__del__.__code__,
        )
        self._hook_all(
            [
                (pool_class, "_acquire", _acquire_hook),
                (holder, "_release", _release_hook),
                (conn, "_cleanup", _cleanup_hook),
            ]
        )
        self._wrap_all([(pool_class, "__init__", _init_hook)])
        if imported_before:
            self._track_existing(pool_class)

    def _forget_pools(self) -> None:
        for watch in list(self._watches):
            watch.ledger = None
            pool = watch.pool
            try:
                if pool._connect is watch:
                    pool._connect = watch.original
            except Exception as error:
                self.report("asyncpg uninstrument", error)
        self._watches = weakref.WeakSet()
        self._conns = weakref.WeakKeyDictionary()

    # -- tracking ----------------------------------------------------------------------
    def _watch(self, pool: Any, site: str | None, name: str | None = None) -> _Watch:
        """Wrap ``pool``'s ``_connect`` (once) and track the wrapper in the pool's place."""
        watch = pool._connect
        if type(watch) is not _Watch:
            watch = _Watch(self, pool, pool._connect)
            pool._connect = watch
        target, attributes = pool_target(pool)
        ledger = self.tracker.track(
            watch, self, target=target, site=site, name=name, attributes=attributes
        )
        watch.ledger = ledger
        self._watches.add(watch)
        for holder in list(pool._holders):  # connections opened before poolwatch saw them
            con = holder._con
            if con is not None and con not in self._conns:
                self._conns[con] = (ledger, None)
        return watch

    def _born(self, con: Any, ledger: Ledger, when: float | None) -> None:
        self._conns[con] = (ledger, when)

    def _discover(self, pool: Any) -> Ledger | None:
        """A pool first seen at its first ``acquire()``."""
        if self.stopped:  # a hook still running after uninstrument(): track nothing new
            return None
        try:
            return self._watch(pool, None).ledger
        except Exception as error:
            self.report("asyncpg discover", error)
            return None

    def _track_existing(self, pool_class: type) -> None:
        for obj in heap_objects(lambda cls: issubclass(cls, pool_class)):
            try:
                if not obj._closed and type(obj._connect) is not _Watch:
                    self._watch(obj, None)
            except Exception as error:
                self.report("asyncpg existing pool", error)

    def track(self, obj: Any, name: str | None) -> bool:
        from asyncpg.pool import Pool

        if isinstance(obj, Pool):
            self._watch(obj, None, name)
            return True
        return False

    # -- closes ------------------------------------------------------------------------
    def _closing(self, con: Any, caller: FrameType) -> None:
        """``con`` is being cleaned up (closed) by the function running ``caller``."""
        entry = self._conns.pop(con, None)
        if entry is None:
            return  # not a tracked pool's connection, or already counted
        ledger, born = entry
        reason = self._reason(con, caller)
        ledger.closed_connection(reason, monotonic() - born if born is not None else None)

    def _reason(self, con: Any, caller: FrameType) -> str:
        codes = self._codes
        assert codes is not None
        closer = caller.f_code
        if closer is not codes.close and closer is not codes.terminate:
            return c.REASON_STALE  # the protocol lost the connection: server or network
        outer = caller.f_back
        code = outer.f_code if outer is not None else None
        if code is codes.deactivate:
            return c.REASON_IDLE_EXPIRED
        if code is codes.release:
            assert outer is not None
            local = outer.f_locals
            if closer is codes.terminate:
                # The reset failed (its exception is bound), or the connection was found
                # closed already.
                return c.REASON_ERROR if "ex" in local else c.REASON_STALE
            return _release_reason(local.get("self"), con)
        if code is codes.holder_acquire or code is codes.get_new_connection:
            return c.REASON_ERROR  # setup or init failed
        if code is codes.holder_close or code is codes.connection_del:
            return c.REASON_DISPOSED
        if code is codes.holder_terminate:
            assert outer is not None
            further = outer.f_back
            who = further.f_code if further is not None else None
            if who is not None and who is codes.maintain:
                return c.REASON_STALE  # restoring the floor: a holder found disconnected
            if who is not None and who is codes.initialize:
                return c.REASON_ERROR  # the pool failed to start
            return c.REASON_DISPOSED  # Pool.terminate(), or close() failing
        # The application closed a connection it holds, or asyncpg closes one it let go
        # of after expire_connections() (a task of its own).
        return c.REASON_INVALIDATED

    # -- levels ------------------------------------------------------------------------
    def levels(self, pool: Any) -> Levels:
        real = pool.pool
        size = real._maxsize
        queue = real._queue
        holders = list(real._holders)
        used = sum(1 for holder in holders if holder._in_use is not None)
        if queue is None:  # not initialised yet
            return Levels(used, 0, size, 0, idle_max=size, idle_min=real._minsize)
        free = list(queue._queue)
        idle = sum(1 for holder in free if _connected(holder))
        return Levels(
            used=used,
            idle=idle,
            max=size,
            pending=_pending(queue),
            idle_max=size,
            idle_min=real._minsize,
        )

    # -- diagnostics -------------------------------------------------------------------
    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        if pool.untimed:
            return (
                Misconfiguration(c.ANTIPATTERN_NO_POOL_TIMEOUT, "Pool.acquire() without timeout="),
            )
        return ()

    def oldest_connection(self, pool: Any) -> float | None:
        born = []
        for holder in list(pool.pool._holders):
            con = holder._con
            entry = self._conns.get(con) if con is not None else None
            if entry is not None and entry[1] is not None:
                born.append(entry[1])
        return monotonic() - min(born) if born else None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = []
        for holder in list(pool.pool._holders):
            con = holder._con
            transport = getattr(con, "_transport", None) if con is not None else None
            sock = transport.get_extra_info("socket") if transport is not None else None
            fd = sock.fileno() if sock is not None else -1
            if fd >= 0:
                found.append(fd)
        return tuple(found)

    def find_abandoned(self, ledger: Ledger, active: dict[Hashable, float]) -> None:
        """Checkouts whose borrower dropped the connection without releasing it.

        asyncpg's holder and connection still reference the proxy handed out, and the
        holder stays checked out for good (the pool has lost that slot: it shows as used);
        a proxy nothing else references was dropped. Each is a leak.
        """
        orphans = ledger.orphans(_PROXY_REFERENCES, active)
        if not orphans:
            return
        now = perf_counter()
        for proxy in orphans:
            start = active.get(proxy)
            ledger.collected(proxy, now - start if start is not None else 0.0)


def _code(owner: type, name: str) -> CodeType | None:
    function = owner.__dict__.get(name)
    return getattr(function, "__code__", None)


def _connected(holder: Any) -> bool:
    con = holder._con
    return con is not None and not con.is_closed()


def _pending(queue: Any) -> int:
    return sum(1 for getter in list(queue._getters) if not getter.done())


def _release_reason(holder: Any, con: Any) -> str:
    """Why ``release()`` closes ``con`` (it closes a connection for two reasons)."""
    protocol = con._protocol
    if holder is not None:
        if protocol is not None and protocol.queries_count >= holder._max_queries:
            return c.REASON_MAX_LIFETIME  # max_queries: asyncpg's limit on a connection's life
        if holder._generation != holder._pool._generation:
            return c.REASON_INVALIDATED  # expire_connections()
    return c.REASON_MAX_LIFETIME


def pool_target(pool: Any) -> tuple[str, dict[str, str | int]]:
    """The credential-free target of an asyncpg pool: its DSN's servers and database,
    overridden by its keyword arguments, as asyncpg reads them."""
    from urllib.parse import parse_qs, unquote

    args = pool._connect_args
    dsn = args[0] if args and isinstance(args[0], str) else None
    kwargs = pool._connect_kwargs if isinstance(pool._connect_kwargs, dict) else {}
    host: Any = None
    port: Any = None
    dbname: str | None = None
    if dsn:
        rest = dsn.split("://", 1)[1] if "://" in dsn else ""
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        netloc = netloc.rpartition("@")[2]  # never the user or password
        hosts, ports = [], []
        for part in netloc.split(","):
            if part.startswith("["):  # [IPv6]:port
                address, _, after = part[1:].partition("]")
                number = after[1:] if after.startswith(":") else ""
            else:
                address, _, number = part.partition(":")
            hosts.append(unquote(address))
            ports.append(number)
        host = ",".join(hosts) or None
        port = ",".join(ports) if any(ports) else None
        dbname = unquote(path) or None
        options = parse_qs(query)
        host = options.get("host", [host])[0]
        port = options.get("port", [port])[0]
        dbname = options.get("dbname", options.get("database", [dbname]))[0]
    host = kwargs.get("host", host)
    port = kwargs.get("port", port)
    dbname = kwargs.get("database", dbname)
    listed_hosts = host if isinstance(host, (list, tuple)) else None
    listed_ports = port if isinstance(port, (list, tuple)) else None
    found = from_environment(
        {
            "host": ",".join(map(str, listed_hosts)) if listed_hosts else _text(host),
            "port": ",".join(map(str, listed_ports)) if listed_ports else _text(port),
            "dbname": _text(dbname),
        }
    )
    return postgres_target(found["host"], found["port"], found["dbname"])


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# -- hooks ---------------------------------------------------------------------------------
# Each factory returns the replacement for one asyncpg function, taking exactly its
# parameters (adapters/_patching.py checks them). The acquire and release hooks are the hot
# path: no OpenTelemetry, no lock, no allocation beyond a float, and the ledger's hot-path
# contract (_ledger.py) inlined. Every statement of poolwatch's own is guarded, and the
# library's function is called exactly once, outside the guards.


def _acquire_hook(
    adapter: AsyncpgAdapter, original: Callable[..., Coroutine[Any, Any, Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    report = adapter.report
    timeout_error = asyncio.TimeoutError

    def failed(watch: _Watch | None, start: float, error: BaseException) -> None:
        end = perf_counter()
        try:
            failing = _failed_connect.get()
            if connecting := failing is not None and failing() is watch:
                _failed_connect.set(None)
            ledger = watch.ledger if watch is not None else None
            if ledger is not None:  # a timeout unless the connect made in it timed out
                timed_out = isinstance(error, timeout_error)
                ledger.failed(start, end, timeout=timed_out and not connecting)
        except Exception as bookkeeping:
            report("asyncpg acquire", bookkeeping)

    async def _acquire(self: Any, timeout: Any) -> Any:
        watch: _Watch | None = None
        ledger: Ledger | None = None
        try:
            found = self._connect
            if type(found) is _Watch:
                watch = found
            elif adapter._discover(self) is not None:
                watch = self._connect
            if watch is not None:
                ledger = watch.ledger
                if timeout is None:
                    queue = self._queue
                    if queue is not None and not queue._queue:  # it is about to wait
                        watch.untimed = True
        except Exception as error:
            report("asyncpg acquire", error)
        start = perf_counter()
        try:
            proxy = await original(self, timeout)
        except BaseException as error:
            failed(watch, start, error)
            raise
        if ledger is not None:
            try:
                # Ledger.acquired, inlined (the hot-path contract in _ledger.py): out
                # first, the connection's first checkout told next (asyncpg counts its
                # returns to a pool), counted last.
                now = perf_counter()
                ledger.active[proxy] = now
                if not proxy._con._pool_release_ctr:
                    ledger.firsts.append(None)
                ledger.waits.append(now - start)
                if now - start > ledger.span_threshold:  # a wait that waited: a span
                    ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                    ledger.stacks[proxy] = capture_stack(sys._getframe(1))
            except Exception as error:
                report("asyncpg acquire", error)
        return proxy

    return _acquire


def _returned(holder: Any) -> None:
    """``holder`` goes back to its pool's queue: its checkout, if any, ends."""
    proxy = holder._proxy
    if proxy is None or holder._in_use is None:
        return
    watch = holder._pool._connect
    if type(watch) is not _Watch:
        return
    ledger = watch.ledger
    if ledger is None:
        return
    # Ledger.released, inlined (the hot-path contract in _ledger.py).
    start = ledger.active.pop(proxy, None)
    if start is None:
        return
    held = perf_counter() - start
    ledger.uses.append(held)
    if held > ledger.leak_threshold:
        ledger.settle(proxy, held)
    elif ledger.stacks:
        ledger.stacks.pop(proxy, None)


def _release_hook(adapter: AsyncpgAdapter, original: Callable[[Any], None]) -> Any:
    report = adapter.report

    def _release(self: Any) -> None:
        try:
            _returned(self)
        except Exception as error:
            report("asyncpg release", error)
        original(self)

    return _release


def _cleanup_hook(adapter: AsyncpgAdapter, original: Callable[[Any], None]) -> Any:
    def _cleanup(self: Any) -> None:
        try:
            adapter._closing(self, sys._getframe(1))
        except Exception as error:
            adapter.report("asyncpg close", error)
        original(self)

    return _cleanup


def _init_hook(adapter: AsyncpgAdapter, original: Callable[..., None]) -> Any:
    def pool_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            adapter._watch(self, creation_site(sys._getframe(CALLER)))
        except Exception as error:
            adapter.report("asyncpg pool", error)

    return pool_init
