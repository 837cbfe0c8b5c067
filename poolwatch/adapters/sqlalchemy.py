"""SQLAlchemy pools: every ``Pool`` of sync and async engines.

Where it hooks, and why there:

* ``Engine.__init__`` — learns a new engine's pool with its URL (for the name) and the
  place in user code that created it. ``Engine.dispose`` — the replacement pool keeps the
  series. Engines that existed before ``instrument()`` are found once by a heap walk;
  pools made without an engine are found at their first checkout.
* ``_ConnectionFairy._checkout`` (a real checkout, not a re-entrant one) — the caller's
  whole wait: queue wait, opening an overflow connection, recycle and pre-ping. SQLAlchemy
  fires no event before a caller starts waiting, so this needs a wrapper.
  ``sqlalchemy.exc.TimeoutError`` is the pool's timeout.
* ``_ConnectionRecord.checkin`` — end of use.
* ``_ConnectionRecord.invalidate`` / ``__close`` — closes by reason, and lifetimes.
* the pool's ``_invoke_creator`` — the DBAPI connect alone (not connect events).

Levels are read from the pool at collection time: ``QueuePool`` (and
``AsyncAdaptedQueuePool``) report used, idle, max (pool_size + max_overflow) and pending
(callers blocked on the queue). ``NullPool``, ``StaticPool`` and ``SingletonThreadPool``
never make a caller wait and enforce no limit: they report used and idle, no max, and
pending 0. ``AssertionPool`` has a max of 1.
"""

from __future__ import annotations

import functools
import sys
import time
import weakref
from collections.abc import Callable
from time import perf_counter
from types import FunctionType
from typing import Any

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, capture_stack
from poolwatch._models import Levels, Misconfiguration
from poolwatch._naming import creation_site, target_name
from poolwatch.adapters._base import Adapter, Tracker, heap_objects, pop_attribute
from poolwatch.adapters._patching import CALLER, around

_LEDGER = "_poolwatch_ledger"
_ORIGINAL = "__poolwatch_original__"
_REASON = "_poolwatch_close_reason"
_FRESH = "_poolwatch_fresh"
"""On a ``_ConnectionRecord``: its connection was opened and has served no checkout yet. Set
by the connect, deleted by the checkout: only idle records can hold it, which
``uninstrument()`` clears."""

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def engine_target(url: Any) -> tuple[str, dict[str, str | int]]:
    """Credential-free target and server attributes of a SQLAlchemy URL."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database
        if not database or database == ":memory:":
            return "sqlite://:memory:", {}
        return f"sqlite:///{database}", {}
    host = url.host
    port = url.port or _DEFAULT_PORTS.get(backend)
    attributes: dict[str, str | int] = {}
    if host:
        attributes[c.SERVER_ADDRESS] = host
        if port:
            attributes[c.SERVER_PORT] = port
    return target_name(backend, host, port, url.database), attributes


class SQLAlchemyAdapter(Adapter):
    """Hooks SQLAlchemy's pool internals (SQLAlchemy 2.x)."""

    name = "sqlalchemy"
    kind = "sqlalchemy"
    module = "sqlalchemy"
    connects_in_checkout = True
    tells_firsts = True
    connects_in_wait = True
    family = "database"
    requires = ("sqlalchemy >= 2.0.0, < 2.2",)

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(tracker)
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._pools: Any = None

    # -- patching ----------------------------------------------------------------------
    def instrument(self, *, imported_before: bool) -> None:
        import sqlalchemy.pool
        from sqlalchemy import exc
        from sqlalchemy.engine.base import Engine
        from sqlalchemy.pool import base

        self._pools = sqlalchemy.pool
        record, fairy = base._ConnectionRecord, base._ConnectionFairy
        timeout = exc.TimeoutError
        # Pools read their ledger as a plain attribute; the class default means "untracked".
        self._patch(base.Pool, _LEDGER, None)
        # Read on every close (a NullPool closes at every return): a default, not a raise.
        self._patch(record, _REASON, None)
        # Read at every checkout: a record connected before instrument() is no first.
        self._patch(record, _FRESH, False)
        self._hook(fairy, "_checkout", lambda original: _checkout_hook(self, original, timeout))
        self._hook(record, "checkin", lambda original: _checkin_hook(self, original))
        self._hook(record, "invalidate", lambda original: _invalidate_hook(self, original))
        self._hook(record, "_ConnectionRecord__close", lambda original: _close_hook(self, original))
        self._wrap(Engine, "__init__", lambda original: _engine_init_hook(self, original))
        self._wrap(Engine, "dispose", lambda original: _dispose_hook(self, original))
        if imported_before:
            self._track_existing(Engine)

    def _forget_pools(self) -> None:
        for pool in list(self._tracked):
            try:
                for record in self._records_of(pool):  # idle ones may hold a mark
                    pop_attribute(record, _FRESH)
                    pop_attribute(record, _REASON)
            except Exception as error:
                self.report("sqlalchemy uninstrument", error)
            pop_attribute(pool, _LEDGER)
            creator = getattr(pool, "_invoke_creator", None)
            original = getattr(creator, _ORIGINAL, None)
            if original is not None:
                pool._invoke_creator = original

    # -- tracking ----------------------------------------------------------------------
    def _attach(self, pool: Any, ledger: Ledger) -> None:
        setattr(pool, _LEDGER, ledger)
        self._tracked.add(pool)
        creator = getattr(pool, "_invoke_creator", None)
        if creator is not None and not hasattr(creator, _ORIGINAL):
            pool._invoke_creator = _timed_creator(weakref.ref(pool), creator, self.tracker)

    def _pool_target(self, pool: Any, dialect: Any = None) -> str:
        """The name of a pool known without its engine's URL."""
        dialect = dialect or getattr(pool, "_dialect", None)
        return f"{getattr(dialect, 'name', None) or 'dbapi'}://({type(pool).__name__})"

    def _track_pool(
        self,
        pool: Any,
        target: str,
        site: str | None,
        attributes: dict[str, str | int],
        name: str | None = None,
    ) -> Ledger:
        ledger = self.tracker.track(
            pool, self, target=target, site=site, name=name, attributes=attributes
        )
        self._attach(pool, ledger)
        return ledger

    def _track_engine(self, engine: Any, site: str | None, name: str | None = None) -> Ledger:
        try:
            target, attributes = engine_target(engine.url)
        except Exception:  # not a sqlalchemy URL (an Engine made by hand, as in its tests)
            target, attributes = self._pool_target(engine.pool, engine.dialect), {}
        return self._track_pool(engine.pool, target, site, attributes, name)

    def _track_replacement(self, old: Any, new: Any) -> None:
        """After ``dispose()``: the new pool joins the series, the old one leaves its levels.

        The old pool lingers until the garbage collector frees it, and after
        ``dispose(close=False)`` (a forked child's step) still holds the parent's open
        connections: counted, they would inflate idle and max. Connections checked out of
        it still report their use when they come back.
        """
        ledger = self.tracker.replace(old, new)
        if ledger is not None:
            self._attach(new, ledger)

    def _discover(self, pool: Any) -> Ledger | None:
        """A pool first seen at checkout: made without an engine, or before instrument()."""
        if self.stopped:  # a hook still running after uninstrument(): track nothing new
            return None
        try:
            return self._track_pool(pool, self._pool_target(pool), None, {})
        except Exception as error:
            self.report("sqlalchemy discover", error)
            return None

    def _track_existing(self, engine_cls: type) -> None:
        for obj in heap_objects(lambda cls: cls is engine_cls):
            try:
                self._track_engine(obj, None)
            except Exception as error:
                self.report("sqlalchemy existing engine", error)

    def track(self, obj: Any, name: str | None) -> bool:
        from sqlalchemy.engine.base import Engine
        from sqlalchemy.pool import Pool

        # Checked only when SQLAlchemy's asyncio extension is imported: importing it needs
        # greenlet, which a sync-only application may not have — and an object of its
        # class can only exist once it is imported.
        asyncio_ext = sys.modules.get("sqlalchemy.ext.asyncio")
        if asyncio_ext is not None and isinstance(obj, asyncio_ext.AsyncEngine):
            obj = obj.sync_engine
        if isinstance(obj, Engine):
            self._track_engine(obj, None, name)
            return True
        if isinstance(obj, Pool):
            self._track_pool(obj, self._pool_target(obj), None, {}, name)
            return True
        return False

    # -- closes ------------------------------------------------------------------------
    def _invalidate_reason(self, record: Any, error: BaseException | None) -> str:
        from sqlalchemy import exc

        if isinstance(error, exc.DisconnectionError):
            return c.REASON_STALE  # pre-ping found the connection dead
        if error is not None:
            dialect = record._ConnectionRecord__pool._dialect
            is_disconnect = getattr(dialect, "is_disconnect", None)
            if is_disconnect is not None and is_disconnect(error, record.dbapi_connection, None):
                return c.REASON_STALE
            return c.REASON_ERROR
        return c.REASON_INVALIDATED

    def _closing(self, record: Any, caller: Any) -> None:
        pool = record._ConnectionRecord__pool
        ledger: Ledger | None = pool._poolwatch_ledger
        if ledger is None or record.dbapi_connection is None:
            return
        reason = record._poolwatch_close_reason  # the class default is None: never raises
        if reason is None:
            reason = _close_reason(record, pool, caller)
        else:
            del record._poolwatch_close_reason  # the class default (None) shows again
        lifetime = time.time() - record.starttime if record.starttime else None
        ledger.closed_connection(reason, lifetime)

    # -- levels ------------------------------------------------------------------------
    def levels(self, pool: Any) -> Levels:
        pools = self._pools  # sqlalchemy.pool, kept at instrument(): no import per reading
        if isinstance(pool, pools.QueuePool):
            return _queue_levels(pool)
        if isinstance(pool, pools.AssertionPool):  # it knows whether its one is out
            used = 1 if pool._checked_out else 0
            conn = pool._conn
            idle = 1 if conn is not None and conn.dbapi_connection is not None and not used else 0
            return Levels(used, idle, 1, 0, 1, 0)
        # The other pools keep no record of what is checked out: poolwatch's own table
        # (checkouts made before instrument() are not in it).
        used = _checked_out_of(pool)
        if isinstance(pool, pools.StaticPool):
            record = pool.__dict__.get("connection")
            opened = record is not None and record.dbapi_connection is not None
            return Levels(used, 1 if opened and not used else 0, None, 0)
        if isinstance(pool, pools.SingletonThreadPool):
            open_count = sum(1 for r in list(pool._all_conns) if r.dbapi_connection is not None)
            return Levels(used, max(open_count - used, 0), None, 0)
        return Levels(used, 0, None, 0)  # NullPool and unknown pools: nothing kept idle

    # -- diagnostics -------------------------------------------------------------------
    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        if not isinstance(pool, self._pools.QueuePool):
            return ()  # the others never make a caller wait and have no limit by design
        found = []
        if pool._max_overflow < 0:
            found.append(Misconfiguration(c.ANTIPATTERN_UNBOUNDED_POOL, "max_overflow=-1"))
        if pool._timeout is None:
            found.append(Misconfiguration(c.ANTIPATTERN_NO_POOL_TIMEOUT, "pool_timeout=None"))
        return tuple(found)

    def oldest_connection(self, pool: Any) -> float | None:
        records = self._records_of(pool)
        started = [r.starttime for r in records if r.dbapi_connection is not None and r.starttime]
        return time.time() - min(started) if started else None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = (_driver_socket(r.dbapi_connection) for r in self._records_of(pool))
        return tuple(fd for fd in found if fd is not None and fd >= 0)

    def _records_of(self, pool: Any) -> list[Any]:
        """Every connection record of ``pool`` poolwatch can see: checked out, then idle."""
        pools = self._pools
        ledger: Ledger | None = pool._poolwatch_ledger
        records: list[Any] = list(ledger.active) if ledger else []
        out = [r for r in records if r._ConnectionRecord__pool is pool]
        if isinstance(pool, pools.QueuePool):
            queue = pool._pool
            if hasattr(queue, "not_empty"):  # threading queue
                out.extend(list(queue.queue))
            else:  # asyncio queue, created lazily on first use
                aqueue = queue.__dict__.get("_queue")
                out.extend(list(aqueue._queue) if aqueue is not None else [])
            return out
        if isinstance(pool, pools.SingletonThreadPool):  # _conn is a threading.local
            held = [r for r in list(pool._all_conns) if r not in out]
        elif isinstance(pool, pools.AssertionPool):
            held = [pool._conn] if pool._conn is not None else []
        elif isinstance(pool, pools.StaticPool):  # its one record, once made
            static = pool.__dict__.get("connection")
            held = [static] if static is not None else []
        else:  # NullPool keeps nothing
            held = []
        out.extend(r for r in held if r not in out)
        return out


def _driver_socket(dbapi_connection: Any) -> int | None:
    """The file descriptor of a DBAPI connection's socket, where the driver tells it without
    I/O: ``fileno()`` (psycopg, psycopg2), or an asyncio transport (asyncpg)."""
    if dbapi_connection is None:
        return None
    fileno = getattr(dbapi_connection, "fileno", None)
    if callable(fileno):
        value = fileno()
        return value if isinstance(value, int) else None
    driver = getattr(dbapi_connection, "driver_connection", None)  # async adaptations
    transport = getattr(driver, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock.fileno() if sock is not None else None


# -- hooks ---------------------------------------------------------------------------------
# Each factory returns the replacement for one SQLAlchemy function, taking exactly its
# parameters (adapters/_patching.py checks them). The checkout and checkin hooks are the hot
# path: no OpenTelemetry, no lock, no allocation beyond a float. Every statement of
# poolwatch's own is guarded, and the library's function is called exactly once, outside
# the guards: a hook still running when uninstrument() removes the marks and class defaults
# it reads (a thread in the middle of a checkout) loses that one reading, never the call.


def _checkout_hook(
    adapter: SQLAlchemyAdapter, original: Callable[..., Any], timeout_error: type[BaseException]
) -> Callable[..., Any]:
    report = adapter.report

    def failed(ledger: Ledger | None, start: float, *, timeout: bool) -> None:
        if ledger is not None:
            try:
                ledger.failed(start, perf_counter(), timeout=timeout)
            except Exception as error:
                report("sqlalchemy checkout", error)

    def _checkout(cls: Any, pool: Any, threadconns: Any = None, fairy: Any = None) -> Any:
        if fairy is not None:  # re-entrant checkout of a connection already out
            return original(cls, pool, threadconns, fairy)
        try:
            ledger: Ledger | None = pool._poolwatch_ledger
            if ledger is None:
                ledger = adapter._discover(pool)
        except AttributeError:  # uninstrument() took the class default meanwhile
            ledger = None
        start = perf_counter()
        try:
            fairy = original(cls, pool, threadconns, fairy)
        except timeout_error:
            failed(ledger, start, timeout=True)
            raise
        except BaseException:
            failed(ledger, start, timeout=False)
            raise
        if ledger is not None:
            try:
                # Ledger.acquired, inlined (the hot-path contract in _ledger.py): two atomic
                # C operations and no method call — measured in benchmarks/.
                now = perf_counter()
                record = fairy._connection_record
                ledger.active[record] = now
                if record._poolwatch_fresh:  # this checkout has its connection's first use
                    del record._poolwatch_fresh  # the class default (False) shows again
                    ledger.firsts.append(None)
                ledger.waits.append(now - start)
                if now - start > ledger.span_threshold:  # a wait that waited: a span
                    ledger.slow_wait(start, now, c.OUTCOME_ACQUIRED)
                if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                    ledger.stacks[record] = capture_stack(sys._getframe(1))
            except Exception as error:
                report("sqlalchemy checkout", error)
        return fairy

    return _checkout


def _checkin_hook(adapter: SQLAlchemyAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    report = adapter.report

    def checkin(self: Any, _fairy_was_created: bool = True) -> None:
        try:
            _returned(self, report)
        except Exception as error:  # AttributeError: uninstrument() ran meanwhile
            report("sqlalchemy checkin", error)
        original(self, _fairy_was_created)

    return checkin


def _returned(record: Any, report: Callable[[str, BaseException], None]) -> None:
    """``record`` is being checked in: its use ends."""
    ledger = record._ConnectionRecord__pool._poolwatch_ledger
    if ledger is None:
        return
    # Ledger.released, inlined (the hot-path contract in _ledger.py), with one check more:
    # a checked-in record whose fairy is already gone was returned by SQLAlchemy's
    # garbage-collection cleanup: the borrower dropped it unreturned.
    start = ledger.active.pop(record, None)
    if start is None:
        return
    held = perf_counter() - start
    fairy = record.fairy_ref
    if fairy is not None and fairy() is None:
        ledger.collected(record, held)
        return
    ledger.uses.append(held)
    if held > ledger.leak_threshold:
        ledger.settle(record, held)
    elif ledger.stacks:
        ledger.stacks.pop(record, None)


def _invalidate_hook(
    adapter: SQLAlchemyAdapter, original: Callable[..., Any]
) -> Callable[..., Any]:
    def invalidate(self: Any, e: BaseException | None = None, soft: bool = False) -> None:
        try:
            if not soft and self.dbapi_connection is not None:
                setattr(self, _REASON, adapter._invalidate_reason(self, e))
        except Exception as error:
            adapter.report("sqlalchemy invalidate", error)
        original(self, e, soft)

    return invalidate


def _close_hook(adapter: SQLAlchemyAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def close(self: Any, *, terminate: bool = False) -> None:
        try:
            adapter._closing(self, sys._getframe(1))
        except Exception as error:
            adapter.report("sqlalchemy close", error)
        original(self, terminate=terminate)

    return close


def _engine_init_hook(
    adapter: SQLAlchemyAdapter, original: Callable[..., Any]
) -> Callable[..., Any]:
    def engine_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            adapter._track_engine(self, creation_site(sys._getframe(CALLER)))
        except Exception as error:
            adapter.report("sqlalchemy engine", error)

    return engine_init


def _dispose_hook(adapter: SQLAlchemyAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def dispose(self: Any, *args: Any, **kwargs: Any) -> None:
        old = self.pool
        original(self, *args, **kwargs)
        if adapter.stopped:
            return
        try:
            if self.pool is not old:
                adapter._track_replacement(old, self.pool)
        except Exception as error:
            adapter.report("sqlalchemy dispose", error)

    return dispose


def _timed_creator(
    pool_ref: weakref.ref[Any], creator: Callable[..., Any], tracker: Tracker
) -> Callable[..., Any]:
    """A pool's ``_invoke_creator`` (the DBAPI connect), timed. SQLAlchemy passes it the
    ``_ConnectionRecord`` it connects, which a successful connect marks: the checkout that
    gets the record next is its connection's first (``Adapter.tells_firsts``)."""

    def create(*args: Any, **kwargs: Any) -> Any:
        start = perf_counter()
        try:
            connection = creator(*args, **kwargs)
        except BaseException:
            _report_connect(pool_ref, perf_counter() - start, False, tracker)
            raise
        _report_connect(pool_ref, perf_counter() - start, True, tracker, args[0] if args else None)
        return connection

    if isinstance(creator, FunctionType):  # SQLAlchemy's lambda, or the user's creator
        timed: Callable[..., Any] = around(creator, create)
    else:  # a callable object of the user's: the wrapper only dresses as it
        timed = functools.update_wrapper(create, creator)
    setattr(timed, _ORIGINAL, creator)
    return timed


def _report_connect(
    pool_ref: weakref.ref[Any], duration: float, ok: bool, tracker: Tracker, record: Any = None
) -> None:
    try:
        pool = pool_ref()
        ledger = pool._poolwatch_ledger if pool is not None else None
        if ledger is not None:
            if record is not None:
                setattr(record, _FRESH, True)
            ledger.connected(duration, ok=ok)
    except Exception as error:
        tracker.report("sqlalchemy connect", error)


def _close_reason(record: Any, pool: Any, caller: Any) -> str:
    """Why ``record`` is being closed, told by who asked (``caller`` is that frame)."""
    name = caller.f_code.co_name
    if name == "get_connection":  # about to reconnect on checkout
        if pool._recycle > -1 and time.time() - record.starttime > pool._recycle:
            return c.REASON_MAX_LIFETIME
        if pool._invalidate_time > record.starttime:
            return c.REASON_STALE  # the pool saw a disconnect: older connections are suspect
        return c.REASON_INVALIDATED  # soft invalidation
    if name == "invalidate":
        return c.REASON_INVALIDATED
    from sqlalchemy.pool import NullPool

    returned = caller.f_back is not None and caller.f_back.f_code.co_name in (
        "_do_return_conn",
        "_cleanup",
    )
    if name == "close" and returned and not isinstance(pool, NullPool):
        return c.REASON_POOL_FULL  # returned to a full pool: overflow connection closed
    return c.REASON_DISPOSED  # dispose(), or a NullPool closing on return by design


def _checked_out_of(pool: Any) -> int:
    ledger: Ledger | None = pool._poolwatch_ledger
    if ledger is None:
        return 0
    records: list[Any] = list(ledger.active)
    return sum(1 for record in records if record._ConnectionRecord__pool is pool)


def _queue_levels(pool: Any) -> Levels:
    queue = pool._pool
    size = queue.maxsize
    overflow = pool._max_overflow
    bounded = size > 0 and overflow > -1
    if hasattr(queue, "not_empty"):  # threading queue
        records = list(queue.queue)
        pending = len(queue.not_empty._waiters)
    else:  # asyncio queue, created lazily on first use
        aqueue = queue.__dict__.get("_queue")
        records = list(aqueue._queue) if aqueue is not None else []
        getters = list(aqueue._getters) if aqueue is not None else []
        pending = sum(1 for g in getters if not g.done())
    idle = len([r for r in records if r.dbapi_connection is not None])
    used = size - len(records) + pool._overflow
    return Levels(
        used=max(used, 0),
        idle=idle,
        max=size + overflow if bounded else None,
        pending=pending,
        idle_max=size if size > 0 else None,
        idle_min=0,
    )
