"""Ground truth for SQLAlchemy pools: every exported figure against the pool, the workload
and the server (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED`` replays a run).

Each randomized run drives two engines on one database from worker threads (or tasks):
``waits``, with a long pool timeout, whose exhausted callers block and show as pending;
``fails``, with a short one, whose callers time out. Operations, chosen at random: a
checkout used and returned, a checkout held across operations (and across pauses),
released later; an exception raised inside a checkout; a statement the database rejects;
an invalidation; on PostgreSQL, the server terminating a held connection's backend; with
an outage, connects that fail for real (SQLite cannot open a database file in a directory
that does not exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, exc, pool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolwatch
from tests.support.postgres import PostgresCluster
from tests.support.threads import blocked_in
from tests.support.truth import (
    Comparison,
    Racing,
    Readers,
    Seeded,
    Tally,
    TaskGate,
    ThreadGate,
    assert_cycled_cleanly,
    class_attributes,
    cycle,
    deadline_after,
    drive_threads,
    figures,
    pause_moments,
    poolwatch_frames,
    settle,
)

# Bounds: every loop stops at a count or a time, whichever comes first (the CI budget of
# the whole ground-truth suite is about 150 s on a two-core machine; the soak,
# benchmarks/soak.py, runs the same workloads for minutes).
OPERATIONS = 600
"""Operations of one randomized run, over all its workers (and at most ``SECONDS``)."""
SECONDS = 6.0
PAUSES = 8
"""Pauses at random moments of a run, each comparing every figure of both pools."""
WORKERS = 6
WAITS_POOL = (2, 1, 30.0)
"""pool_size, max_overflow, pool_timeout of the ``waits`` engine: exhausted callers block."""
FAILS_POOL = (2, 1, 0.02)
"""The same for ``fails``: exhausted callers time out after 20 ms."""
_FRESH = "truth.fresh"
"""In a connection record's ``info``: opened by the pool, not checked out since."""
PER_CALL_ENGINES = 400
"""Engines made, used once and dropped, one per call (at most ``PER_CALL_SECONDS``)."""
PER_CALL_SECONDS = 5.0
CYCLES = 40
"""instrument()/uninstrument() cycles while workers check out (at most ``CYCLE_SECONDS``)."""
CYCLE_SECONDS = 5.0


class Injected(Exception):
    """An exception the workload raises inside a checkout on purpose."""


# -- the workload ----------------------------------------------------------------------------
@dataclass
class Outage:
    """Connects fail while ``down``: the dialect's connect is given an address it cannot
    open (a ``do_connect`` listener, SQLAlchemy's own hook for it)."""

    down: bool = False
    enabled: bool = False


@dataclass
class Pool:
    """One engine of a run and what the library itself reported about it."""

    label: str
    engine: sa.Engine
    size: int
    overflow: int
    long_wait: bool
    app_name: str | None = None
    tally: Tally = field(default_factory=Tally)

    def listen(self) -> None:
        """The pool's own events: every successful connect, and every close it makes with
        the library's function that made it (``library_closes.<function>``)."""
        event.listen(self.engine, "connect", self._connected)
        event.listen(self.engine, "close", self._closed)

    def _connected(self, _dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH] = True  # its next checkout is the connection's first
        self.tally.add("library_connects")

    def checked_out(self, connection: Any) -> None:
        """The workload got ``connection`` (a pool's proxied connection): one checkout,
        and its connection's first if the pool opened it since its last checkout. Not
        checkouts less connects: one checkout can open two connections (SQLAlchemy
        reconnects when a checkout finds its connection dead) or open one and fail."""
        if connection.info.pop(_FRESH, False):
            self.tally.add("firsts")
        self.tally.add("checkouts")

    def _closed(self, *_: Any) -> None:
        self.tally.add("library_closes")
        self.tally.add(f"library_closes.{_closed_by(sys._getframe(1))}")

    def closes_by(self, function: str) -> int:
        return self.tally[f"library_closes.{function}"]


_CLOSERS = {
    "get_connection": "recycle",  # a checkout found it older than the pool's last disconnect
    "invalidate": "invalidate",
    "_do_return_conn": "return",  # QueuePool: back to a full pool; NullPool: every return
    "_cleanup": "return",  # SingletonThreadPool: past pool_size threads
    "dispose": "dispose",
}


def _closed_by(frame: FrameType | None) -> str:
    """Which of SQLAlchemy's own functions closed a connection: the first known one up
    the stack from the pool's close event (its record's ``__close``)."""
    for _ in range(12):
        if frame is None:
            break
        found = _CLOSERS.get(frame.f_code.co_name)
        if found is not None:
            return found
        frame = frame.f_back
    return "other"


@dataclass
class Held:
    connection: sa.Connection
    pid: int | None


class Admin:
    """A connection outside SQLAlchemy: the server's view, and terminating backends."""

    def __init__(self, pg: PostgresCluster) -> None:
        import psycopg

        self._lock = threading.Lock()
        self._conn = psycopg.connect(
            host=pg.host,
            port=pg.port,
            user=pg.user,
            password=pg.password,
            dbname=pg.dbname,
            autocommit=True,
        )

    def backends(self, app_name: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            ).fetchone()
        assert row is not None
        return int(row[0])

    def terminate(self, pid: int) -> None:
        with self._lock:
            row = self._conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        assert row == (True,)

    def gone(self, pid: int) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
        return row == (0,)

    def close(self) -> None:
        self._conn.close()


class Workload:
    """Worker threads making random operations on the pools, counting what they see."""

    def __init__(
        self,
        rng: Seeded,
        pools: list[Pool],
        *,
        admin: Admin | None = None,
        outage: Outage | None = None,
    ) -> None:
        self.rng = rng
        self.pools = pools
        self.admin = admin
        self.outage = outage or Outage()
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)

    # One pool's counts live in its own Tally; operations in the workload's.
    def _checkout(self, p: Pool) -> sa.Connection | None:
        try:
            conn = p.engine.connect()
        except exc.TimeoutError as error:
            p.tally.add("timeouts")
            if p.long_wait:
                self.tally.unexpected_error(f"{p.label} checkout", error)
            return None
        except exc.OperationalError as error:
            if not self.outage.enabled:
                self.tally.unexpected_error(f"{p.label} checkout", error)
            p.tally.add("checkout_errors")
            return None
        p.checked_out(conn.connection)
        return conn

    def _return(self, p: Pool, conn: sa.Connection) -> None:
        conn.close()
        p.tally.add("returns")

    def _pid(self, conn: sa.Connection) -> int | None:
        if self.admin is None:
            return None
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        assert isinstance(pid, int)
        return pid

    def use(self, p: Pool, held: list[Held], r: random.Random) -> None:
        conn = self._checkout(p)
        if conn is not None:
            conn.execute(sa.text("SELECT 1")).scalar()
            self._return(p, conn)

    def hold(self, p: Pool, held: list[Held], r: random.Random) -> None:
        conn = self._checkout(p)
        if conn is not None:
            held.append(Held(conn, self._pid(conn)))
            p.tally.add("held")

    def release(self, p: Pool, held: list[Held], r: random.Random) -> None:
        taken = held.pop(r.randrange(len(held)))
        p.tally.add("held", -1)
        self._return(p, taken.connection)

    def raise_inside(self, p: Pool, held: list[Held], r: random.Random) -> None:
        conn = self._checkout(p)
        if conn is None:
            return
        with contextlib.suppress(Injected), conn:
            conn.execute(sa.text("SELECT 1"))
            raise Injected("raised inside a checkout")
        p.tally.add("returns")

    def bad_statement(self, p: Pool, held: list[Held], r: random.Random) -> None:
        conn = self._checkout(p)
        if conn is None:
            return
        with contextlib.suppress(exc.OperationalError, exc.ProgrammingError):
            conn.execute(sa.text("SELECT * FROM truth_no_such_table"))
        self._return(p, conn)

    def invalidate(self, p: Pool, held: list[Held], r: random.Random) -> None:
        conn = self._checkout(p)
        if conn is None:
            return
        conn.invalidate()
        p.tally.add("invalidated")
        self._return(p, conn)

    def kill(self, p: Pool, held: list[Held], r: random.Random) -> None:
        """The server ends a held connection's backend; the next statement finds it."""
        assert self.admin is not None
        taken = held.pop(r.randrange(len(held)))
        p.tally.add("held", -1)
        assert taken.pid is not None
        self.admin.terminate(taken.pid)
        if not settle(lambda: self.admin is not None and self.admin.gone(taken.pid or 0)):
            raise AssertionError(f"backend {taken.pid} still there after pg_terminate_backend")
        try:
            taken.connection.execute(sa.text("SELECT 1"))
        except exc.OperationalError as error:
            if not error.connection_invalidated:
                self.tally.unexpected_error("kill", error)
        else:
            self.tally.unexpected_error("kill", AssertionError("a killed backend answered"))
        p.tally.add("killed")
        self._return(p, taken.connection)

    def fail_connects(self, p: Pool, held: list[Held], r: random.Random) -> None:
        """An outage: invalidations make the pool reconnect while connects are refused."""
        self.outage.down = True
        try:
            for _ in range(r.randint(1, 4)):
                self.invalidate(p, held, r)
        finally:
            self.outage.down = False

    def choose(
        self, r: random.Random, held: dict[str, list[Held]]
    ) -> tuple[Callable[[Pool, list[Held], random.Random], None], Pool]:
        p = r.choice(self.pools)
        mine = held[p.label]
        if mine and (p.long_wait or r.random() < 0.4):
            # Holding a connection of a pool whose callers block: never ask it for
            # another (two holders each waiting for the other's would deadlock).
            if self.admin is not None and r.random() < 0.25:
                return self.kill, p
            return self.release, p
        choices: list[tuple[Callable[[Pool, list[Held], random.Random], None], int]] = [
            (self.use, 30),
            (self.hold, 20 if len(mine) < 2 else 0),
            (self.raise_inside, 8),
            (self.bad_statement, 6),
            (self.invalidate, 6),
            (self.fail_connects, 4 if self.outage.enabled else 0),
        ]
        ops, weights = zip(*choices, strict=True)
        return r.choices(ops, weights)[0], p

    def worker(self, index: int, gate: ThreadGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: dict[str, list[Held]] = {p.label: [] for p in self.pools}
        by_label = {p.label: p for p in self.pools}
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                gate.checkpoint()
                if gate.stopping:
                    break
                op, p = self.choose(r, held)
                try:
                    op(p, held[p.label], r)
                except Exception as error:
                    self.tally.unexpected_error(op.__name__, error)
                self.tally.add("operations")
        finally:
            for label, mine in held.items():
                for taken in mine:
                    by_label[label].tally.add("held", -1)
                    self._return(by_label[label], taken.connection)


# -- the comparison --------------------------------------------------------------------------
def _idle_in_pool(engine: sa.Engine) -> int:
    queue = engine.pool._pool  # type: ignore[attr-defined]
    return sum(1 for record in list(queue.queue) if record.dbapi_connection is not None)


def compare(
    label: str,
    rng: Seeded,
    readers: Readers,
    p: Pool,
    *,
    pending: int,
    admin: Admin | None,
    outage: Outage,
) -> None:
    lib: Any = p.engine.pool
    t = p.tally
    used_lib = lib.checkedout()
    idle_lib = _idle_in_pool(p.engine)
    server: dict[str, int | None] = {}
    if admin is not None and p.app_name is not None:
        # A backend ends a moment after its client closes: the server's count settles.
        app = p.app_name
        settle(lambda: admin.backends(app) == used_lib + idle_lib)
        server["server"] = admin.backends(app) - used_lib
    got = figures(readers.collect_settled(), p.label)
    cmp = Comparison(f"{label}: pool {p.label!r}", rng, got)
    cmp.expect("used", workload=t["held"], library=used_lib)
    cmp.expect("idle", library=idle_lib, **server)
    cmp.expect("max", workload=p.size + p.overflow, library=lib.size() + lib._max_overflow)
    cmp.expect("pending", workload=pending, library=len(lib._pool.not_empty._waiters))
    cmp.expect("checkouts", workload=t["checkouts"])
    cmp.expect("uses", workload=t["returns"])
    cmp.expect("wait_timeouts", workload=t["timeouts"])
    cmp.expect("timeouts", workload=t["timeouts"])
    cmp.expect("wait_errors", workload=t["checkout_errors"])
    cmp.expect("connects", library=t["library_connects"])
    cmp.expect("connect_errors", workload=t["refused"] if outage.enabled else 0)
    # Every checkout that was not its connection's first reused one.
    cmp.expect("reused", workload=t["checkouts"] - t["firsts"])
    cmp.expect("leaks", workload=0)
    _expect_closes(cmp, p, killed=t["killed"])
    cmp.check()


def _expect_closes(cmp: Comparison, p: Pool, *, killed: int = 0) -> None:
    """Closes by reason against the workload and the library's account of each close.

    A close is the workload's invalidation (invalidated) or the server ending a backend
    (a disconnect: stale), both through ``invalidate``; after a disconnect SQLAlchemy also
    recycles, at their next checkout, every connection opened before it (stale: the pool
    saw a disconnect); an overflow connection back to a full pool is closed (pool_full) —
    for a NullPool every connection back (disposed, by design); ``dispose()`` (disposed).
    """
    t = p.tally
    returned = p.closes_by("return")
    null = isinstance(p.engine.pool, pool.NullPool)
    cmp.closes(
        {
            "invalidated": t["invalidated"],
            "stale": killed + p.closes_by("recycle"),
            "pool_full": 0 if null else returned,
            "disposed": p.closes_by("dispose") + (returned if null else 0),
        },
        "workload",
    )
    cmp.agree(
        "invalidations",
        workload=t["invalidated"] + killed,
        library=p.closes_by("invalidate"),
    )
    cmp.agree("unexplained closes", library=p.closes_by("other"), workload=0)
    cmp.expect("lifetimes", library=t["library_closes"])


def _engines(
    url: str,
    *,
    outage: Outage,
    refused_url: str | None,
    app_names: bool,
    connect: Callable[[str], Any] | None = None,
) -> list[Pool]:
    pools = []
    for label, (size, overflow, timeout) in (("waits", WAITS_POOL), ("fails", FAILS_POOL)):
        kwargs: dict[str, Any] = {
            "pool_size": size,
            "max_overflow": overflow,
            "pool_timeout": timeout,
        }
        app_name = f"truth_{label}" if app_names else None
        if app_name is not None:
            kwargs["connect_args"] = {"application_name": app_name}
        engine = sa.create_engine(url, **kwargs)
        p = Pool(label, engine, size, overflow, long_wait=timeout > 1, app_name=app_name)
        if outage.enabled:
            assert connect is not None and refused_url is not None

            @event.listens_for(engine, "do_connect")
            def refuse(*_: Any, p: Pool = p, refused: str = refused_url) -> Any:
                if outage.down:  # refused for real: the database cannot be reached
                    p.tally.add("refused")
                    assert connect is not None
                    return connect(refused)
                return None  # the dialect connects as usual

        poolwatch.track(engine, name=label)
        p.listen()
        pools.append(p)
    return pools


def _run(
    rng: Seeded,
    readers: Readers,
    url: str,
    *,
    admin: Admin | None = None,
    outage: Outage | None = None,
    refused_url: str | None = None,
    connect: Callable[[str], Any] | None = None,
) -> None:
    outage = outage or Outage()
    readers.instrument()
    pools = _engines(
        url, outage=outage, refused_url=refused_url, app_names=admin is not None, connect=connect
    )
    workload = Workload(rng, pools, admin=admin, outage=outage)
    gate = ThreadGate(rng)
    waits = pools[0]

    def blocked() -> int:
        return blocked_in(gate.threads, "_do_get", owner=waits.engine.pool)

    def on_pause(label: str, pending: int) -> None:
        for p in pools:
            waiting = pending if p is waits else 0
            compare(label, rng, readers, p, pending=waiting, admin=admin, outage=outage)

    with Racing(readers):
        made = drive_threads(
            gate,
            workload.tally,
            lambda i: workload.worker(i, gate),
            workers=WORKERS,
            moments=pause_moments(rng, OPERATIONS, PAUSES),
            on_pause=on_pause,
            blocked=blocked,
        )
    workload.tally.assert_expected(rng)
    on_pause(f"the end ({made} pauses, {workload.tally['operations']} operations)", 0)
    for p in pools:  # dispose(): every idle connection closes as disposed
        idle = _idle_in_pool(p.engine)
        closed_before = figures(readers.collect(), p.label).get("closed.disposed") or 0
        p.engine.dispose()
        after = figures(readers.collect_settled(), p.label)
        cmp = Comparison(f"after dispose(): pool {p.label!r}", rng, after)
        cmp.expect("closed.disposed", library=closed_before + idle)
        cmp.expect("idle", library=0)
        cmp.check()
    readers.assert_clean()


# -- the tests -------------------------------------------------------------------------------
def test_queue_pools_under_threads_on_sqlite(rng: Seeded, readers: Readers, tmp_path: Path) -> None:
    _run(rng, readers, f"sqlite:///{tmp_path}/truth.db")


@pytest.mark.postgres
def test_queue_pools_under_threads_on_postgresql(
    rng: Seeded, readers: Readers, postgres: PostgresCluster
) -> None:
    admin = Admin(postgres)
    try:
        _run(rng, readers, postgres.url(), admin=admin)
    finally:
        admin.close()


def _sqlite_refused(url: str) -> Any:
    return sqlite3.connect(url, uri=True)


def test_queue_pools_through_connect_outages_on_sqlite(
    rng: Seeded, readers: Readers, tmp_path: Path
) -> None:
    # A database file in a directory that does not exist: sqlite3 refuses to open it.
    refused = f"file:{tmp_path}/missing/truth.db?mode=rw"
    _run(
        rng,
        readers,
        f"sqlite:///{tmp_path}/truth.db",
        outage=Outage(enabled=True),
        refused_url=refused,
        connect=_sqlite_refused,
    )


def test_reused_after_an_outage(rng: Seeded, readers: Readers, tmp_path: Path) -> None:
    """The issue's own figures: an outage of 1,000 failed connects, then 500 checkouts."""
    readers.instrument()
    outage = Outage(enabled=True, down=True)
    p = _engines(
        f"sqlite:///{tmp_path}/truth.db",
        outage=outage,
        refused_url=f"file:{tmp_path}/missing/truth.db?mode=rw",
        app_names=False,
        connect=_sqlite_refused,
    )[0]
    for _ in range(1000):
        with contextlib.suppress(exc.OperationalError):
            p.engine.connect()
    outage.down = False
    for _ in range(500):
        with p.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    got = figures(readers.collect_settled(), p.label)
    cmp = Comparison("after the outage", rng, got)
    cmp.expect("connect_errors", workload=p.tally["refused"])
    cmp.expect("wait_errors", workload=1000)
    cmp.expect("checkouts", workload=500)
    cmp.expect("connects", library=p.tally["library_connects"])
    cmp.expect("reused", workload=500 - p.tally["library_connects"])
    cmp.check()
    readers.assert_clean()


def test_reused_when_connects_and_checkouts_do_not_pair(
    rng: Seeded, readers: Readers, tmp_path: Path
) -> None:
    """A checkout that opens two connections, and a connect whose checkout then fails: both
    through SQLAlchemy's ``checkout`` event, the documented place to reject a connection.
    Raising ``DisconnectionError`` there makes SQLAlchemy invalidate the connection and
    reconnect inside the same checkout; any other exception fails the checkout, and
    SQLAlchemy invalidates the connection, however new. Reuse counted as checkouts less
    connects read 1 here instead of 3 (and, once it had exported a higher figure, kept it
    above the truth under load)."""
    readers.instrument()
    p = _engines(
        f"sqlite:///{tmp_path}/truth.db", outage=Outage(), refused_url=None, app_names=False
    )[0]
    reject: list[type[Exception]] = []

    @event.listens_for(p.engine, "checkout")
    def check(*_: Any) -> None:
        if reject:
            raise reject.pop()("rejected by the test's checkout listener")

    def use() -> None:
        with p.engine.connect() as conn:
            p.checked_out(conn.connection)
            conn.execute(sa.text("SELECT 1"))

    reject.append(exc.DisconnectionError)
    use()  # opens a connection, rejects it, opens another: two connects, one checkout
    reject.append(RuntimeError)
    with pytest.raises(RuntimeError):
        use()  # reuses it, then fails (and closes it): no checkout
    reject.append(RuntimeError)
    with pytest.raises(RuntimeError):
        use()  # opens one, then fails: a connect without its checkout
    for _ in range(4):
        use()  # the first opens one; three reuse it
    t = p.tally
    assert (t["checkouts"], t["firsts"], t["library_connects"]) == (5, 2, 4)
    got = figures(readers.collect_settled(), p.label)
    cmp = Comparison("connects and checkouts unpaired", rng, got)
    cmp.expect("checkouts", workload=5)
    cmp.expect("wait_errors", workload=2)
    cmp.expect("connects", library=4)
    cmp.expect("reused", workload=3)
    cmp.check()
    readers.assert_clean()


# -- async engine ----------------------------------------------------------------------------
class AsyncWorkload:
    """Tasks on one event loop making random operations on an AsyncEngine's pool."""

    def __init__(self, rng: Seeded, engine: AsyncEngine, size: int, overflow: int) -> None:
        self.rng = rng
        self.engine = engine
        self.p = Pool("async", engine.sync_engine, size, overflow, long_wait=True)
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)

    async def _checkout(self) -> Any:
        conn = await self.engine.connect()
        self.p.checked_out(conn.sync_connection.connection)
        return conn

    async def _return(self, conn: Any) -> None:
        await conn.close()
        self.p.tally.add("returns")

    async def worker(self, index: int, gate: TaskGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[Any] = []
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                await gate.checkpoint()
                try:
                    await self._step(r, held)
                except Exception as error:
                    self.tally.unexpected_error("async step", error)
                self.tally.add("operations")
        finally:
            for conn in held:
                self.p.tally.add("held", -1)
                await self._return(conn)

    async def _step(self, r: random.Random, held: list[Any]) -> None:
        if held:  # holding one of a pool whose callers block: never ask for another
            conn = held.pop()
            self.p.tally.add("held", -1)
            if r.random() < 0.3:
                await conn.invalidate()
                self.p.tally.add("invalidated")
            await self._return(conn)
            return
        roll = r.random()
        conn = await self._checkout()
        if roll < 0.35:
            held.append(conn)
            self.p.tally.add("held")
            await conn.execute(sa.text("SELECT 1"))
            return
        if roll < 0.5:
            with contextlib.suppress(exc.OperationalError, exc.ProgrammingError):
                await conn.execute(sa.text("SELECT * FROM truth_no_such_table"))
        elif roll < 0.6:
            await conn.invalidate()
            self.p.tally.add("invalidated")
        else:
            await conn.execute(sa.text("SELECT 1"))
            await asyncio.sleep(r.random() * 0.002)
        await self._return(conn)


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_async_engine_under_tasks(
    rng: Seeded,
    readers: Readers,
    tmp_path: Path,
    database: str,
    request: pytest.FixtureRequest,
) -> None:
    """An AsyncEngine (aiosqlite, or asyncpg on the real PostgreSQL) shared by tasks."""
    size, overflow = 2, 1
    if database == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/truth.db"
    else:
        url = request.getfixturevalue("postgres").url("asyncpg")
    readers.instrument()

    async def main() -> None:
        engine = create_async_engine(
            url,
            poolclass=pool.AsyncAdaptedQueuePool,
            pool_size=size,
            max_overflow=overflow,
            pool_timeout=30,
        )
        poolwatch.track(engine, name="async")
        workload = AsyncWorkload(rng, engine, size, overflow)
        workload.p.listen()
        lib: Any = engine.sync_engine.pool
        gate = TaskGate(rng)

        def getters() -> int:
            queue = lib._pool.__dict__.get("_queue")
            return sum(1 for g in list(queue._getters) if not g.done()) if queue else 0

        def compare_now(label: str, pending: int) -> None:
            p, t = workload.p, workload.p.tally
            got = figures(readers.collect_settled(), "async")
            queue = lib._pool.__dict__.get("_queue")
            records = list(queue._queue) if queue is not None else []
            cmp = Comparison(f"{label}: pool 'async'", rng, got)
            cmp.expect("used", workload=t["held"], library=lib.checkedout())
            cmp.expect("idle", library=sum(1 for r in records if r.dbapi_connection is not None))
            cmp.expect("max", workload=p.size + p.overflow)
            cmp.expect("pending", workload=pending, library=getters())
            cmp.expect("checkouts", workload=t["checkouts"])
            cmp.expect("uses", workload=t["returns"])
            cmp.expect("timeouts", workload=0)
            cmp.expect("wait_errors", workload=0)
            cmp.expect("connects", library=t["library_connects"])
            cmp.expect("reused", workload=t["checkouts"] - t["firsts"])
            _expect_closes(cmp, p)
            cmp.check()

        gate.start(lambda i: workload.worker(i, gate), WORKERS)
        moments = sorted(pause_moments(rng, OPERATIONS, PAUSES))
        for number, moment in enumerate(moments, 1):
            while workload.tally["operations"] < moment and not all(t.done() for t in gate.tasks):
                await asyncio.sleep(0.001)
            if all(t.done() for t in gate.tasks):
                break
            # Tasks still running that are not parked are queued for a connection: the
            # pool's own getters count them (a task opening a connection is neither, and
            # the pause waits for it).
            pending = await gate.pause(blocked=getters)
            try:
                compare_now(f"pause {number}", pending)
            finally:
                gate.resume()
        await gate.join()
        workload.tally.assert_expected(rng)
        compare_now("the end", 0)
        await engine.dispose()

    with Racing(readers):
        asyncio.run(main())
    readers.assert_clean()


# -- the other pool classes ------------------------------------------------------------------
@pytest.mark.parametrize(
    "poolclass", [pool.NullPool, pool.SingletonThreadPool, pool.StaticPool, pool.AssertionPool]
)
def test_other_pool_classes_under_threads(
    rng: Seeded, readers: Readers, tmp_path: Path, poolclass: type[pool.Pool]
) -> None:
    """Levels and counts of the pools that never make a caller wait. StaticPool shares one
    connection between every caller and AssertionPool allows one checkout at a time: one
    worker for those; four otherwise."""
    readers.instrument()
    kwargs: dict[str, Any] = {"poolclass": poolclass}
    if poolclass is pool.SingletonThreadPool:
        kwargs["pool_size"] = 8  # kept per thread: more than the workers, none closed
    engine = sa.create_engine(
        f"sqlite:///{tmp_path}/truth.db", connect_args={"check_same_thread": False}, **kwargs
    )
    poolwatch.track(engine, name="other")
    p = Pool("other", engine, 0, 0, long_wait=False)
    p.listen()
    workers = 1 if poolclass in (pool.StaticPool, pool.AssertionPool) else 4
    tally = Tally()
    gate = ThreadGate(rng)
    expired = deadline_after(SECONDS / 2)

    def worker(index: int) -> None:
        r = random.Random(rng.seed_value * 1000 + index)
        held: list[sa.Connection] = []
        while tally["operations"] < OPERATIONS // 2 and not expired() and not gate.stopping:
            gate.checkpoint()
            if held:
                held.pop().close()
                p.tally.add("held", -1)
                p.tally.add("returns")
            else:
                conn = engine.connect()
                p.checked_out(conn.connection)
                conn.execute(sa.text("SELECT 1"))
                if r.random() < 0.2 and poolclass is not pool.StaticPool:
                    conn.invalidate()  # the record goes back to the pool at once
                    p.tally.add("invalidated")
                    conn.close()
                    p.tally.add("returns")
                elif r.random() < 0.5:
                    held.append(conn)
                    p.tally.add("held")
                else:
                    conn.close()
                    p.tally.add("returns")
            tally.add("operations")
        for conn in held:
            conn.close()
            p.tally.add("held", -1)
            p.tally.add("returns")

    def on_pause(label: str, pending: int) -> None:
        t = p.tally
        got = figures(readers.collect_settled(), "other")
        cmp = Comparison(f"{label}: {poolclass.__name__}", rng, got)
        cmp.expect("used", workload=t["held"])
        cmp.expect("pending", workload=0)
        cmp.expect("max", library=1 if poolclass is pool.AssertionPool else None)
        cmp.expect("checkouts", workload=t["checkouts"])
        cmp.expect("uses", workload=t["returns"])
        cmp.expect("connects", library=t["library_connects"])
        cmp.expect("reused", workload=t["checkouts"] - t["firsts"])
        if poolclass is pool.NullPool:
            cmp.expect("idle", library=0)
        _expect_closes(cmp, p)
        cmp.check()

    with Racing(readers):
        drive_threads(
            gate,
            tally,
            worker,
            workers=workers,
            moments=pause_moments(rng, OPERATIONS // 2, PAUSES),
            on_pause=on_pause,
        )
    on_pause("the end", 0)
    engine.dispose()
    readers.assert_clean()


# -- an engine per call ----------------------------------------------------------------------
def _engine_per_call(url: str) -> None:
    engine = sa.create_engine(url)  # the anti-pattern: a new engine, so a new pool, per call
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    engine.dispose()


def test_an_engine_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="poolwatch")
    readers.instrument()
    url = f"sqlite:///{tmp_path}/truth.db"
    expired = deadline_after(PER_CALL_SECONDS)
    calls = 0
    with Racing(readers):
        while calls < PER_CALL_ENGINES and not expired():
            _engine_per_call(url)
            calls += 1
            if calls % 10 == 0:
                # every pool made so far freed, as the app's own collector would
                gc.collect(1 if calls % 20 else 2)
                readers.collect()
    got = readers.collect_observed()
    name = f"sqlite:///{tmp_path}/truth.db"
    cmp = Comparison(f"after {calls} engines", rng, figures(got, name))
    cmp.expect("checkouts", workload=calls)
    cmp.expect("uses", workload=calls)
    cmp.expect("connects", workload=calls)
    cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"
    readers.assert_clean()


# -- instrument/uninstrument cycles under load ------------------------------------------------
def _sqlalchemy_classes() -> list[type]:
    from sqlalchemy.engine.base import Engine
    from sqlalchemy.pool import base

    return [
        Engine,
        base.Pool,
        base._ConnectionRecord,
        base._ConnectionFairy,
        pool.QueuePool,
        pool.NullPool,
    ]


def test_instrument_cycles_under_load_reach_no_worker(
    rng: Seeded, readers: Readers, tmp_path: Path
) -> None:
    """Workers check out and return (a pool with waiting callers and timeouts) while the
    controller instruments and uninstruments: every exception a worker sees is one the
    workload causes (pool timeouts), none comes from poolwatch, and afterwards every
    patched attribute is SQLAlchemy's own again."""
    before = class_attributes(_sqlalchemy_classes())
    engine = sa.create_engine(
        f"sqlite:///{tmp_path}/truth.db", pool_size=2, max_overflow=1, pool_timeout=0.01
    )
    tally = Tally()
    stop = threading.Event()

    def worker(index: int) -> None:
        r = random.Random(rng.seed_value * 1000 + index)
        while not stop.is_set():
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                    if r.random() < 0.1:
                        conn.invalidate()
                    time.sleep(r.random() * 0.001)
                tally.add("checkouts")
            except exc.TimeoutError:
                tally.add("timeouts")
            except Exception as error:
                where = ", ".join(poolwatch_frames(error)) or "not poolwatch's"
                tally.unexpected_error(f"worker ({where})", error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(WORKERS)]
    for t in threads:
        t.start()
    try:
        made = cycle(
            rng,
            readers,
            "sqlalchemy",
            lambda: tally["checkouts"] + tally["timeouts"],
            cycles=CYCLES,
            seconds=CYCLE_SECONDS,
            inside=2 * WORKERS,
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert_cycled_cleanly(
        rng, tally, made, "checkouts", classes=_sqlalchemy_classes(), before=before
    )
    engine.dispose()
