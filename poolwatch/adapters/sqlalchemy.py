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

import gc
import sys
import time
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, capture_stack
from poolwatch._naming import creation_site, target_name
from poolwatch.adapters._base import Adapter, Levels, Misconfiguration, Tracker, pop_attribute

_LEDGER = "_poolwatch_ledger"
_ORIGINAL = "__poolwatch_original__"
_REASON = "_poolwatch_close_reason"

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
        # Pools read their ledger as a plain attribute; the class default means "untracked".
        self._patch(base.Pool, _LEDGER, None)
        # Read on every close (a NullPool closes at every return): a default, not a raise.
        self._patch(record, _REASON, None)
        checkout = _checkout_hook(self, fairy.__dict__["_checkout"].__func__, exc.TimeoutError)
        self._patch(fairy, "_checkout", classmethod(checkout))
        self._patch(record, "checkin", _checkin_hook(self, record.checkin))
        self._patch(record, "invalidate", _invalidate_hook(self, record.invalidate))
        close = record.__dict__["_ConnectionRecord__close"]
        self._patch(record, "_ConnectionRecord__close", _close_hook(self, close))
        self._patch(Engine, "__init__", _engine_init_hook(self, Engine.__init__))
        self._patch(Engine, "dispose", _dispose_hook(self, Engine.dispose))
        if imported_before:
            self._track_existing(Engine)

    def uninstrument(self) -> None:
        for pool in list(self._tracked):
            pop_attribute(pool, _LEDGER)
            creator = getattr(pool, "_invoke_creator", None)
            original = getattr(creator, _ORIGINAL, None)
            if original is not None:
                pool._invoke_creator = original
        self._unpatch()

    # -- tracking ----------------------------------------------------------------------
    def _attach(self, pool: Any, ledger: Ledger) -> None:
        setattr(pool, _LEDGER, ledger)
        self._tracked.add(pool)
        creator = getattr(pool, "_invoke_creator", None)
        if creator is not None and not hasattr(creator, _ORIGINAL):
            pool._invoke_creator = _timed_creator(weakref.ref(pool), creator, self.tracker)

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
        target, attributes = engine_target(engine.url)
        return self._track_pool(engine.pool, target, site, attributes, name)

    def _track_replacement(self, old: Any, new: Any) -> None:
        """After ``dispose()``: the new pool joins the series, the old one leaves its levels.

        The old pool lingers until the garbage collector frees it, and after
        ``dispose(close=False)`` (a forked child's step) still holds the parent's open
        connections: counted, they would inflate idle and max. Connections checked out of
        it still report their use when they come back.
        """
        series = self.tracker.series_of(old)
        if series is None:
            return
        self._track_pool(new, series.target, series.site, dict(series.attributes), series.name)
        self.tracker.forget(old)

    def _discover(self, pool: Any) -> Ledger | None:
        """A pool first seen at checkout: made without an engine, or before instrument()."""
        try:
            dialect = getattr(pool._dialect, "name", None) or "dbapi"
            target = f"{dialect}://({type(pool).__name__})"
            return self._track_pool(pool, target, None, {})
        except Exception as error:
            self.tracker.report("sqlalchemy discover", error)
            return None

    def _track_existing(self, engine_cls: type) -> None:
        for obj in gc.get_objects():
            if type(obj) is engine_cls:
                try:
                    self._track_engine(obj, None)
                except Exception as error:
                    self.tracker.report("sqlalchemy existing engine", error)

    def track(self, obj: Any, name: str | None) -> bool:
        try:
            from sqlalchemy.engine.base import Engine
            from sqlalchemy.ext.asyncio import AsyncEngine
            from sqlalchemy.pool import Pool
        except ImportError:
            return False
        if isinstance(obj, AsyncEngine):
            obj = obj.sync_engine
        if isinstance(obj, Engine):
            self._track_engine(obj, None, name)
            return True
        if isinstance(obj, Pool):
            dialect = getattr(obj._dialect, "name", None) or "dbapi"
            self._track_pool(obj, f"{dialect}://({type(obj).__name__})", None, {}, name)
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
            record._poolwatch_close_reason = None
        lifetime = time.time() - record.starttime if record.starttime else None
        ledger.closed_connection(reason, lifetime)

    # -- levels ------------------------------------------------------------------------
    def levels(self, pool: Any) -> Levels:
        pools = self._pools  # sqlalchemy.pool, kept at instrument(): no import per reading
        if isinstance(pool, pools.QueuePool):
            return _queue_levels(pool)
        used = _checked_out_of(pool)
        if isinstance(pool, pools.AssertionPool):
            conn = getattr(pool, "_conn", None)
            idle = 1 if conn is not None and conn.dbapi_connection is not None and not used else 0
            return Levels(used, idle, 1, 0, 1, 0)
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
        records = _records_of(pool)
        started = [r.starttime for r in records if r.dbapi_connection is not None and r.starttime]
        return time.time() - min(started) if started else None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        found = (_driver_socket(r.dbapi_connection) for r in _records_of(pool))
        return tuple(fd for fd in found if fd is not None and fd >= 0)


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
# Each factory returns the replacement for one SQLAlchemy function. The checkout and checkin
# hooks are the hot path: no OpenTelemetry, no lock, no allocation beyond a float.


def _checkout_hook(
    adapter: SQLAlchemyAdapter, original: Callable[..., Any], timeout_error: type[BaseException]
) -> Callable[..., Any]:
    report = adapter.tracker.report

    def failed(ledger: Ledger | None, start: float, *, timeout: bool) -> None:
        if ledger is not None:
            try:
                ledger.failed(start, perf_counter(), timeout=timeout)
            except Exception as error:
                report("sqlalchemy checkout", error)

    def _checkout(cls: Any, pool: Any, threadconns: Any = None, fairy: Any = None) -> Any:
        if fairy is not None:  # re-entrant checkout of a connection already out
            return original(cls, pool, threadconns, fairy)
        ledger: Ledger | None = pool._poolwatch_ledger
        if ledger is None:
            ledger = adapter._discover(pool)
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
            # Ledger.acquired, inlined (the hot-path contract in _ledger.py): two atomic C
            # operations and no method call — measured in benchmarks/.
            now = perf_counter()
            ledger.waits.append(now - start)
            ledger.active[fairy._connection_record] = now
            if ledger.capture:  # this pool has leaked (or leak_stacks="always")
                ledger.stacks[fairy._connection_record] = capture_stack(sys._getframe(1))
        return fairy

    return _checkout


def _checkin_hook(adapter: SQLAlchemyAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    report = adapter.tracker.report

    def checkin(self: Any, _fairy_was_created: bool = True) -> None:
        ledger = self._ConnectionRecord__pool._poolwatch_ledger
        if ledger is not None:
            # Ledger.released, inlined (the hot-path contract in _ledger.py), with one
            # check more: a checked-in record whose fairy is already gone was returned by
            # SQLAlchemy's garbage-collection cleanup: the borrower dropped it unreturned.
            start = ledger.active.pop(self, None)
            if start is not None:
                held = perf_counter() - start
                fairy = self.fairy_ref
                if fairy is not None and fairy() is None:
                    _collected(ledger, self, held, report)
                    original(self, _fairy_was_created)
                    return
                ledger.uses.append(held)
                if held > ledger.leak_threshold:
                    try:
                        ledger.settle(self, held)
                    except Exception as error:
                        report("sqlalchemy checkin", error)
                elif ledger.stacks:
                    ledger.stacks.pop(self, None)
        original(self, _fairy_was_created)

    return checkin


def _collected(ledger: Ledger, record: Any, held: float, report: Callable[..., None]) -> None:
    try:
        ledger.collected(record, held)
    except Exception as error:
        report("sqlalchemy checkin", error)


def _invalidate_hook(
    adapter: SQLAlchemyAdapter, original: Callable[..., Any]
) -> Callable[..., Any]:
    def invalidate(self: Any, e: BaseException | None = None, soft: bool = False) -> None:
        if not soft and self.dbapi_connection is not None:
            try:
                setattr(self, _REASON, adapter._invalidate_reason(self, e))
            except Exception as error:
                adapter.tracker.report("sqlalchemy invalidate", error)
        original(self, e, soft)

    return invalidate


def _close_hook(adapter: SQLAlchemyAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def close(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            adapter._closing(self, sys._getframe(1))
        except Exception as error:
            adapter.tracker.report("sqlalchemy close", error)
        original(self, *args, **kwargs)

    return close


def _engine_init_hook(
    adapter: SQLAlchemyAdapter, original: Callable[..., Any]
) -> Callable[..., Any]:
    def engine_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            adapter._track_engine(self, creation_site(sys._getframe(1)))
        except Exception as error:
            adapter.tracker.report("sqlalchemy engine", error)

    return engine_init


def _dispose_hook(adapter: SQLAlchemyAdapter, original: Callable[..., Any]) -> Callable[..., Any]:
    def dispose(self: Any, *args: Any, **kwargs: Any) -> None:
        old = self.pool
        original(self, *args, **kwargs)
        try:
            if self.pool is not old:
                adapter._track_replacement(old, self.pool)
        except Exception as error:
            adapter.tracker.report("sqlalchemy dispose", error)

    return dispose


def _timed_creator(
    pool_ref: weakref.ref[Any], creator: Callable[[Any], Any], tracker: Tracker
) -> Callable[[Any], Any]:
    def create(record: Any) -> Any:
        start = perf_counter()
        try:
            connection = creator(record)
        except BaseException:
            _report_connect(pool_ref, perf_counter() - start, False, tracker)
            raise
        _report_connect(pool_ref, perf_counter() - start, True, tracker)
        return connection

    setattr(create, _ORIGINAL, creator)
    return create


def _report_connect(
    pool_ref: weakref.ref[Any], duration: float, ok: bool, tracker: Tracker
) -> None:
    try:
        pool = pool_ref()
        ledger = pool._poolwatch_ledger if pool is not None else None
        if ledger is not None:
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


def _records_of(pool: Any) -> list[Any]:
    """Every connection record of ``pool`` poolwatch can see: idle ones and checked-out ones."""
    ledger: Ledger | None = pool._poolwatch_ledger
    records: list[Any] = list(ledger.active) if ledger else []
    out = [r for r in records if r._ConnectionRecord__pool is pool]
    queue = getattr(pool, "_pool", None)
    if queue is not None and hasattr(queue, "not_empty"):
        out.extend(list(queue.queue))
    elif queue is not None:
        aqueue = queue.__dict__.get("_queue")
        out.extend(list(aqueue._queue) if aqueue is not None else [])
    for attribute in ("_all_conns", "_conn"):  # SingletonThreadPool, AssertionPool
        held = getattr(pool, attribute, None)
        if isinstance(held, set):
            out.extend(r for r in list(held) if r not in out)
        elif held is not None and held not in out:
            out.append(held)
    static = pool.__dict__.get("connection")  # StaticPool's one record, once made
    if static is not None and static not in out:
        out.append(static)
    return out


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
