"""psycopg_pool pools: ``ConnectionPool``, ``AsyncConnectionPool``, ``NullConnectionPool`` and
``AsyncNullConnectionPool`` (psycopg 3), made before or after ``instrument()``.

Where each figure comes from (the pool's own state for idle, max and pending; poolwatch's
checkout table for used; every count from the hooks, since ``pop_stats()`` resets the
pool's own counters), where it hooks, and each close reason: docs/architecture.md,
"psycopg_pool adapter".
"""

from __future__ import annotations

import contextvars
import sys
import weakref
from collections.abc import Callable, Coroutine, Hashable
from time import monotonic, perf_counter
from types import FrameType
from typing import Any

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, capture_stack
from poolwatch._models import Levels, Misconfiguration
from poolwatch._naming import creation_site
from poolwatch.adapters._base import Adapter, Tracker, heap_objects, pop_attribute
from poolwatch.adapters._patching import CALLER
from poolwatch.adapters._postgres import from_environment, postgres_target

_LEDGER = "_poolwatch_ledger"
"""On a pool: the ledger its hooks report into (the class default None: untracked)."""
_SITE = "_poolwatch_site"
"""On a pool being made: where in user code, until it is tracked."""
_USED = "_poolwatch_used"
"""On a connection: checked out before (the class default False: never yet)."""
_CLOSED = "_poolwatch_closed"
"""On a connection: closed by its pool, its close counted by reason (the class default
False: not by the pool)."""

_failed_connect: contextvars.ContextVar[weakref.ref[Any] | None] = contextvars.ContextVar(
    "poolwatch_psycopg_pool_failed_connect", default=None
)
"""The pool whose connect just failed in this thread or task (weakly: a worker thread's
context outlives many connects, and must not keep its pool alive): tells a null pool's
``PoolTimeout`` for a connect that timed out from one for a pool that had no connection."""

# Who closes a connection tells why (the table in the module docstring).
_RETURNED = "_return_connection"
_CLOSERS = {
    "_reset_connection": c.REASON_ERROR,
    "_shrink_pool": c.REASON_IDLE_EXPIRED,
    "check": c.REASON_MAX_LIFETIME,
    "drain": c.REASON_INVALIDATED,
}


class PsycopgPoolAdapter(Adapter):
    """Hooks psycopg_pool 3's connection pools, sync and async."""

    name = "psycopg_pool"
    kind = "psycopg_pool"
    module = "psycopg_pool"
    tells_firsts = True
    connects_in_wait = False  # the pool's workers connect (a null pool's: told per connect)
    requires = ("psycopg-pool >= 3.3.0, < 4",)
    family = "database"

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._null: tuple[type, ...] = ()
        self._unknown: object = None
        """``psycopg.pq.TransactionStatus.UNKNOWN``: a connection closed or broken."""

    # -- patching ----------------------------------------------------------------------
    def instrument(self, *, imported_before: bool) -> None:
        import psycopg
        import psycopg_pool
        from psycopg import pq

        sync, asynchronous = psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool
        self._null = (psycopg_pool.NullConnectionPool, psycopg_pool.AsyncNullConnectionPool)
        self._unknown = pq.TransactionStatus.UNKNOWN
        timeouts = (psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests)
        # Marks are plain attributes with class defaults, never written through __dict__.
        for pool_class in (sync, asynchronous):
            self._patch(pool_class, _LEDGER, None)
            self._patch(pool_class, _SITE, None)
        for connection_class in (psycopg.Connection, psycopg.AsyncConnection):
            self._patch(connection_class, _USED, False)
            self._patch(connection_class, _CLOSED, False)

        def getconn(adapter: Any, original: Any) -> Any:
            return _getconn_hook(adapter, original, timeouts)

        def agetconn(adapter: Any, original: Any) -> Any:
            return _agetconn_hook(adapter, original, timeouts)

        self._hook_all(
            [
                (sync, "getconn", getconn),
                (sync, "putconn", _putconn_hook),
                (sync, "_connect", _connect_hook),
                (sync, "_close_connection", _close_hook),
                (sync, "check_connection", _check_hook),
                (sync, "_open", _open_hook),
                (asynchronous, "getconn", agetconn),
                (asynchronous, "putconn", _aputconn_hook),
                (asynchronous, "_connect", _aconnect_hook),
                (asynchronous, "_close_connection", _aclose_hook),
                (asynchronous, "check_connection", _acheck_hook),
                (asynchronous, "_open", _open_hook),
            ]
        )
        self._wrap_all(
            [
                (sync, "__init__", _init_hook),
                (asynchronous, "__init__", _init_hook),
                (psycopg_pool.pool.AddConnection, "__init__", _replace_hook),
                (psycopg_pool.pool_async.AddConnection, "__init__", _replace_hook),
            ]
        )
        if imported_before:
            self._track_existing((sync, asynchronous))

    def _forget_pools(self) -> None:
        for pool in list(self._tracked):
            try:
                for conn in self._connections(pool):
                    pop_attribute(conn, _USED)
            except Exception as error:
                self.report("psycopg_pool uninstrument", error)
            pop_attribute(pool, _LEDGER)
            pop_attribute(pool, _SITE)
        self._tracked = weakref.WeakSet()

    # -- tracking ----------------------------------------------------------------------
    def _track_pool(self, pool: Any, site: str | None, name: str | None = None) -> Ledger:
        target, attributes = pool_target(pool)
        ledger = self.tracker.track(
            pool, self, target=target, site=site, name=name, attributes=attributes
        )
        pool._poolwatch_ledger = ledger
        pop_attribute(pool, _SITE)
        self._tracked.add(pool)
        return ledger

    def _discover(self, pool: Any) -> Ledger | None:
        """A pool first seen at its first ``getconn()``."""
        if self.stopped:  # a hook still running after uninstrument(): track nothing new
            return None
        try:
            return self._track_pool(pool, pool._poolwatch_site)
        except Exception as error:
            self.report("psycopg_pool discover", error)
            return None

    def _track_existing(self, classes: tuple[type, ...]) -> None:
        for obj in heap_objects(lambda cls: issubclass(cls, classes)):
            try:
                if not (obj._opened and obj._closed) and obj._poolwatch_ledger is None:
                    self._track_pool(obj, None)
            except Exception as error:
                self.report("psycopg_pool existing pool", error)

    def track(self, obj: Any, name: str | None) -> bool:
        import psycopg_pool

        if isinstance(obj, (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool)):
            self._track_pool(obj, None, name)
            return True
        return False

    # -- closes ------------------------------------------------------------------------
    def _closing(self, pool: Any, conn: Any, caller: FrameType) -> None:
        """``pool`` closes ``conn``, asked by the function running ``caller``."""
        conn._poolwatch_closed = True  # not dropped broken: _replacing counts no stale close
        ledger: Ledger | None = pool._poolwatch_ledger
        if ledger is None:
            return
        name = caller.f_code.co_name
        if name == _RETURNED:
            # Past its max_lifetime, or opened before drain() asked for fresh connections.
            drained = conn._created_at <= pool._drained_at
            reason = c.REASON_INVALIDATED if drained else c.REASON_MAX_LIFETIME
        elif name in _CLOSERS:
            reason = _CLOSERS[name]
        elif name == "_maybe_close_connection" and isinstance(pool, self._null):
            reason = c.REASON_STALE if self._broken(conn) else c.REASON_DISPOSED
        else:  # close(), a connection back to a closed pool, a null pool with no waiter
            reason = c.REASON_DISPOSED
        ledger.closed_connection(reason, _lifetime(conn))

    def _replacing(self, caller: FrameType) -> None:
        """``_return_connection``, running ``caller``, asks for a connection to replace the
        one it was given back. When that one is broken and the pool did not close it itself
        (past ``max_lifetime``, a failed reset: counted by ``_closing``), it came back
        closed or broken (from ``putconn``, from a failed ``check`` callback of
        ``getconn``, or to a caller that gave up waiting) and the pool drops it without
        closing it: a stale close. Off the hot path: a return that keeps its connection
        asks for no replacement."""
        local = caller.f_locals
        pool, conn = local.get("self"), local.get("conn")
        if conn is None or conn._poolwatch_closed or not self._broken(conn):
            return
        ledger: Ledger | None = getattr(pool, _LEDGER, None)
        if ledger is not None:
            ledger.closed_connection(c.REASON_STALE, _lifetime(conn))

    def _check_failed(self, conn: Any, caller: FrameType) -> None:
        """``check_connection`` raised for ``conn``: ``check()`` drops such a connection
        (a failed ``check`` callback of ``getconn`` is counted by ``_replacing``)."""
        if caller.f_code.co_name != "check":
            return
        pool = caller.f_locals.get("self")
        ledger: Ledger | None = getattr(pool, _LEDGER, None)
        if ledger is not None:
            ledger.closed_connection(c.REASON_STALE, _lifetime(conn))

    def _broken(self, conn: Any) -> bool:
        return bool(conn.pgconn.transaction_status == self._unknown)

    # -- levels ------------------------------------------------------------------------
    def levels(self, pool: Any) -> Levels:
        idle = len(pool._pool)
        # A client that timed out or was cancelled stays in the queue, its error set,
        # until a connection comes back: it waits no more.
        waiting = list(pool._waiting)
        pending = sum(1 for client in waiting if client.conn is None and client.error is None)
        size = pool._max_size
        null = isinstance(pool, self._null)
        return Levels(
            used=_checked_out_of(pool),
            idle=idle,
            max=size if size or not null else None,
            pending=pending,
            idle_max=0 if null else size,
            idle_min=pool._min_size,
        )

    def _connections(self, pool: Any) -> list[Any]:
        """``pool``'s connections poolwatch can see: idle, then checked out."""
        found = list(pool._pool)
        ledger: Ledger | None = pool._poolwatch_ledger
        if ledger is not None:
            found.extend(k for k in list(ledger.active) if getattr(k, "_pool", None) is pool)
        return found

    # -- diagnostics -------------------------------------------------------------------
    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        size: int = getattr(pool, "_max_size", 0)
        if isinstance(pool, self._null) and not size:
            setting = f"{type(pool).__name__}(max_size=0)"
            return (Misconfiguration(c.ANTIPATTERN_UNBOUNDED_POOL, setting),)
        return ()  # a timeout always bounds the wait (timeout=30 s by default)

    def oldest_connection(self, pool: Any) -> float | None:
        born = [getattr(conn, "_created_at", None) for conn in self._connections(pool)]
        known = [t for t in born if t is not None]
        return monotonic() - min(known) if known else None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = []
        for conn in self._connections(pool):
            if conn.closed:
                continue
            try:
                fd = conn.pgconn.socket
            except Exception:  # psycopg raises for a connection gone bad meanwhile
                continue
            if isinstance(fd, int) and fd >= 0:
                found.append(fd)
        return tuple(found)

    def find_abandoned(self, ledger: Ledger, active: dict[Hashable, float]) -> None:
        """Checked-out connections their borrower dropped without ``putconn()``.

        psycopg_pool keeps no list of the connections it handed out: only poolwatch's
        checkout table still references such a connection, and left there poolwatch would
        keep it, and its socket, alive. Each is a leak, and closes as ``error`` once
        poolwatch lets go of it (freed, psycopg closes it, as it would have at once
        without poolwatch). psycopg_pool never gets it back: it still counts it among its
        ``max_size``.
        """
        orphans = ledger.orphans(0, active)
        if not orphans:
            return
        now = perf_counter()
        for key in orphans:
            start = active.get(key)
            ledger.collected(key, now - start if start is not None else 0.0)
            conn: Any = key
            if not conn.closed:
                ledger.closed_connection(c.REASON_ERROR, _lifetime(conn))


def pool_target(pool: Any) -> tuple[str, dict[str, str | int]]:
    """The credential-free target of a psycopg pool, from its connection string and keyword
    arguments as psycopg parses them; a callable one is never called (it may fetch a token):
    then its keyword arguments and the environment name it."""
    from psycopg.conninfo import conninfo_to_dict

    conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
    kwargs = pool.kwargs if isinstance(pool.kwargs, dict) else {}
    try:
        parsed: dict[str, Any] = conninfo_to_dict(conninfo, **kwargs)
    except Exception:  # psycopg will refuse it too, at the first connect
        parsed = {}
    given = {
        "host": _text(parsed.get("host")) or _text(parsed.get("hostaddr")),
        "port": _text(parsed.get("port")),
        "dbname": _text(parsed.get("dbname")),
    }
    found = from_environment(given)
    return postgres_target(found["host"], found["port"], found["dbname"])


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _lifetime(conn: Any) -> float | None:
    """Seconds since the pool opened ``conn`` (its own mark), None if unknown."""
    created = getattr(conn, "_created_at", None)
    return monotonic() - created if created is not None else None


def _checked_out_of(pool: Any) -> int:
    ledger: Ledger | None = pool._poolwatch_ledger
    if ledger is None:
        return 0
    out: list[Any] = list(ledger.active)
    return sum(1 for conn in out if getattr(conn, "_pool", None) is pool)


# -- hooks ---------------------------------------------------------------------------------
# Each factory returns the replacement for one psycopg_pool function, taking exactly its
# parameters (adapters/_patching.py checks them); an async twin is a thin shell over the
# same helpers. The getconn and putconn hooks are the hot path: no OpenTelemetry, no lock,
# no allocation beyond a float, and the ledger's hot-path contract (_ledger.py) inlined —
# into both twins of getconn and putconn, which differ by their await alone: a helper
# call there cost about 450 of the 3,500 instructions the getconn hook added (callgrind).
# Every statement of poolwatch's own is guarded, and the library's function is called
# exactly once, outside the guards.


def _failed(
    adapter: PsycopgPoolAdapter, pool: Any, ledger: Ledger | None, start: float, *, timeout: bool
) -> None:
    end = perf_counter()
    try:
        failed = _failed_connect.get()
        if failed is not None and failed() is pool:
            _failed_connect.set(None)
            timeout = False  # the connect made for this caller failed: not exhaustion
        if ledger is not None:
            ledger.failed(start, end, timeout=timeout)
    except Exception as error:
        adapter.report("psycopg_pool getconn", error)


def _getconn_hook(
    adapter: PsycopgPoolAdapter,
    original: Callable[..., Any],
    timeouts: tuple[type[BaseException], ...],
) -> Callable[..., Any]:
    report = adapter.report

    def getconn(self: Any, timeout: float | None = None) -> Any:
        try:
            ledger: Ledger | None = self._poolwatch_ledger
            if ledger is None:
                ledger = adapter._discover(self)
        except AttributeError:  # uninstrument() took the class default meanwhile
            ledger = None
        start = perf_counter()
        try:
            conn = original(self, timeout)
        except timeouts:
            _failed(adapter, self, ledger, start, timeout=True)
            raise
        except BaseException:
            _failed(adapter, self, ledger, start, timeout=False)
            raise
        if ledger is not None:
            try:
                # Ledger.acquired, inlined (the hot-path contract in _ledger.py): out
                # first, a connection's first checkout told next, counted last.
                now = perf_counter()
                ledger.active[conn] = now
                if not conn._poolwatch_used:
                    conn._poolwatch_used = True
                    ledger.firsts.append(None)
                ledger.waits.append(now - start)
                if now - start > ledger.span_threshold:  # a wait that waited: a span
                    ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                    ledger.stacks[conn] = capture_stack(sys._getframe(1))
            except Exception as error:
                report("psycopg_pool getconn", error)
        return conn

    return getconn


def _agetconn_hook(
    adapter: PsycopgPoolAdapter,
    original: Callable[..., Coroutine[Any, Any, Any]],
    timeouts: tuple[type[BaseException], ...],
) -> Callable[..., Coroutine[Any, Any, Any]]:
    report = adapter.report

    async def getconn(self: Any, timeout: float | None = None) -> Any:
        try:
            ledger: Ledger | None = self._poolwatch_ledger
            if ledger is None:
                ledger = adapter._discover(self)
        except AttributeError:  # uninstrument() took the class default meanwhile
            ledger = None
        start = perf_counter()
        try:
            conn = await original(self, timeout)
        except timeouts:
            _failed(adapter, self, ledger, start, timeout=True)
            raise
        except BaseException:
            _failed(adapter, self, ledger, start, timeout=False)
            raise
        if ledger is not None:
            try:
                # Ledger.acquired, inlined (the hot-path contract in _ledger.py): out
                # first, a connection's first checkout told next, counted last.
                now = perf_counter()
                ledger.active[conn] = now
                if not conn._poolwatch_used:
                    conn._poolwatch_used = True
                    ledger.firsts.append(None)
                ledger.waits.append(now - start)
                if now - start > ledger.span_threshold:  # a wait that waited: a span
                    ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                    ledger.stacks[conn] = capture_stack(sys._getframe(1))
            except Exception as error:
                report("psycopg_pool getconn", error)
        return conn

    return getconn


def _putconn_hook(adapter: PsycopgPoolAdapter, original: Callable[..., None]) -> Any:
    report = adapter.report

    def putconn(self: Any, conn: Any) -> None:
        try:
            ledger: Ledger | None = self._poolwatch_ledger
            # Ledger.released, inlined (the hot-path contract in _ledger.py), with one
            # check more: a connection of another pool stays out (psycopg refuses it).
            start = ledger.active.pop(conn, None) if ledger is not None else None
            if ledger is not None and start is not None:
                if conn._pool is not self:
                    ledger.active[conn] = start
                else:
                    held = perf_counter() - start
                    ledger.uses.append(held)
                    if held > ledger.leak_threshold:
                        ledger.settle(conn, held)
                    elif ledger.stacks:
                        ledger.stacks.pop(conn, None)
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("psycopg_pool putconn", error)
        original(self, conn)

    return putconn


def _aputconn_hook(
    adapter: PsycopgPoolAdapter, original: Callable[..., Coroutine[Any, Any, None]]
) -> Any:
    report = adapter.report

    async def putconn(self: Any, conn: Any) -> None:
        try:
            ledger: Ledger | None = self._poolwatch_ledger
            # Ledger.released, inlined (the hot-path contract in _ledger.py), with one
            # check more: a connection of another pool stays out (psycopg refuses it).
            start = ledger.active.pop(conn, None) if ledger is not None else None
            if ledger is not None and start is not None:
                if conn._pool is not self:
                    ledger.active[conn] = start
                else:
                    held = perf_counter() - start
                    ledger.uses.append(held)
                    if held > ledger.leak_threshold:
                        ledger.settle(conn, held)
                    elif ledger.stacks:
                        ledger.stacks.pop(conn, None)
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("psycopg_pool putconn", error)
        await original(self, conn)

    return putconn


def _connect_done(adapter: PsycopgPoolAdapter, pool: Any, duration: float, *, ok: bool) -> None:
    try:
        if not ok:
            _failed_connect.set(weakref.ref(pool))
        ledger: Ledger | None = pool._poolwatch_ledger
        if ledger is not None:
            # A null pool connects in the caller's getconn; a pool's workers, in no wait.
            # Told per connect: both kinds of pool may report into one series.
            ledger.connected(duration, ok=ok, in_wait=isinstance(pool, adapter._null))
    except Exception as error:
        adapter.report("psycopg_pool connect", error)


def _connect_hook(adapter: PsycopgPoolAdapter, original: Callable[..., Any]) -> Any:
    def _connect(self: Any, timeout: float | None = None) -> Any:
        start = perf_counter()
        try:
            conn = original(self, timeout)
        except BaseException:
            _connect_done(adapter, self, perf_counter() - start, ok=False)
            raise
        _connect_done(adapter, self, perf_counter() - start, ok=True)
        return conn

    return _connect


def _aconnect_hook(
    adapter: PsycopgPoolAdapter, original: Callable[..., Coroutine[Any, Any, Any]]
) -> Any:
    async def _connect(self: Any, timeout: float | None = None) -> Any:
        start = perf_counter()
        try:
            conn = await original(self, timeout)
        except BaseException:
            _connect_done(adapter, self, perf_counter() - start, ok=False)
            raise
        _connect_done(adapter, self, perf_counter() - start, ok=True)
        return conn

    return _connect


def _close_hook(adapter: PsycopgPoolAdapter, original: Callable[..., None]) -> Any:
    def _close_connection(self: Any, conn: Any) -> None:
        try:
            adapter._closing(self, conn, sys._getframe(1))
        except Exception as error:
            adapter.report("psycopg_pool close", error)
        original(self, conn)

    return _close_connection


def _aclose_hook(
    adapter: PsycopgPoolAdapter, original: Callable[..., Coroutine[Any, Any, None]]
) -> Any:
    async def _close_connection(self: Any, conn: Any) -> None:
        try:
            adapter._closing(self, conn, sys._getframe(1))
        except Exception as error:
            adapter.report("psycopg_pool close", error)
        await original(self, conn)

    return _close_connection


def _check_hook(adapter: PsycopgPoolAdapter, original: Callable[..., None]) -> Any:
    def check_connection(conn: Any) -> None:
        try:
            original(conn)
        except Exception:
            try:
                adapter._check_failed(conn, sys._getframe(1))
            except Exception as error:
                adapter.report("psycopg_pool check", error)
            raise

    return check_connection


def _acheck_hook(
    adapter: PsycopgPoolAdapter, original: Callable[..., Coroutine[Any, Any, None]]
) -> Any:
    async def check_connection(conn: Any) -> None:
        try:
            await original(conn)
        except BaseException:  # check() drops the connection on a cancellation too
            try:
                adapter._check_failed(conn, sys._getframe(1))
            except Exception as error:
                adapter.report("psycopg_pool check", error)
            raise

    return check_connection


def _open_hook(adapter: PsycopgPoolAdapter, original: Callable[..., None]) -> Any:
    def _open(self: Any) -> None:
        try:
            if not adapter.stopped and self._poolwatch_ledger is None:
                # Tracked before its first connection is opened, so that it is counted.
                adapter._track_pool(self, self._poolwatch_site)
        except Exception as error:
            adapter.report("psycopg_pool open", error)
        original(self)

    return _open


def _replace_hook(adapter: PsycopgPoolAdapter, original: Callable[..., None]) -> Any:
    def add_connection(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            caller = sys._getframe(CALLER)
            if caller.f_code.co_name == _RETURNED:
                adapter._replacing(caller)
        except Exception as error:
            adapter.report("psycopg_pool return", error)
        original(self, *args, **kwargs)

    return add_connection


def _init_hook(adapter: PsycopgPoolAdapter, original: Callable[..., None]) -> Any:
    def pool_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if not adapter.stopped:
            try:
                # Kept for _open, which runs inside __init__ when the pool opens at once.
                self._poolwatch_site = creation_site(sys._getframe(CALLER))
            except Exception as error:
                adapter.report("psycopg_pool pool", error)
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            if self._poolwatch_ledger is None:  # not opened yet: tracked now all the same
                adapter._track_pool(self, self._poolwatch_site)
        except Exception as error:
            adapter.report("psycopg_pool pool", error)

    return pool_init
