"""Ground truth for asyncpg pools: every exported figure against the pool, the workload and
the server (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED`` replays a run).

Each randomized run drives two pools of one database from tasks on one event loop:
``waits``, whose callers wait up to 30 s (exhausted, they show as pending), with a floor of
one connection that asyncpg restores in the background; ``fails``, whose callers wait
20 ms and time out. Operations, chosen at random: a checkout used and released; a checkout
held across operations (and pauses), released later; an exception raised inside
``acquire()``; a statement the database rejects; the server terminating a held
connection's backend (asyncpg notices at once, and takes its holder back); at pauses, an
idle one's.

asyncpg keeps no counters: the pool's truths are its state (``get_size()``,
``get_idle_size()``, its queue's waiting callers) and the ``connect=`` callback the
workload gives it, which counts every connect asyncpg asks for; the server's, the backends
``pg_stat_activity`` shows under each pool's ``application_name``.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from asyncpg import connection
from asyncpg import pool as pool_module

import poolwatch
from tests.support.pgadmin import Admin, dsn
from tests.support.postgres import PostgresCluster
from tests.support.truth import (
    Comparison,
    Racing,
    Readers,
    Seeded,
    Tally,
    TaskGate,
    assert_cycled_cleanly,
    class_attributes,
    cycle,
    deadline_after,
    figures,
    pause_moments,
    poolwatch_frames,
    settle,
)

pytestmark = pytest.mark.postgres

# Bounds: every loop stops at a count or a time, whichever comes first.
OPERATIONS = 500
SECONDS = 6.0
PAUSES = 8
TASKS = 6
WAITS_POOL = (1, 3, 30.0)
"""min_size, max_size, acquire timeout of the ``waits`` pool: exhausted callers wait."""
FAILS_POOL = (0, 2, 0.02)
"""The same for ``fails``: exhausted callers time out after 20 ms."""
PER_CALL_POOLS = 60
PER_CALL_SECONDS = 6.0
CYCLES = 40
CYCLE_SECONDS = 5.0


class Injected(Exception):
    """An exception the workload raises on purpose inside ``acquire()``."""


_connect_cancelled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "truth_connect_cancelled", default=False
)
"""Set by the connect callback, in the task whose acquire() asked for the connect, when
that acquire's timeout cancelled it."""


@pytest.fixture
def admin(postgres: PostgresCluster) -> Iterator[Admin]:
    made = Admin(postgres)
    try:
        yield made
    finally:
        made.close()


# -- the workload ----------------------------------------------------------------------------
@dataclass
class Pool:
    """One pool of a run, and what the workload (and the pool's connect callback) counted."""

    label: str
    max_size: int
    timeout: float
    app: str
    pool: Any = None
    tally: Tally = field(default_factory=Tally)
    seen: set[Any] = field(default_factory=set)
    """Every connection checked out (kept: ``id()`` of a freed one could come back)."""

    @property
    def long_wait(self) -> bool:
        return self.timeout > 1

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        """The pool's ``connect=`` callback: asyncpg's own extension point, counting."""
        try:
            con = await asyncpg.connect(*args, **kwargs)
        except asyncio.CancelledError:
            # An acquire's timeout ran out while this connect was under way.
            self.tally.add("library_connects_cancelled")
            _connect_cancelled.set(True)
            raise
        except BaseException:
            self.tally.add("library_connect_errors")
            raise
        self.tally.add("library_connects")
        return con


async def _make_pools(pg: PostgresCluster) -> list[Pool]:
    made = []
    for label, (low, high, timeout) in (("waits", WAITS_POOL), ("fails", FAILS_POOL)):
        p = Pool(label, high, timeout, app=f"truth_apg_{label}")
        p.pool = asyncpg.create_pool(
            dsn(pg),
            min_size=low,
            max_size=high,
            connect=p.connect,
            server_settings={"application_name": p.app},
        )
        poolwatch.track(p.pool, name=label)  # named before its first connects
        await p.pool
        made.append(p)
    return made


def getters(pool: Any) -> int:
    """Callers waiting in the pool's queue for a holder (asyncpg's own state)."""
    queue = pool._queue
    return sum(1 for g in list(queue._getters) if not g.done()) if queue is not None else 0


def quiet(pool: Any) -> bool:
    """Whether asyncpg does nothing in the background: not restoring its floor (asyncpg
    before 0.32 has no such task: always quiet)."""
    return getattr(pool, "_maintenance_task", None) is None


class Workload:
    def __init__(self, rng: Seeded, pools: list[Pool], admin: Admin) -> None:
        self.rng = rng
        self.pools = pools
        self.admin = admin
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)

    async def _acquire(self, p: Pool) -> Any:
        _connect_cancelled.set(False)
        try:
            con = await p.pool.acquire(timeout=p.timeout)
        except TimeoutError as error:
            if _connect_cancelled.get():
                p.tally.add("connecting_timeouts")  # its connect ran out: not exhaustion
            else:
                p.tally.add("timeouts")
                if p.long_wait:
                    self.tally.unexpected_error(f"{p.label} acquire", error)
            return None
        p.seen.add(con._con)
        p.tally.add("checkouts")
        return con

    async def _release(self, p: Pool, con: Any) -> None:
        # Not the acquire's timeout, release()'s default: 20 ms for the reset's round trip.
        await p.pool.release(con, timeout=30)
        p.tally.add("returns")

    async def _gone(self, op: str, condition: Callable[[], bool]) -> None:
        for _ in range(1000):  # bounded: 10 s
            if condition():
                return
            await asyncio.sleep(0.01)
        self.tally.unexpected_error(op, AssertionError("asyncpg never saw the backend go"))

    async def step(self, op: str, p: Pool, held: list[Any], r: random.Random) -> None:
        if op == "release":
            await self._release(p, held.pop(r.randrange(len(held))))
            p.tally.add("held", -1)
        elif op == "kill":
            con = held.pop(r.randrange(len(held)))
            p.tally.add("held", -1)
            self.admin.terminate(con.get_server_pid())  # blocks the loop: nothing else runs
            await self._gone(op, lambda: con._con is None)  # asyncpg took the holder back
            p.tally.add("killed")
            p.tally.add("returns")
            await p.pool.release(con, timeout=30)  # does nothing: already back
        elif op == "hold":
            con = await self._acquire(p)
            if con is not None:
                await con.fetchval("SELECT 1")
                held.append(con)
                p.tally.add("held")
        else:
            con = await self._acquire(p)
            if con is None:
                return
            try:
                if op == "raise_inside":
                    raise Injected("raised inside a checkout")
                if op == "bad_statement":
                    await con.execute("SELECT * FROM truth_no_such_table")
                await con.fetchval("SELECT 1")
            except (Injected, asyncpg.UndefinedTableError):
                pass
            finally:
                await self._release(p, con)

    def choose(self, r: random.Random, held: dict[str, list[Any]]) -> tuple[str, Pool]:
        p = r.choice(self.pools)
        mine = held[p.label]
        if mine and (p.long_wait or r.random() < 0.4):
            # Holding a connection of a pool whose callers wait: never ask it for another.
            return ("kill" if r.random() < 0.2 else "release"), p
        ops = ["use", "hold", "raise_inside", "bad_statement"]
        weights = [30, 20 if len(mine) < 2 else 0, 8, 6]
        return r.choices(ops, weights)[0], p

    async def kill_idle(self, r: random.Random) -> None:
        """The server ends an idle connection's backend; asyncpg notices at once. Done at a
        pause, every task parked: otherwise a task may be handed the connection in the
        instant before asyncpg sees it go, and its query fails (asyncpg's own race:
        ConnectionDoesNotExistError, or InternalClientError while the protocol consumes
        the server's FATAL message)."""
        p = r.choice(self.pools)
        idle = [h for h in list(p.pool._queue._queue) if h.is_connected()]
        if not idle:
            return
        holder = r.choice(idle)
        killed = holder._con
        self.admin.terminate(killed.get_server_pid())
        # asyncpg 0.32+ lets go of the holder's connection at once; before (no maintenance
        # task), the connection only knows itself closed, and the holder's next acquire()
        # reconnects.
        before_032 = not hasattr(p.pool, "_maintenance_task")
        await self._gone(
            "kill_idle",
            lambda: holder._con is not killed or (before_032 and killed.is_closed()),
        )
        p.tally.add("killed")

    async def task(self, index: int, gate: TaskGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: dict[str, list[Any]] = {p.label: [] for p in self.pools}
        by_label = {p.label: p for p in self.pools}
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                await gate.checkpoint()
                op, p = self.choose(r, held)
                try:
                    await self.step(op, p, held[p.label], r)
                except Exception as error:
                    self.tally.unexpected_error(op, error)
                self.tally.add("operations")
        finally:
            for label, mine in held.items():
                for con in mine:
                    by_label[label].tally.add("held", -1)
                    await self._release(by_label[label], con)


# -- the comparison --------------------------------------------------------------------------
def compare(
    label: str, rng: Seeded, readers: Readers, p: Pool, *, pending: int, admin: Admin
) -> None:
    pool, t = p.pool, p.tally
    size, idle = pool.get_size(), pool.get_idle_size()
    # The server ends a backend a moment after its client closed it.
    settle(lambda: admin.backends(p.app) == size)
    server = admin.backends(p.app)
    got = figures(readers.collect_settled(), p.label)
    cmp = Comparison(f"{label}: pool {p.label!r}", rng, got)
    cancelled = t["library_connects_cancelled"]
    cmp.expect("used", workload=t["held"], library=size - idle)
    cmp.expect("idle", library=idle, server=server - t["held"])
    cmp.expect("max", workload=p.max_size, library=pool.get_max_size())
    cmp.expect("pending", workload=pending, library=getters(pool))
    cmp.expect("checkouts", workload=t["checkouts"])
    cmp.expect("uses", workload=t["returns"])
    cmp.expect("wait_timeouts", workload=t["timeouts"])
    cmp.expect("timeouts", workload=t["timeouts"])
    cmp.expect("wait_errors", workload=t["connecting_timeouts"])
    cmp.expect("connects", library=t["library_connects"])
    cmp.expect("connect_errors", library=t["library_connect_errors"] + cancelled)
    cmp.agree("acquires that ran out while connecting", workload=t["connecting_timeouts"],
              library=cancelled)  # fmt: skip
    # A checkout reused a connection unless it was that connection's first.
    cmp.expect("reused", workload=t["checkouts"] - len(p.seen))
    cmp.expect("leaks", workload=0)
    cmp.closes({"stale": t["killed"]}, "workload")
    cmp.expect("lifetimes", workload=t["killed"])
    cmp.check()


async def quiet_pause(gate: TaskGate, blocked: Callable[[], int], pools: list[Pool]) -> int:
    """Pause the tasks, and asyncpg's own maintenance too (comparing blocks the loop)."""
    pending = await gate.pause(blocked=blocked)
    for _ in range(500):  # bounded: 5 s
        if all(quiet(p.pool) for p in pools):
            break
        await asyncio.sleep(0.01)
        pending = await gate.pause(blocked=blocked)
    return pending


# -- the tests -------------------------------------------------------------------------------
def test_pools_under_tasks(
    rng: Seeded, readers: Readers, postgres: PostgresCluster, admin: Admin
) -> None:
    readers.instrument()

    async def main() -> None:
        pools = await _make_pools(postgres)
        workload = Workload(rng, pools, admin)
        gate = TaskGate(rng)
        waits = pools[0]

        def blocked() -> int:
            if not all(quiet(p.pool) for p in pools):
                return -len(gate.tasks) - 1  # asyncpg works in the background: not yet
            return getters(waits.pool)

        def compare_now(label: str, pending: int) -> None:
            workload.tally.assert_expected(rng)  # a figure off because of one: shown first
            for p in pools:
                waiting = pending if p is waits else 0
                compare(label, rng, readers, p, pending=waiting, admin=admin)

        try:
            gate.start(lambda i: workload.task(i, gate), TASKS)
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
                    if rng.random() < 0.5:
                        await workload.kill_idle(rng)
                finally:
                    gate.resume()
            await gate.join()
            workload.tally.assert_expected(rng)
            for _ in range(500):  # asyncpg's last restoration of its floor (bounded: 5 s)
                if all(quiet(p.pool) for p in pools):
                    break
                await asyncio.sleep(0.01)
            compare_now("the end", 0)
            for p in pools:  # close(): every open connection closes as disposed
                size = p.pool.get_size()
                before = figures(readers.collect(), p.label).get("closed.disposed") or 0
                await p.pool.close()
                after = figures(readers.collect_settled(), p.label)
                cmp = Comparison(f"after close(): pool {p.label!r}", rng, after)
                cmp.expect("closed.disposed", library=before + size)
                cmp.expect("idle", library=0)
                cmp.check()
        finally:
            for p in pools:
                p.pool.terminate()

    with Racing(readers):
        asyncio.run(main())
    readers.assert_clean()


# -- a pool per call -------------------------------------------------------------------------
async def _pool_per_call(url: str) -> None:
    # The anti-pattern: a new pool per call, used once and closed.
    async with asyncpg.create_pool(url, min_size=1, max_size=1) as pool:
        assert await pool.fetchval("SELECT 1") == 1


def test_a_pool_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    # A database name of its own: apart from any pool an earlier test left alive.
    url = dsn(postgres).rsplit("/", 1)[0] + "/postgres"
    name = f"postgresql://{postgres.host}:{postgres.port}/postgres"
    calls = 0

    async def main() -> None:
        nonlocal calls
        expired = deadline_after(PER_CALL_SECONDS)
        while calls < PER_CALL_POOLS and not expired():
            await _pool_per_call(url)
            calls += 1
            if calls % 10 == 0:
                gc.collect(1 if calls % 20 else 2)  # as the app's own collector would
                readers.collect()

    with Racing(readers):
        asyncio.run(main())
    got = figures(readers.collect_observed(), name)
    cmp = Comparison(f"after {calls} pools", rng, got)
    cmp.expect("checkouts", workload=calls)
    cmp.expect("uses", workload=calls)
    cmp.expect("connects", workload=calls)  # min_size=1 each
    cmp.expect("reused", workload=0)
    cmp.expect("closed.disposed", workload=calls)
    cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"
    readers.assert_clean()


# -- instrument/uninstrument cycles under load ------------------------------------------------
def _asyncpg_classes() -> list[type]:
    return [pool_module.Pool, pool_module.PoolConnectionHolder, connection.Connection]


def test_instrument_cycles_under_load_reach_no_task(
    rng: Seeded, readers: Readers, postgres: PostgresCluster
) -> None:
    """Tasks acquire and release (a pool of 2: callers wait, some time out) while the
    controller, in another thread, instruments and uninstruments: every exception a task
    sees is one the workload causes, and afterwards asyncpg is its own again."""
    before = class_attributes(_asyncpg_classes())
    tally = Tally()
    stop = threading.Event()

    async def load() -> None:
        async with asyncpg.create_pool(dsn(postgres), min_size=2, max_size=2) as pool:

            async def task(index: int) -> None:
                r = random.Random(rng.seed_value * 1000 + index)
                while not stop.is_set():
                    try:
                        timeout = 0.005 if r.random() < 0.3 else 5.0
                        async with pool.acquire(timeout=timeout) as con:
                            await con.fetchval("SELECT 1")
                        tally.add("checkouts")
                    except TimeoutError:
                        tally.add("timeouts")
                    except Exception as error:
                        where = ", ".join(poolwatch_frames(error)) or "not poolwatch's"
                        tally.unexpected_error(f"task ({where})", error)

            await asyncio.gather(*(task(i) for i in range(8)))

    loop = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
    loop.start()
    try:
        made = cycle(
            rng,
            readers,
            "asyncpg",
            lambda: tally["checkouts"] + tally["timeouts"],
            cycles=CYCLES,
            seconds=CYCLE_SECONDS,
            inside=10,
        )
    finally:
        stop.set()
        loop.join(30)
    assert_cycled_cleanly(rng, tally, made, "checkouts", classes=_asyncpg_classes(), before=before)
