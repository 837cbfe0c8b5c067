"""psycopg_pool pools against a real PostgreSQL: exact counts, exhaustion, killed backends,
closes by reason, connect failures, names, leaks — sync pools from threads, async pools on a
real event loop.

The server is the ``postgres`` session fixture (tests/support/postgres.py): a throw-away
cluster on a loopback port with password authentication. Figures are compared with what
the pool itself says (``get_stats()``), what the test did, and what the server saw.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

import poolwatch
from tests.support.harness import Harness
from tests.support.metrics import Collected
from tests.support.pgadmin import Admin, dsn, pool_name
from tests.support.postgres import PostgresCluster
from tests.support.threads import wait_until

pytestmark = pytest.mark.postgres


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


@pytest.fixture(autouse=True)
def _quiet_pool_log(caplog: pytest.LogCaptureFixture) -> None:
    # psycopg_pool logs a WARNING for each connection it discards: expected here.
    caplog.set_level(logging.ERROR, logger="psycopg.pool")


def _snapshot(name: str) -> poolwatch.PoolSnapshot:
    [snap] = [s for s in poolwatch.pools() if s.name == name]
    return snap


def _closed(got: Collected, name: str) -> dict[str, int]:
    return {
        p.attributes["reason"]: int(p.value)
        for p in got.points("poolwatch.connections.closed", pool__name=name)
        if p.value
    }


def _levels(snap: poolwatch.PoolSnapshot) -> tuple[int, int, int | None, int]:
    return (snap.used, snap.idle, snap.max, snap.pending)


def test_checkouts_levels_and_reuse_are_exact(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(dsn(pg), min_size=2, max_size=4, open=True) as pool:
        pool.wait()
        seen: set[int] = set()  # backend pids: one per connection of this pool
        for _ in range(20):
            with pool.connection() as conn:
                seen.add(conn.info.backend_pid)
                conn.execute("SELECT 1")
        held = [pool.getconn() for _ in range(3)]  # the pool grows by one for the third
        seen.update(conn.info.backend_pid for conn in held)
        assert pool.get_stats()["pool_available"] == 0
        assert _levels(_snapshot(name)) == (3, 0, 4, 0)
        for conn in held:
            pool.putconn(conn)
        snap = _snapshot(name)
        stats = pool.get_stats()
    got = pw.collect()
    assert snap.checkouts == stats["requests_num"] == 23
    assert snap.connects == stats["connections_num"] == 3
    assert snap.reused == 23 - len(seen)  # every checkout but each connection's first
    assert _levels(snap) == (0, 3, 4, 0)
    assert got.value("poolwatch.connections.idle.max", pool__name=name) == 4
    assert got.count("poolwatch.use.duration", pool__name=name) == 23
    assert got.value("poolwatch.leaks", pool__name=name) == 0
    assert _closed(got, name) == {"disposed": 3}  # close() of the pool
    assert got.value("poolwatch.connections", pool__name=name, state="idle") == 0


@pytest.mark.semconv
def test_min_size_is_the_idle_minimum(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(dsn(pg), min_size=2, max_size=5, open=True) as pool:
        pool.wait()
        got = pw.collect()
    assert got.value("db.client.connection.idle.min", db__client__connection__pool__name=name) == 2
    assert got.value("db.client.connection.idle.max", db__client__connection__pool__name=name) == 5
    assert got.value("db.client.connection.max", db__client__connection__pool__name=name) == 5


def _exhaust(pool: Any, name: str, callers: int) -> tuple[list[str], poolwatch.PoolSnapshot, int]:
    """``callers`` threads ask an exhausted pool for a connection; returns their outcomes,
    the pool as poolwatch saw it while they all waited, and psycopg's own waiting count
    after they gave up."""
    outcomes: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        try:
            conn = pool.getconn()
        except psycopg_pool.PoolTimeout:
            with lock:
                outcomes.append("timeout")
            return
        with lock:
            outcomes.append("acquired")
        pool.putconn(conn)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    wait_until(lambda: _snapshot(name).pending == callers)
    during = _snapshot(name)
    for t in threads:
        t.join(30)
    return outcomes, during, pool.get_stats()["requests_waiting"]


def test_exhaustion_gives_exact_timeouts_and_visible_pending(
    pw: Harness, pg: PostgresCluster
) -> None:
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(
        dsn(pg), min_size=2, max_size=2, timeout=1.0, open=True
    ) as pool:
        pool.wait()
        held = [pool.getconn(), pool.getconn()]
        outcomes, during, waiting_after = _exhaust(pool, name, 3)
        # psycopg_pool leaves a client that timed out in its queue until a connection comes
        # back: its own count still says 3 are waiting; poolwatch's says none is.
        assert waiting_after == 3
        assert _snapshot(name).pending == 0
        for conn in held:
            pool.putconn(conn)
        stats = pool.get_stats()
    assert _levels(during) == (2, 0, 2, 3)
    assert outcomes == ["timeout"] * 3
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name=name) == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="timeout") == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 2
    assert stats["requests_errors"] == 3
    timed_out = got.histogram("poolwatch.wait.duration", pool__name=name, outcome="timeout")
    assert timed_out.min >= 1.0


def test_too_many_requests_waiting_is_a_timeout(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(
        dsn(pg), min_size=1, max_size=1, timeout=5, max_waiting=1, open=True
    ) as pool:
        pool.wait()
        held = pool.getconn()
        waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
        waiter.start()
        wait_until(lambda: _snapshot(name).pending == 1)
        with pytest.raises(psycopg_pool.TooManyRequests):
            pool.getconn()
        pool.putconn(held)
        waiter.join(30)
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name=name) == 1
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 2


def test_async_pool_exhaustion_on_a_real_event_loop(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)

    async def scenario() -> tuple[poolwatch.PoolSnapshot, list[str], dict[str, int]]:
        async with psycopg_pool.AsyncConnectionPool(
            dsn(pg), min_size=1, max_size=1, timeout=1.0, open=False
        ) as pool:
            await pool.wait()
            held = await pool.getconn()

            async def caller() -> str:
                try:
                    async with pool.connection() as conn:
                        await conn.execute("SELECT 1")
                except psycopg_pool.PoolTimeout:
                    return "timeout"
                return "acquired"

            tasks = [asyncio.create_task(caller()) for _ in range(2)]
            for _ in range(100):  # until both wait (bounded: their 1 s timeout)
                await asyncio.sleep(0.01)
                if _snapshot(name).pending == 2:
                    break
            during = _snapshot(name)
            outcomes = list(await asyncio.gather(*tasks))
            await pool.putconn(held)
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            return during, outcomes, pool.get_stats()

    during, outcomes, stats = asyncio.run(scenario())
    assert _levels(during) == (1, 0, 1, 2)
    assert outcomes == ["timeout", "timeout"]
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name=name) == 2
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 2
    assert stats["requests_num"] == 4
    assert got.count("poolwatch.use.duration", pool__name=name) == 2
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 1
    assert _closed(got, name) == {"disposed": 1}


def test_a_killed_backend_returned_by_its_borrower_is_stale(
    pw: Harness, pg: PostgresCluster, admin: Admin
) -> None:
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(dsn(pg), min_size=1, max_size=1, open=True) as pool:
        pool.wait()
        with pytest.raises(psycopg.errors.AdminShutdown), pool.connection() as conn:
            admin.terminate(conn.info.backend_pid)
            conn.execute("SELECT 1")
        wait_until(lambda: pool.get_stats()["pool_available"] == 1)  # a new one opened
        stats = pool.get_stats()
        got = pw.collect()
    assert stats["returns_bad"] == 1
    assert _closed(got, name) == {"stale": 1}
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 2
    assert got.count("poolwatch.use.duration", pool__name=name) == 1


def test_killed_idle_connections_found_by_a_check_are_stale(
    pw: Harness, pg: PostgresCluster, admin: Admin
) -> None:
    name = pool_name(pg)
    check = psycopg_pool.ConnectionPool.check_connection
    with psycopg_pool.ConnectionPool(
        dsn(pg), min_size=1, max_size=1, check=check, open=True
    ) as pool:
        pool.wait()
        admin.terminate(pool._pool[0].info.backend_pid)
        with pool.connection() as conn:  # the check finds it dead: a new one serves
            conn.execute("SELECT 1")
        admin.terminate(pool._pool[0].info.backend_pid)
        pool.check()  # the pool's own check of its idle connections
        wait_until(lambda: pool.get_stats()["pool_available"] == 1)
        stats = pool.get_stats()
        got = pw.collect()
    assert stats["connections_lost"] == 2
    assert _closed(got, name) == {"stale": 2}
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 1


def test_closes_by_reason(pw: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)

    def failing_reset(conn: psycopg.Connection[Any]) -> None:
        if conn.info.parameter_status("application_name") == "reset-fails":
            raise RuntimeError("the reset callback fails")

    with psycopg_pool.ConnectionPool(
        dsn(pg), min_size=1, max_size=2, max_lifetime=1.0, max_idle=0.4, reset=failing_reset
    ) as pool:
        pool.wait()
        # max_idle: a second connection grown, then unused, is closed (idle_expired)
        held = [pool.getconn(), pool.getconn()]
        for conn in held:
            pool.putconn(conn)
        wait_until(lambda: pool.get_stats()["pool_size"] == 1, seconds=10)
        # max_lifetime: a connection returned past it is closed and replaced
        time.sleep(1.05)
        with pool.connection():
            pass
        wait_until(lambda: pool.get_stats()["pool_available"] == 1)
        # drain(): the idle connections are closed and replaced (invalidated)
        pool.drain()
        wait_until(lambda: pool.get_stats()["pool_available"] == 1)
        # the reset callback failing: the returned connection is closed (error)
        with pool.connection() as conn:
            conn.execute("SET application_name = 'reset-fails'")
        wait_until(lambda: pool.get_stats()["pool_available"] == 1)
        before_close = _closed(pw.collect(), name)
    got = pw.collect()
    assert before_close == {
        "idle_expired": 1,
        "max_lifetime": 1,
        "invalidated": 1,
        "error": 1,
    }
    assert _closed(got, name) == {**before_close, "disposed": 1}
    lifetime = got.histogram(
        "poolwatch.connection.lifetime", pool__name=name, reason="max_lifetime"
    )
    assert lifetime.count == 1 and lifetime.min >= 0.95  # max_lifetime less its 5% jitter


def test_a_null_pool_opens_and_closes_a_connection_per_checkout(
    pw: Harness, pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="poolwatch")
    name = pool_name(pg)
    with psycopg_pool.NullConnectionPool(dsn(pg), open=True) as pool:
        for _ in range(4):
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        snap = _snapshot(name)
        stats = pool.get_stats()
    assert (snap.checkouts, snap.connects, snap.reused) == (4, 4, 0)
    assert stats["connections_num"] == 4
    assert _levels(snap) == (0, 0, None, 0)  # max_size=0: no limit
    assert snap.closed["disposed"] == 4
    assert [a.name for a in snap.antipatterns] == ["unbounded_pool"]
    assert "NullConnectionPool(max_size=0)" in snap.antipatterns[0].problem
    assert "max_size" in snap.antipatterns[0].advice
    got = pw.collect()
    assert got.points("poolwatch.connections.max", pool__name=name) == []


def test_a_null_pool_hands_a_returned_connection_to_a_waiting_caller(
    pw: Harness, pg: PostgresCluster
) -> None:
    name = pool_name(pg)
    with psycopg_pool.NullConnectionPool(dsn(pg), max_size=1, timeout=10, open=True) as pool:
        held = pool.getconn()
        waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
        waiter.start()
        wait_until(lambda: _snapshot(name).pending == 1)
        pool.putconn(held)  # a caller waits: the connection goes to it, not closed
        waiter.join(30)
        snap = _snapshot(name)
    assert (snap.checkouts, snap.connects, snap.reused) == (2, 1, 1)
    assert snap.closed["disposed"] == 1


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_connect_failures(pw: Harness, pg: PostgresCluster) -> None:
    port = _closed_port()
    name = f"postgresql://127.0.0.1:{port}/nowhere"
    conninfo = f"host=127.0.0.1 port={port} dbname=nowhere user=app password=pw"
    # A pool's workers connect in the background: its callers wait, then time out.
    pool = psycopg_pool.ConnectionPool(
        conninfo, min_size=1, timeout=0.5, reconnect_timeout=30, open=True
    )
    try:
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.getconn()
        wait_until(lambda: pool.get_stats().get("connections_errors", 0) >= 1)
    finally:
        pool.close()
    stats = pool.get_stats()
    got = pw.collect()
    assert (
        got.count("poolwatch.connect.duration", pool__name=name, outcome="error")
        == (stats["connections_errors"])
    )
    assert got.value("poolwatch.timeouts", pool__name=name) == 1
    # A null pool connects for its caller, who sees the refusal: an error, not a timeout.
    null_name = f"postgresql://127.0.0.1:{port}/elsewhere"
    with (
        psycopg_pool.NullConnectionPool(
            conninfo.replace("nowhere", "elsewhere"), open=True
        ) as null,
        pytest.raises(psycopg.OperationalError),
    ):
        null.getconn()
    got = pw.collect()
    assert got.count("poolwatch.connect.duration", pool__name=null_name, outcome="error") == 1
    assert got.count("poolwatch.wait.duration", pool__name=null_name, outcome="error") == 1
    assert got.value("poolwatch.timeouts", pool__name=null_name) == 0


def test_a_connect_that_times_out_in_a_null_pool_is_not_exhaustion(pw: Harness) -> None:
    """psycopg_pool raises PoolTimeout when the connect it makes for the caller times out:
    that is a failed connect (the server did not answer), not a pool without a free
    connection, and the alerts on timeouts must not fire for it."""
    with socket.socket() as silent:  # accepts TCP, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        name = f"postgresql://127.0.0.1:{port}/x"
        with (
            psycopg_pool.NullConnectionPool(
                f"host=127.0.0.1 port={port} dbname=x user=u password=p", timeout=1, open=True
            ) as pool,
            pytest.raises(psycopg_pool.PoolTimeout),
        ):
            pool.getconn()
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="error") == 1
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="error") == 1
    assert got.value("poolwatch.timeouts", pool__name=name) == 0


def test_names_carry_no_credentials(harness: Harness, pg: PostgresCluster) -> None:
    harness.instrument()
    secret = pg.password
    ways = [
        {"conninfo": dsn(pg, sslmode="disable", application_name="named")},
        {
            "conninfo": f"host={pg.host} port={pg.port} dbname={pg.dbname} "
            f"user={pg.user} password={secret}"
        },
        {
            "conninfo": "",
            "kwargs": {
                "host": pg.host,
                "port": pg.port,
                "dbname": pg.dbname,
                "user": pg.user,
                "password": secret,
            },
        },
    ]
    for way in ways:
        with psycopg_pool.ConnectionPool(min_size=1, open=True, **way) as pool:
            pool.wait()
            with pool.connection() as conn:
                conn.execute("SELECT 1")
    got = harness.collect()
    values = {
        str(v)
        for metric in got.metrics.values()
        for p in metric.data.data_points
        for v in p.attributes.values()
    }
    [snap] = poolwatch.pools()  # one place in the code made three pools: one series
    assert (snap.name, snap.instances_created) == (pool_name(pg), 3)
    assert not any(secret in v or f"{pg.user}:" in v or "@" in v for v in values)
    assert secret not in repr(poolwatch.pools())
    wait = got.points("poolwatch.wait.duration", outcome="acquired")[0]
    assert wait.attributes["server.address"] == pg.host
    assert wait.attributes["server.port"] == pg.port


def test_a_checkout_held_past_the_threshold_is_a_leak(
    harness: Harness, pg: PostgresCluster
) -> None:
    harness.instrument(leak_threshold=0.2, leak_stacks="always")
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(dsn(pg), min_size=1, max_size=1, open=True) as pool:
        pool.wait()
        conn = pool.getconn()
        time.sleep(0.3)
        assert _snapshot(name).leaks_active == 1
        pool.putconn(conn)
        snap = _snapshot(name)
    assert (snap.leaks, snap.leaks_active) == (1, 0)


def test_a_connection_dropped_without_putconn_is_a_leak_and_is_freed(
    harness: Harness, pg: PostgresCluster, admin: Admin
) -> None:
    harness.instrument()
    name = pool_name(pg)
    app = "dropped-unreturned"
    pool = psycopg_pool.ConnectionPool(
        dsn(pg, application_name=app), min_size=1, max_size=2, open=True
    )
    try:
        pool.wait()

        def borrow_and_forget() -> None:
            conn = pool.getconn()
            conn.execute("SELECT 1")  # and never given back

        borrow_and_forget()
        assert _snapshot(name).used == 1
        for _ in range(3):  # confirmed at two collections in a row
            snap = _snapshot(name)
        # poolwatch let go of it: freed, psycopg closed it and the server ended its backend
        wait_until(lambda: admin.backends(app) == 0)
    finally:
        pool.close()
    assert (snap.leaks, snap.used, snap.closed["error"]) == (1, 0, 1)


def test_a_pool_made_before_instrument_is_found(harness: Harness, pg: PostgresCluster) -> None:
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(dsn(pg), min_size=1, max_size=3, open=True) as pool:
        pool.wait()
        held = pool.getconn()
        harness.instrument()
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        snap = _snapshot(name)
        assert (snap.checkouts, snap.idle, snap.max) == (1, pool.get_stats()["pool_available"], 3)
        assert snap.used == 0  # the checkout made before is not in poolwatch's table
        pool.putconn(held)
        assert _snapshot(name).checkouts == 1


def test_a_pool_opened_later_is_counted_from_its_first_connection(
    pw: Harness, pg: PostgresCluster
) -> None:
    name = pool_name(pg)
    pool = psycopg_pool.ConnectionPool(dsn(pg), min_size=2, max_size=2, open=False)
    assert _levels(_snapshot(name)) == (0, 0, 2, 0)
    pool.open(wait=True)
    try:
        assert _snapshot(name).connects == pool.get_stats()["connections_num"] == 2
    finally:
        pool.close()


def test_uninstrument_restores_everything(harness: Harness, pg: PostgresCluster) -> None:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    classes = (ConnectionPool, AsyncConnectionPool, psycopg.Connection, psycopg.AsyncConnection)
    before = {cls: dict(vars(cls)) for cls in classes}
    harness.instrument()
    with ConnectionPool(dsn(pg), min_size=1, max_size=1, open=True) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert harness.collect().names()
        poolwatch.uninstrument()
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert "_poolwatch_used" not in vars(conn)
        assert "_poolwatch_ledger" not in vars(pool)
    assert harness.collect().names() == set()
    assert {cls: dict(vars(cls)) for cls in classes} == before
    gc.collect()


def test_a_getconn_waiting_while_uninstrument_runs_completes(
    harness: Harness, pg: PostgresCluster
) -> None:
    harness.instrument()
    name = pool_name(pg)
    with psycopg_pool.ConnectionPool(dsn(pg), min_size=1, max_size=1, open=True) as pool:
        held = pool.getconn()
        outcome: list[object] = []

        def wait() -> None:
            try:
                with pool.connection(timeout=10) as conn:
                    outcome.append(conn.execute("SELECT 1").fetchone())
            except BaseException as error:  # what the application would see
                outcome.append(error)

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_until(lambda: _snapshot(name).pending == 1)
        handle = harness.handle
        poolwatch.uninstrument()
        pool.putconn(held)
        waiter.join(10)
    assert outcome == [(1,)]
    assert handle is not None and handle.errors == {}
