"""Ground truth for psycopg_pool pools: every exported figure against the pool, the
workload and the server (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED`` replays
a run).

Each randomized run drives two pools of one database, from worker threads (``ConnectionPool``)
or tasks on one event loop (``AsyncConnectionPool``): ``waits``, with a long timeout,
whose exhausted callers block and show as pending; ``fails``, with a 20 ms timeout and
``max_waiting=1``, whose callers time out or are refused (``TooManyRequests``: a timeout
too). Operations, chosen at random: a checkout used and given back; a checkout held across
operations (and across pauses), given back later; an exception raised inside
``connection()``; a statement the database rejects; the server terminating a held
connection's backend (the borrower's next query fails, and the pool drops it on return).

The pool's own truths are its ``get_stats()`` counters and levels; the server's, the
backends ``pg_stat_activity`` shows under each pool's ``application_name``. psycopg_pool
opens and replaces connections on worker threads (tasks) of its own: a pause waits until
they are idle, and a caller blocked in the queue while the pool is still growing for it is
not yet quiescent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
import pytest

import poolwatch
from tests.support.pgadmin import Admin, dsn
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

pytestmark = pytest.mark.postgres

# Bounds: every loop stops at a count or a time, whichever comes first (the CI budget of
# the whole ground-truth suite is about 150 s on a two-core machine).
OPERATIONS = 500
"""Operations of one randomized run, over all its workers (and at most ``SECONDS``)."""
SECONDS = 6.0
PAUSES = 8
WORKERS = 6
WAITS_POOL = (1, 3, 30.0)
"""min_size, max_size, timeout of the ``waits`` pool: exhausted callers block."""
FAILS_POOL = (1, 2, 0.02)
"""The same for ``fails``: exhausted callers time out after 20 ms (or are refused)."""
PER_CALL_POOLS = 60
"""Pools made, used once and closed, one per call (at most ``PER_CALL_SECONDS``)."""
PER_CALL_SECONDS = 6.0
CYCLES = 40
CYCLE_SECONDS = 5.0


class Injected(Exception):
    """An exception the workload raises on purpose inside ``connection()``."""


@pytest.fixture
def admin(postgres: PostgresCluster) -> Iterator[Admin]:
    made = Admin(postgres)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(autouse=True)
def _quiet_pool_log(caplog: pytest.LogCaptureFixture) -> None:
    # psycopg_pool logs a WARNING for each broken connection returned: expected here.
    caplog.set_level(logging.ERROR, logger="psycopg.pool")


# -- the workload ----------------------------------------------------------------------------
@dataclass
class Pool:
    """One pool of a run, and what the workload counted about it."""

    label: str
    pool: Any
    max_size: int
    long_wait: bool
    app: str
    tally: Tally = field(default_factory=Tally)
    seen: set[Any] = field(default_factory=set)
    """Every connection checked out (kept: ``id()`` of a freed one could come back)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def checked_out(self, conn: Any) -> None:
        with self.lock:
            self.seen.add(conn)
        self.tally.add("checkouts")


def _make_pools(pg: PostgresCluster, *, asynchronous: bool) -> list[Pool]:
    made = []
    for label, (low, high, timeout) in (("waits", WAITS_POOL), ("fails", FAILS_POOL)):
        app = f"truth_pp_{label}_{'async' if asynchronous else 'sync'}"
        cls = psycopg_pool.AsyncConnectionPool if asynchronous else psycopg_pool.ConnectionPool
        pool = cls(
            dsn(pg, application_name=app),
            min_size=low,
            max_size=high,
            timeout=timeout,
            max_waiting=0 if timeout > 1 else 1,
            open=False,
        )
        poolwatch.track(pool, name=label)
        made.append(Pool(label, pool, high, long_wait=timeout > 1, app=app))
    return made


def still_waiting(pool: Any) -> int:
    """The pool's own queue of clients, less those that gave up (psycopg_pool keeps a
    client that timed out in its queue until a connection comes back)."""
    return sum(1 for c in list(pool._waiting) if c.conn is None and c.error is None)


def quiet(pool: Any) -> bool:
    """Whether the pool does nothing in the background: no task queued, every worker
    waiting for one, not growing."""
    if pool._growing:
        return False
    tasks = pool._tasks
    if isinstance(tasks, asyncio.Queue):
        idle = sum(1 for g in list(tasks._getters) if not g.done())  # type: ignore[attr-defined]
        return tasks.qsize() == 0 and idle == len(pool._workers)
    return tasks.qsize() == 0 and blocked_in(pool._workers, "worker") == len(pool._workers)


class Workload:
    """Random operations on the pools; sync (threads) or async (tasks) alike: each
    operation is a generator of the pool's calls, run by :meth:`step` or :meth:`astep`."""

    def __init__(self, rng: Seeded, pools: list[Pool], admin: Admin) -> None:
        self.rng = rng
        self.pools = pools
        self.admin = admin
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)

    def choose(self, r: random.Random, held: dict[str, list[Any]]) -> tuple[str, Pool]:
        p = r.choice(self.pools)
        mine = held[p.label]
        if mine and (p.long_wait or r.random() < 0.4):
            # Holding a connection of a pool whose callers block: never ask it for another
            # (two holders each waiting for the other's would deadlock).
            return ("kill" if r.random() < 0.2 else "release"), p
        ops = ["use", "hold", "raise_inside", "bad_statement"]
        weights = [30, 20 if len(mine) < 2 else 0, 8, 6]
        return r.choices(ops, weights)[0], p

    # -- one step, sync ----------------------------------------------------------------
    def _getconn(self, p: Pool) -> Any:
        try:
            conn = p.pool.getconn()
        except (psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests) as error:
            p.tally.add("timeouts")
            if p.long_wait:
                self.tally.unexpected_error(f"{p.label} getconn", error)
            return None
        p.checked_out(conn)
        return conn

    def _putconn(self, p: Pool, conn: Any) -> None:
        p.pool.putconn(conn)
        p.tally.add("returns")

    def step(self, op: str, p: Pool, held: list[Any], r: random.Random) -> None:
        if op == "release":
            self._putconn(p, held.pop(r.randrange(len(held))))
            p.tally.add("held", -1)
        elif op == "kill":
            conn = held.pop(r.randrange(len(held)))
            p.tally.add("held", -1)
            self.admin.terminate(conn.info.backend_pid)
            with contextlib.suppress(psycopg.OperationalError):  # AdminShutdown and kin
                conn.execute("SELECT 1")
                self.tally.unexpected_error("kill", AssertionError("a killed backend answered"))
            p.tally.add("killed")
            self._putconn(p, conn)
        elif op == "hold":
            conn = self._getconn(p)
            if conn is not None:
                conn.execute("SELECT 1")
                held.append(conn)
                p.tally.add("held")
        else:
            conn = self._getconn(p)
            if conn is None:
                return
            try:
                with conn:  # commit, or roll back on an exception: as connection() does
                    if op == "raise_inside":
                        raise Injected("raised inside a checkout")
                    if op == "bad_statement":
                        conn.execute("SELECT * FROM truth_no_such_table")
                    conn.execute("SELECT 1")
            except (Injected, psycopg.errors.UndefinedTable):
                pass
            finally:
                self._putconn(p, conn)

    def worker(self, index: int, gate: ThreadGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: dict[str, list[Any]] = {p.label: [] for p in self.pools}
        by_label = {p.label: p for p in self.pools}
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                gate.checkpoint()
                if gate.stopping:
                    break
                op, p = self.choose(r, held)
                try:
                    self.step(op, p, held[p.label], r)
                except Exception as error:
                    self.tally.unexpected_error(op, error)
                self.tally.add("operations")
        finally:
            for label, mine in held.items():
                for conn in mine:
                    by_label[label].tally.add("held", -1)
                    self._putconn(by_label[label], conn)

    # -- one step, async ---------------------------------------------------------------
    async def _agetconn(self, p: Pool) -> Any:
        try:
            conn = await p.pool.getconn()
        except (psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests) as error:
            p.tally.add("timeouts")
            if p.long_wait:
                self.tally.unexpected_error(f"{p.label} getconn", error)
            return None
        p.checked_out(conn)
        return conn

    async def _aputconn(self, p: Pool, conn: Any) -> None:
        await p.pool.putconn(conn)
        p.tally.add("returns")

    async def astep(self, op: str, p: Pool, held: list[Any], r: random.Random) -> None:
        if op == "release":
            await self._aputconn(p, held.pop(r.randrange(len(held))))
            p.tally.add("held", -1)
        elif op == "kill":
            conn = held.pop(r.randrange(len(held)))
            p.tally.add("held", -1)
            self.admin.terminate(conn.info.backend_pid)  # blocks the loop: nothing else runs
            with contextlib.suppress(psycopg.OperationalError):
                await conn.execute("SELECT 1")
                self.tally.unexpected_error("kill", AssertionError("a killed backend answered"))
            p.tally.add("killed")
            await self._aputconn(p, conn)
        elif op == "hold":
            conn = await self._agetconn(p)
            if conn is not None:
                await conn.execute("SELECT 1")
                held.append(conn)
                p.tally.add("held")
        else:
            conn = await self._agetconn(p)
            if conn is None:
                return
            try:
                async with conn:
                    if op == "raise_inside":
                        raise Injected("raised inside a checkout")
                    if op == "bad_statement":
                        await conn.execute("SELECT * FROM truth_no_such_table")
                    await conn.execute("SELECT 1")
            except (Injected, psycopg.errors.UndefinedTable):
                pass
            finally:
                await self._aputconn(p, conn)

    async def task(self, index: int, gate: TaskGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: dict[str, list[Any]] = {p.label: [] for p in self.pools}
        by_label = {p.label: p for p in self.pools}
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                await gate.checkpoint()
                op, p = self.choose(r, held)
                try:
                    await self.astep(op, p, held[p.label], r)
                except Exception as error:
                    self.tally.unexpected_error(op, error)
                self.tally.add("operations")
        finally:
            for label, mine in held.items():
                for conn in mine:
                    by_label[label].tally.add("held", -1)
                    await self._aputconn(by_label[label], conn)


# -- the comparison --------------------------------------------------------------------------
def compare(
    label: str, rng: Seeded, readers: Readers, p: Pool, *, pending: int, admin: Admin
) -> None:
    pool, t = p.pool, p.tally
    # The pool's workers replace what a kill took, the server ends a backend a moment
    # after its client closed it: both settle before anything is read.
    settle(lambda: quiet(pool))
    stats = pool.get_stats()
    settle(lambda: admin.backends(p.app) == stats["pool_size"])
    server_backends = admin.backends(p.app)
    got = figures(readers.collect_settled(), p.label)
    errors = stats.get("requests_errors", 0)
    connect_errors = stats.get("connections_errors", 0)
    cmp = Comparison(f"{label}: pool {p.label!r}", rng, got)
    cmp.expect("used", workload=t["held"], library=stats["pool_size"] - stats["pool_available"])
    cmp.expect("idle", library=stats["pool_available"], server=server_backends - t["held"])
    cmp.expect("max", workload=p.max_size, library=stats["pool_max"])
    cmp.expect("pending", workload=pending, library=still_waiting(pool))
    cmp.expect(
        "checkouts", workload=t["checkouts"], library=stats["requests_num"] - errors - pending
    )
    cmp.expect("uses", workload=t["returns"])
    cmp.expect("wait_timeouts", workload=t["timeouts"], library=errors)
    cmp.expect("timeouts", workload=t["timeouts"])
    cmp.expect("wait_errors", workload=0)
    cmp.expect("connects", library=stats["connections_num"] - connect_errors)
    cmp.expect("connect_errors", library=connect_errors)
    # A checkout reused a connection unless it was that connection's first.
    cmp.expect("reused", workload=t["checkouts"] - len(p.seen))
    cmp.expect("leaks", workload=0)
    cmp.closes({"stale": t["killed"]}, "workload")
    cmp.agree("broken returns", workload=t["killed"], library=stats.get("returns_bad", 0))
    cmp.expect("lifetimes", workload=t["killed"])
    cmp.check()


# -- the tests -------------------------------------------------------------------------------
def test_pools_under_threads(
    rng: Seeded, readers: Readers, postgres: PostgresCluster, admin: Admin
) -> None:
    readers.instrument()
    pools = _make_pools(postgres, asynchronous=False)
    for p in pools:
        p.pool.open(wait=True)
    workload = Workload(rng, pools, admin)
    gate = ThreadGate(rng)
    waits = pools[0]

    def blocked() -> int:
        if not all(quiet(p.pool) for p in pools):
            return -len(gate.threads) - 1  # the pool works in the background: not yet
        return blocked_in(gate.threads, "_getconn_unchecked", owner=waits.pool)

    def on_pause(label: str, pending: int) -> None:
        for p in pools:
            waiting = pending if p is waits else 0
            compare(label, rng, readers, p, pending=waiting, admin=admin)

    try:
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
        for p in pools:  # close(): every idle connection closes as disposed
            settle(lambda p=p: quiet(p.pool))
            idle = p.pool.get_stats()["pool_available"]
            before = figures(readers.collect(), p.label).get("closed.disposed") or 0
            p.pool.close()
            after = figures(readers.collect_settled(), p.label)
            cmp = Comparison(f"after close(): pool {p.label!r}", rng, after)
            cmp.expect("closed.disposed", library=before + idle)
            cmp.expect("idle", library=0)
            cmp.check()
    finally:
        for p in pools:
            p.pool.close()
    readers.assert_clean()


def test_async_pools_under_tasks(
    rng: Seeded, readers: Readers, postgres: PostgresCluster, admin: Admin
) -> None:
    readers.instrument()

    async def main() -> None:
        pools = _make_pools(postgres, asynchronous=True)
        for p in pools:
            await p.pool.open(wait=True)
        workload = Workload(rng, pools, admin)
        gate = TaskGate(rng)
        waits = pools[0]

        def blocked() -> int:
            if not all(quiet(p.pool) for p in pools):
                return -len(gate.tasks) - 1  # the pool works in the background: not yet
            return still_waiting(waits.pool)

        def compare_now(label: str, pending: int) -> None:
            # Blocking the loop on purpose: nothing of the pools runs meanwhile.
            for p in pools:
                waiting = pending if p is waits else 0
                compare(label, rng, readers, p, pending=waiting, admin=admin)

        try:
            gate.start(lambda i: workload.task(i, gate), WORKERS)
            moments = sorted(pause_moments(rng, OPERATIONS, PAUSES))
            for number, moment in enumerate(moments, 1):
                while workload.tally["operations"] < moment and not all(
                    t.done() for t in gate.tasks
                ):
                    await asyncio.sleep(0.001)
                if all(t.done() for t in gate.tasks):
                    break
                pending = await quiet_pause(gate, blocked, pools)
                try:
                    compare_now(f"pause {number}", pending)
                finally:
                    gate.resume()
            await gate.join()
            workload.tally.assert_expected(rng)
            for _ in range(200):  # the workers' last replacements (bounded: 2 s)
                if all(quiet(p.pool) for p in pools):
                    break
                await asyncio.sleep(0.01)
            compare_now("the end", 0)
            for p in pools:
                idle = p.pool.get_stats()["pool_available"]
                before = figures(readers.collect(), p.label).get("closed.disposed") or 0
                await p.pool.close()
                after = figures(readers.collect_settled(), p.label)
                cmp = Comparison(f"after close(): pool {p.label!r}", rng, after)
                cmp.expect("closed.disposed", library=before + idle)
                cmp.check()
        finally:
            for p in pools:
                await p.pool.close()

    with Racing(readers):
        asyncio.run(main())
    readers.assert_clean()


async def quiet_pause(gate: TaskGate, blocked: Callable[[], int], pools: list[Pool]) -> int:
    """Pause the tasks, and the pools' own worker tasks too: a pause with every task parked
    returns at once, while a worker may still be replacing a connection (comparing blocks
    the loop, and it would never finish)."""
    pending = await gate.pause(blocked=blocked)
    for _ in range(500):  # bounded: 5 s
        if all(quiet(p.pool) for p in pools):
            break
        await asyncio.sleep(0.01)
        pending = await gate.pause(blocked=blocked)
    return pending


# -- a pool per call -------------------------------------------------------------------------
def _pool_per_call(conninfo: str) -> None:
    # The anti-pattern: a new pool per call, opened, used once and closed.
    with (
        psycopg_pool.ConnectionPool(conninfo, min_size=1, open=True) as pool,
        pool.connection() as conn,
    ):
        conn.execute("SELECT 1")


def test_a_pool_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    # A database name of its own: apart from any pool an earlier test left alive.
    conninfo = dsn(postgres).rsplit("/", 1)[0] + "/postgres"
    name = f"postgresql://{postgres.host}:{postgres.port}/postgres"
    expired = deadline_after(PER_CALL_SECONDS)
    calls = 0
    with Racing(readers):
        while calls < PER_CALL_POOLS and not expired():
            _pool_per_call(conninfo)
            calls += 1
            if calls % 10 == 0:
                gc.collect(1 if calls % 20 else 2)  # as the app's own collector would
                readers.collect()
    got = figures(readers.collect_observed(), name)
    cmp = Comparison(f"after {calls} pools", rng, got)
    cmp.expect("checkouts", workload=calls)
    cmp.expect("uses", workload=calls)
    cmp.expect("connects", workload=calls)  # min_size=1 each
    cmp.expect("closed.disposed", workload=calls)
    cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"
    readers.assert_clean()


# -- instrument/uninstrument cycles under load ------------------------------------------------
def _psycopg_pool_classes() -> list[type]:
    return [
        psycopg_pool.ConnectionPool,
        psycopg_pool.AsyncConnectionPool,
        psycopg_pool.NullConnectionPool,
        psycopg.Connection,
        psycopg.AsyncConnection,
    ]


def test_instrument_cycles_under_load_reach_no_worker(
    rng: Seeded, readers: Readers, postgres: PostgresCluster
) -> None:
    """Workers check out and give back (a pool with waiting callers and timeouts) while the
    controller instruments and uninstruments: every exception a worker sees is one the
    workload causes (pool timeouts), none comes from poolwatch, and afterwards every
    patched attribute is psycopg's own again."""
    before = class_attributes(_psycopg_pool_classes())
    pool = psycopg_pool.ConnectionPool(
        dsn(postgres), min_size=2, max_size=2, timeout=0.01, open=False
    )
    pool.open(wait=True)
    tally = Tally()
    stop = threading.Event()

    def worker(index: int) -> None:
        r = random.Random(rng.seed_value * 1000 + index)
        while not stop.is_set():
            try:
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
                    time.sleep(r.random() * 0.001)
                tally.add("checkouts")
            except psycopg_pool.PoolTimeout:
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
            "psycopg_pool",
            lambda: tally["checkouts"] + tally["timeouts"],
            cycles=CYCLES,
            seconds=CYCLE_SECONDS,
            inside=2 * WORKERS,
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        pool.close()
    assert_cycled_cleanly(
        rng, tally, made, "checkouts", classes=_psycopg_pool_classes(), before=before
    )
