"""asyncpg pools against a real PostgreSQL, on a real event loop: exact counts, exhaustion,
killed backends, closes by reason, connect failures, names, leaks.

The server is the ``postgres`` session fixture (tests/support/postgres.py). asyncpg keeps
no counters of its own: figures are compared with the pool's own state (its holders and
queue, ``get_size()``, ``get_idle_size()``), what the test did, and what the server saw.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

import poolwatch
from tests.support.harness import Harness
from tests.support.metrics import Collected
from tests.support.pgadmin import Admin, dsn, pool_name
from tests.support.postgres import PostgresCluster
from tests.support.threads import until

pytestmark = pytest.mark.postgres


_KEEPS_A_FLOOR = hasattr(asyncpg.pool.Pool, "_maintain_min_size")
"""Whether this asyncpg (0.32+) keeps its ``min_size`` connections open: it restores a lost
one at once, and closes none for inactivity. The tests of that floor expect what the
installed asyncpg does, either way (never skipped)."""


@pytest.fixture
def pg(postgres: PostgresCluster) -> PostgresCluster:
    return postgres


@pytest.fixture
def admin(pg: PostgresCluster) -> Iterator[Admin]:
    made = Admin(pg)
    try:
        yield made
    finally:
        made.close()


def _snapshot(name: str) -> poolwatch.PoolSnapshot:
    [snap] = [s for s in poolwatch.pools() if s.name == name]
    return snap


def _levels(snap: poolwatch.PoolSnapshot) -> tuple[int, int, int | None, int]:
    return (snap.used, snap.idle, snap.max, snap.pending)


def _closed(got: Collected, name: str) -> dict[str, int]:
    return {
        p.attributes["reason"]: int(p.value)
        for p in got.points("poolwatch.connections.closed", pool__name=name)
        if p.value
    }


def _run(scenario: Callable[[], Awaitable[Any]], seconds: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), seconds))


def test_checkouts_levels_and_reuse_are_exact(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)

    async def scenario() -> tuple[poolwatch.PoolSnapshot, poolwatch.PoolSnapshot, int]:
        seen: set[int] = set()  # backend pids: one per connection of this pool
        async with asyncpg.create_pool(dsn(pg), min_size=2, max_size=4) as pool:
            for _ in range(20):
                async with pool.acquire() as con:
                    seen.add(con.get_server_pid())
            held = [await pool.acquire() for _ in range(3)]
            seen.update(con.get_server_pid() for con in held)
            during = _snapshot(name)
            assert (pool.get_size() - pool.get_idle_size(), pool.get_idle_size()) == (3, 0)
            for con in held:
                await pool.release(con)
            after = _snapshot(name)
            assert pool.get_idle_size() == after.idle == 3
        return during, after, len(seen)

    during, after, connections = _run(scenario)
    assert _levels(during) == (3, 0, 4, 0)
    assert connections == 3  # LIFO: the 20 checkouts in a row use one connection
    assert (after.checkouts, after.connects) == (23, 3)
    assert after.reused == 23 - connections
    got = pw.collect()
    assert got.count("poolwatch.use.duration", pool__name=name) == 23
    assert got.value("poolwatch.connections.idle.max", pool__name=name) == 4
    assert _closed(got, name) == {"disposed": 3}
    assert got.value("poolwatch.connections", pool__name=name, state="idle") == 0


@pytest.mark.semconv
def test_min_size_is_the_idle_minimum(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)

    async def scenario() -> None:
        async with asyncpg.create_pool(dsn(pg), min_size=2, max_size=5):
            pass

    _run(scenario)
    got = pw.collect()
    assert got.value("db.client.connection.idle.min", db__client__connection__pool__name=name) == 2
    assert got.value("db.client.connection.idle.max", db__client__connection__pool__name=name) == 5
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 2


def test_exhaustion_gives_exact_timeouts_and_visible_pending(
    pw: Harness, pg: PostgresCluster
) -> None:
    name = pool_name(pg)

    async def scenario() -> tuple[poolwatch.PoolSnapshot, list[str]]:
        async with asyncpg.create_pool(dsn(pg), min_size=2, max_size=2) as pool:
            held = [await pool.acquire(), await pool.acquire()]

            async def caller() -> str:
                try:
                    async with pool.acquire(timeout=1.0) as con:
                        await con.fetchval("SELECT 1")
                except TimeoutError:
                    return "timeout"
                return "acquired"

            tasks = [asyncio.create_task(caller()) for _ in range(3)]
            await until(lambda: _snapshot(name).pending == 3)
            during = _snapshot(name)
            outcomes = list(await asyncio.gather(*tasks))
            assert _snapshot(name).pending == 0
            for con in held:
                await pool.release(con)
            return during, outcomes

    during, outcomes = _run(scenario)
    assert _levels(during) == (2, 0, 2, 3)
    assert outcomes == ["timeout"] * 3
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name=name) == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="timeout") == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 2
    timed_out = got.histogram("poolwatch.wait.duration", pool__name=name, outcome="timeout")
    assert timed_out.min >= 1.0
    assert [a.name for a in _snapshot(name).antipatterns] == []  # every wait had a timeout


def test_callers_waiting_without_a_timeout_are_an_antipattern(
    pw: Harness, pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="poolwatch")
    name = pool_name(pg)

    async def scenario() -> poolwatch.PoolSnapshot:
        async with asyncpg.create_pool(dsn(pg), min_size=1, max_size=1) as pool:
            held = await pool.acquire()
            waiter = asyncio.create_task(pool.fetchval("SELECT 1"))  # acquire() for ever
            await until(lambda: _snapshot(name).pending == 1)
            snap = _snapshot(name)
            await pool.release(held)
            assert await waiter == 1
            return snap

    snap = _run(scenario)
    [found] = snap.antipatterns
    assert found.name == "no_pool_timeout"
    assert "Pool.acquire() without timeout=" in found.problem
    assert "timeout=" in found.advice
    assert sum("no_pool_timeout" in r.getMessage() for r in caplog.records) == 1


def test_a_killed_idle_connection_is_stale_at_once(
    pw: Harness, pg: PostgresCluster, admin: Admin
) -> None:
    name = pool_name(pg)

    async def scenario() -> tuple[poolwatch.PoolSnapshot, int]:
        async with asyncpg.create_pool(dsn(pg), min_size=0, max_size=2) as pool:
            async with pool.acquire() as con:
                pid = con.get_server_pid()
            assert _snapshot(name).idle == 1
            admin.terminate(pid)
            await until(lambda: pool.get_size() == 0)  # asyncpg saw the connection go
            snap = _snapshot(name)
            async with pool.acquire() as con:  # a new connection
                assert con.get_server_pid() != pid
            return snap, pool.get_size()

    snap, size = _run(scenario)
    assert _levels(snap) == (0, 0, 2, 0)
    assert snap.closed["stale"] == 1
    assert size == 1
    got = pw.collect()
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 2
    assert got.count("poolwatch.connection.lifetime", pool__name=name, reason="stale") == 1


def test_a_killed_held_connection_is_stale_and_its_use_ends(
    pw: Harness, pg: PostgresCluster, admin: Admin
) -> None:
    name = pool_name(pg)

    async def scenario() -> tuple[poolwatch.PoolSnapshot, poolwatch.PoolSnapshot]:
        # min_size=0: nothing replaces the lost connection (asyncpg 0.32+ restores a floor)
        async with asyncpg.create_pool(dsn(pg), min_size=0, max_size=1) as pool:
            con = await pool.acquire()
            admin.terminate(con.get_server_pid())
            await until(lambda: pool.get_size() == 0)
            gone = _snapshot(name)  # asyncpg took the holder back when the server ended it
            with pytest.raises(asyncpg.InterfaceError):  # "released back to the pool"
                await con.fetchval("SELECT 1")
            await pool.release(con)  # does nothing: already back
            async with pool.acquire(timeout=5) as again:
                assert await again.fetchval("SELECT 1") == 1
            return gone, _snapshot(name)

    gone, after = _run(scenario)
    assert _levels(gone) == (0, 0, 1, 0)
    assert (gone.closed["stale"], after.checkouts) == (1, 2)
    got = pw.collect()
    assert got.count("poolwatch.use.duration", pool__name=name) == 2
    assert _closed(got, name) == {"stale": 1, "disposed": 1}


def test_a_killed_floor_connection_is_stale_and_its_replacement_a_connect(
    pw: Harness, pg: PostgresCluster, admin: Admin
) -> None:
    """asyncpg 0.32+ replaces the lost ``min_size`` connection at once; before, the next
    ``acquire()`` opens its replacement."""
    name = pool_name(pg)
    floor = 1 if _KEEPS_A_FLOOR else 0  # connections open once the lost one is gone

    async def scenario() -> tuple[poolwatch.PoolSnapshot, poolwatch.PoolSnapshot, bool]:
        async with asyncpg.create_pool(dsn(pg), min_size=1, max_size=1) as pool:
            con = await pool.acquire()
            killed = con.get_server_pid()
            admin.terminate(killed)
            # asyncpg takes the holder back (0.32+: its maintenance task opens a replacement)
            await until(lambda: _snapshot(name).closed["stale"] == 1 and pool.get_size() == floor)
            restored = _snapshot(name)
            assert (pool.get_size(), pool.get_idle_size()) == (floor, floor)
            async with pool.acquire(timeout=5) as again:
                replacement = again.get_server_pid()
            return restored, _snapshot(name), replacement != killed

    restored, after, replaced = _run(scenario)
    assert replaced
    assert _levels(restored) == (0, floor, 1, 0)
    assert (restored.connects, restored.checkouts) == (1 + floor, 1)
    assert (after.checkouts, after.reused) == (2, 0)  # the replacement's first checkout
    got = pw.collect()
    assert got.count("poolwatch.use.duration", pool__name=name) == 2
    assert _closed(got, name) == {"stale": 1, "disposed": 1}


def test_a_floor_connection_outlives_max_inactive_connection_lifetime(
    pw: Harness, pg: PostgresCluster
) -> None:
    """What the stale advice for asyncpg says of asyncpg 0.32+: a ``min_size`` connection is
    not closed for inactivity (one above the floor is: ``test_closes_by_reason``); before
    0.32, it was."""
    name = pool_name(pg)

    async def scenario() -> tuple[int, int, poolwatch.PoolSnapshot]:
        async with asyncpg.create_pool(
            dsn(pg), min_size=1, max_size=1, max_inactive_connection_lifetime=0.2
        ) as pool:
            async with pool.acquire() as con:
                before = con.get_server_pid()
            await asyncio.sleep(0.6)  # three lifetimes idle
            async with pool.acquire(timeout=5) as con:
                after = con.get_server_pid()
            return before, after, _snapshot(name)

    before, after, snap = _run(scenario)
    if _KEEPS_A_FLOOR:
        assert after == before
        assert (snap.connects, snap.closed["idle_expired"], snap.reused) == (1, 0, 1)
    else:  # closed as idle_expired, the next acquire() opens another
        assert after != before
        assert (snap.connects, snap.closed["idle_expired"], snap.reused) == (2, 1, 0)


def test_closes_by_reason(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)

    async def failing_reset(con: asyncpg.Connection) -> None:
        raise RuntimeError("the reset callback fails")

    def make(**settings: Any) -> Any:  # one place in the code: one series
        return asyncpg.create_pool(dsn(pg), min_size=0, max_size=1, **settings)

    async def scenario() -> dict[str, int]:
        disposed = 0
        # max_inactive_connection_lifetime: closed while idle (idle_expired)
        async with make(max_inactive_connection_lifetime=0.3) as pool:
            await pool.fetchval("SELECT 1")
            await until(lambda: pool.get_size() == 0)
        # max_queries: closed on release once it served that many (max_lifetime)
        async with make(max_queries=2) as pool, pool.acquire() as con:
            for _ in range(2):
                await con.fetchval("SELECT 1")
        # expire_connections(): an idle one replaced at its next checkout, a held one
        # closed on release; the application closing one it holds (invalidated, 3)
        async with make() as pool:
            await pool.fetchval("SELECT 1")
            await pool.expire_connections()
            async with pool.acquire() as con:
                await pool.expire_connections()
            async with pool.acquire() as con:
                await con.close()
            await until(lambda: _snapshot(name).closed["invalidated"] == 3)
        # the reset failing: terminated on release, and release() raises (error, 2)
        async with make(reset=failing_reset) as pool:
            for _ in range(2):
                with pytest.raises(RuntimeError, match="reset"):
                    async with pool.acquire() as con:
                        await con.fetchval("SELECT 1")
                assert pool.get_size() == 0
            async with make() as other:  # the same series: its idle one is closed with it
                await other.fetchval("SELECT 1")
                disposed += other.get_size()
        return {"disposed": disposed}

    expected = _run(scenario)
    got = pw.collect()
    assert _closed(got, name) == {
        "idle_expired": 1,
        "max_lifetime": 1,
        "invalidated": 3,
        "error": 2,
        **expected,
    }


def test_setup_and_init_failures_close_as_errors(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)
    calls = {"setup": 0, "init": 0}

    async def setup(con: Any) -> None:
        calls["setup"] += 1
        if calls["setup"] == 1:
            raise RuntimeError("setup fails once")

    async def init(con: Any) -> None:
        calls["init"] += 1
        if calls["init"] == 2:
            raise RuntimeError("init fails once")

    async def scenario() -> None:
        async with asyncpg.create_pool(
            dsn(pg), min_size=0, max_size=1, setup=setup, init=init
        ) as pool:
            with pytest.raises(RuntimeError, match="setup"):
                await pool.acquire()
            with pytest.raises(RuntimeError, match="init"):
                await pool.acquire()
            async with pool.acquire() as con:
                assert await con.fetchval("SELECT 1") == 1

    _run(scenario)
    got = pw.collect()
    assert _closed(got, name) == {"error": 2, "disposed": 1}
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="error") == 2
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 1
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 3


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_connect_failures(pw: Harness) -> None:
    port = _closed_port()
    name = f"postgresql://127.0.0.1:{port}/nowhere"

    async def scenario() -> None:
        pool = asyncpg.create_pool(
            host="127.0.0.1", port=port, database="nowhere", user="u", password="p", min_size=0
        )
        await pool
        try:
            with pytest.raises(OSError):
                await pool.acquire(timeout=5)
        finally:
            await pool.close()

    _run(scenario)
    got = pw.collect()
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="error") == 1
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="error") == 1
    assert got.value("poolwatch.timeouts", pool__name=name) == 0


def test_a_connect_function_returning_no_connection_is_a_failed_connect(
    pw: Harness, pg: PostgresCluster
) -> None:
    """A ``connect=`` function that returns something else than a connection: asyncpg
    refuses it (InterfaceError); poolwatch counts a failed connect and an errored wait, and
    no internal error (it tried to keep a weak reference to the int: found by asyncpg's
    own test_pool.py in the compat run)."""
    name = pool_name(pg)

    async def not_a_connection(*args: Any, **kwargs: Any) -> int:
        return 1

    async def scenario() -> None:
        async with asyncpg.create_pool(
            dsn(pg), min_size=0, max_size=1, connect=not_a_connection
        ) as pool:
            with pytest.raises(asyncpg.InterfaceError):
                await pool.acquire(timeout=5)

    _run(scenario)
    got = pw.collect()
    assert pw.handle is not None and pw.handle.errors == {}
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="error") == 1
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 0
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="error") == 1


def test_a_pool_dropped_unclosed_is_freed(pw: Harness, pg: PostgresCluster) -> None:
    """poolwatch keeps no asyncpg pool alive: one the application drops with its
    connections open, never closed, is freed by the garbage collector (its connections
    warn that they were not closed, as they do without poolwatch). Its connections' ledger
    entries must not lead back to the pool (found by asyncpg's own test_pool.py)."""

    class WeakPool(asyncpg.Pool):  # type: ignore[misc]  # asyncpg's Pool has no __weakref__
        pass

    async def scenario() -> weakref.ref[Any]:
        pool = WeakPool(
            dsn(pg),
            min_size=2,
            max_size=2,
            max_queries=50_000,
            max_inactive_connection_lifetime=0,
            connect=None,
            setup=None,
            init=None,
            reset=None,
            loop=None,
            connection_class=asyncpg.Connection,
            record_class=asyncpg.Record,
        )
        await pool
        await pool.release(await pool.acquire())
        ref = weakref.ref(pool)
        del pool
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # its unclosed connections
            gc.collect()
        return ref

    assert _run(scenario)() is None
    assert pw.handle is not None and pw.handle.errors == {}


def test_an_acquire_that_times_out_while_connecting_is_not_exhaustion(pw: Harness) -> None:
    """The acquire's timeout ran out while asyncpg opened the connection for it: the server
    did not answer (a failed connect, a wait of outcome error), the pool was not exhausted,
    and the alerts on timeouts must not fire for it."""
    with socket.socket() as silent:  # accepts TCP, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        name = f"postgresql://127.0.0.1:{port}/x"

        async def scenario() -> None:
            async with asyncpg.create_pool(
                f"postgresql://u:p@127.0.0.1:{port}/x", min_size=0, max_size=1
            ) as pool:
                with pytest.raises(TimeoutError):
                    await pool.acquire(timeout=0.3)

        _run(scenario)
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="error") == 1
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="error") == 1
    assert got.value("poolwatch.timeouts", pool__name=name) == 0


def test_names_carry_no_credentials(harness: Harness, pg: PostgresCluster) -> None:
    harness.instrument()
    secret = pg.password
    ways: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((dsn(pg, sslmode="disable", application_name="named"),), {}),
        (
            (),
            {
                "host": pg.host,
                "port": pg.port,
                "database": pg.dbname,
                "user": pg.user,
                "password": secret,
            },
        ),
        ((f"postgresql://{pg.user}@{pg.host}:{pg.port}/{pg.dbname}",), {"password": secret}),
    ]

    async def scenario() -> None:
        for args, kwargs in ways:
            async with asyncpg.create_pool(*args, min_size=1, max_size=1, **kwargs) as pool:
                assert await pool.fetchval("SELECT 1") == 1

    _run(scenario)
    got = harness.collect()
    values = {
        str(v)
        for metric in got.metrics.values()
        for p in metric.data.data_points
        for v in p.attributes.values()
    }
    [snap] = poolwatch.pools()  # one place in the code made three pools: one series
    assert (snap.name, snap.kind, snap.instances_created) == (pool_name(pg), "asyncpg", 3)
    assert not any(secret in v or f"{pg.user}" in v or "@" in v for v in values)
    assert secret not in repr(poolwatch.pools())
    wait = got.points("poolwatch.wait.duration", outcome="acquired")[0]
    assert wait.attributes["server.address"] == pg.host
    assert wait.attributes["server.port"] == pg.port


def test_leaks_held_past_the_threshold_and_dropped_unreleased(
    harness: Harness, pg: PostgresCluster
) -> None:
    harness.instrument(leak_threshold=0.2, leak_stacks="always")
    name = pool_name(pg)

    async def scenario() -> poolwatch.PoolSnapshot:
        pool = await asyncpg.create_pool(dsn(pg), min_size=1, max_size=2)
        try:
            con = await pool.acquire()
            await asyncio.sleep(0.3)
            assert _snapshot(name).leaks_active == 1
            await pool.release(con)
            del con

            async def borrow_and_forget() -> None:
                forgotten = await pool.acquire()
                await forgotten.fetchval("SELECT 1")  # and never released

            await borrow_and_forget()
            for _ in range(3):  # confirmed at two collections in a row
                dropped = _snapshot(name)
            return dropped
        finally:
            pool.terminate()  # close() would wait for the dropped connection for ever

    dropped = _run(scenario)
    # The dropped checkout is a leak; asyncpg's holder stays checked out (a lost slot).
    assert (dropped.leaks, dropped.used, dropped.leaks_active) == (2, 1, 0)


def test_a_pool_made_before_instrument_is_found(harness: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)

    async def scenario() -> poolwatch.PoolSnapshot:
        async with asyncpg.create_pool(dsn(pg), min_size=2, max_size=3) as pool:
            harness.instrument()
            for _ in range(3):
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")
            await pool.expire_connections()
            async with pool.acquire():
                pass
            # asyncpg closes the expired connection in a task of its own, which can end
            # after the acquire() that replaced it.
            await until(lambda: _snapshot(name).closed["invalidated"] > 0)
            return _snapshot(name)

    snap = _run(scenario)
    assert (snap.checkouts, snap.max) == (4, 3)
    assert snap.closed["invalidated"] == 1  # opened before instrument(): lifetime unknown
    got = harness.collect()
    assert got.count("poolwatch.connection.lifetime", pool__name=name, reason="invalidated") == 0


def test_uninstrument_restores_everything(harness: Harness, pg: PostgresCluster) -> None:
    from asyncpg import connection
    from asyncpg import pool as pool_module

    classes = (pool_module.Pool, pool_module.PoolConnectionHolder, connection.Connection)
    before = {cls: dict(vars(cls)) for cls in classes}
    harness.instrument()

    async def scenario() -> None:
        async with asyncpg.create_pool(dsn(pg), min_size=1, max_size=1) as pool:
            watched = pool._connect
            assert watched is not asyncpg.connect
            assert await pool.fetchval("SELECT 1") == 1
            assert harness.collect().names()
            poolwatch.uninstrument()
            assert pool._connect is asyncpg.connection.connect
            assert await pool.fetchval("SELECT 1") == 1

    _run(scenario)
    assert harness.collect().names() == set()
    assert {cls: dict(vars(cls)) for cls in classes} == before
    gc.collect()


def test_an_acquire_waiting_while_uninstrument_runs_completes(
    harness: Harness, pg: PostgresCluster
) -> None:
    handle = harness.instrument()
    name = pool_name(pg)

    async def scenario() -> object:
        async with asyncpg.create_pool(dsn(pg), min_size=1, max_size=1) as pool:
            held = await pool.acquire()
            waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
            await until(lambda: _snapshot(name).pending == 1)
            poolwatch.uninstrument()
            await pool.release(held)
            return await asyncio.wait_for(waiter, 10)

    assert _run(scenario) == 1
    assert handle.errors == {}
