"""SQLAlchemy pools against a real PostgreSQL: exhaustion, stale connections, restarts.

The server is started by the ``postgres`` session fixture (tests/support/postgres.py) on a
free loopback port, with password authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc

import poolwatch
from tests.support.harness import Harness
from tests.support.pools import one_pool
from tests.support.postgres import PostgresCluster
from tests.support.scenarios import exhaust_async_pool
from tests.support.threads import wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg(postgres: PostgresCluster) -> PostgresCluster:
    return postgres


def _name(pg: PostgresCluster) -> str:
    return f"postgresql://127.0.0.1:{pg.port}/{pg.dbname}"


@pytest.fixture
def engine_factory(pg: PostgresCluster) -> Iterator[Callable[..., sa.Engine]]:
    engines: list[sa.Engine] = []

    def make(**kwargs: Any) -> sa.Engine:
        engine = sa.create_engine(pg.url(), **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.mark.semconv
def test_exhaustion_gives_exact_timeouts_and_visible_pending(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory(pool_size=2, max_overflow=1, pool_timeout=0.2)
    name = _name(pg)
    callers = 6
    start = threading.Barrier(callers)
    attempted = threading.Semaphore(0)
    release = threading.Event()
    outcomes: list[str] = []

    def caller() -> None:
        start.wait()
        try:
            conn = engine.connect()
        except exc.TimeoutError:
            outcomes.append("timeout")
            attempted.release()
            return
        outcomes.append("acquired")
        attempted.release()
        release.wait(30)
        conn.close()

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: one_pool(name).pending > 0, 10.0)
        for _ in range(callers):
            assert attempted.acquire(timeout=30)
        held = one_pool(name)
        assert (held.used, held.idle, held.max, held.pending) == (3, 0, 3, 0)
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert sorted(outcomes) == ["acquired"] * 3 + ["timeout"] * 3
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name=name) == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="timeout") == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 3
    assert got.value("db.client.connection.timeouts", db__client__connection__pool__name=name) == 3
    assert got.value("poolwatch.connections", pool__name=name, state="used") == 0
    assert got.value("poolwatch.connections", pool__name=name, state="idle") == 2
    assert got.value("poolwatch.connections.closed", pool__name=name, reason="pool_full") == 1
    assert got.count("poolwatch.connection.lifetime", pool__name=name, reason="pool_full") == 1


def test_names_carry_no_credentials(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine_factory().connect().close()
    got = pw.collect()
    values = {
        str(v)
        for metric in got.metrics.values()
        for p in metric.data.data_points
        for v in p.attributes.values()
    }
    assert _name(pg) in values
    assert not any(pg.password in v or f"{pg.user}:" in v or "@" in v for v in values)
    assert pg.password not in repr(poolwatch.pools())
    wait = got.histogram("poolwatch.wait.duration", outcome="acquired")
    assert wait.attributes["server.address"] == "127.0.0.1"
    assert wait.attributes["server.port"] == pg.port


def test_names_can_be_chosen(harness: Harness, pg: PostgresCluster) -> None:
    harness.instrument(pool_names={_name(pg): "orders"})
    chosen = sa.create_engine(pg.url())
    renamed = sa.create_engine(pg.url(), pool_size=1)
    poolwatch.track(renamed, name="orders-reporting")
    for engine in (chosen, renamed):
        engine.connect().close()
        engine.dispose()
    assert sorted(s.name for s in poolwatch.pools()) == ["orders", "orders-reporting"]


def test_pre_ping_finds_a_killed_backend_stale(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory(pool_size=1, max_overflow=0, pool_pre_ping=True)
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    name = _name(pg)
    before = pw.collect().count("poolwatch.connect.duration", pool__name=name, outcome="ok")
    assert isinstance(pid, int)
    _terminate(pg, pid)
    with engine.connect() as conn:  # pre-ping sees the dead backend and reconnects
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() != pid
    got = pw.collect()
    assert got.value("poolwatch.connections.closed", pool__name=name, reason="stale") == 1
    after = got.count("poolwatch.connect.duration", pool__name=name, outcome="ok")
    assert after == before + 1


def _terminate(pg: PostgresCluster, pid: int) -> None:
    import psycopg

    with psycopg.connect(  # outside SQLAlchemy: not a pool poolwatch sees
        host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.dbname
    ) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_a_disconnect_found_by_a_query_is_stale(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory(pool_size=1, max_overflow=0)  # no pre-ping
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        assert isinstance(pid, int)
        _terminate(pg, pid)
        with pytest.raises(exc.OperationalError) as caught:
            conn.execute(sa.text("SELECT 1"))
        assert caught.value.connection_invalidated
    with engine.connect() as conn:  # the pool opened a new connection
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    got = pw.collect()
    closed = {
        p.attributes["reason"]: p.value
        for p in got.points("poolwatch.connections.closed", pool__name=_name(pg))
    }
    assert closed == {"stale": 1}


def test_server_restart_mid_load_is_accounted_exactly(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory(pool_size=3, max_overflow=0, pool_timeout=5, pool_pre_ping=True)
    name = _name(pg)
    acquired = 0
    failed = 0
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        nonlocal acquired, failed
        deadline = time.monotonic() + 20
        for _ in range(2000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                conn = engine.connect()
            except exc.DBAPIError:
                with lock:
                    failed += 1
                time.sleep(0.02)
                continue
            with lock:
                acquired += 1
            try:
                conn.execute(sa.text("SELECT 1"))
                conn.close()
            except exc.DBAPIError:
                # The restart killed this connection mid-query, or under the rollback
                # that close() runs; the connection goes back to the pool either way.
                with contextlib.suppress(exc.DBAPIError):
                    conn.close()
            time.sleep(0.002)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: acquired >= 30, 10.0)
        pg.restart()
        seen = acquired
        wait_until(lambda: acquired >= seen + 30, seconds=15)  # the load recovers
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == acquired
    failures = got.count("poolwatch.wait.duration", pool__name=name, outcome="error") + got.count(
        "poolwatch.wait.duration", pool__name=name, outcome="timeout"
    )
    assert failures == failed
    closed = {
        p.attributes["reason"]: p.value
        for p in got.points("poolwatch.connections.closed", pool__name=name)
    }
    assert closed["stale"] >= 1
    assert got.count("poolwatch.use.duration", pool__name=name) == acquired


@pytest.mark.semconv
def test_checkouts_are_counted_exactly_across_threads(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory(pool_size=4, max_overflow=2, pool_timeout=30)
    threads, each = 8, 63  # 504 checkouts
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(each):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    got = pw.collect()
    name = _name(pg)
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 504
    assert got.count("poolwatch.use.duration", pool__name=name) == 504
    assert got.count("db.client.connection.wait_time") == 504


def test_connect_failures_are_counted_and_reach_the_caller(pw: Harness) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    engine = sa.create_engine(
        f"postgresql+psycopg://app:pw@127.0.0.1:{closed_port}/none",
        connect_args={"connect_timeout": 2},
    )
    with pytest.raises(exc.OperationalError):
        engine.connect()
    got = pw.collect()
    name = f"postgresql://127.0.0.1:{closed_port}/none"
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="error") == 1
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 0
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="error") == 1


@pytest.mark.semconv
def test_first_checkout_opens_exactly_one_connection(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory()
    for _ in range(5):
        engine.connect().close()
    got = pw.collect()
    connect = got.histogram("poolwatch.connect.duration", pool__name=_name(pg), outcome="ok")
    assert connect.count == 1 and connect.min > 0
    assert got.count("db.client.connection.create_time") == 1


def test_dispose_closes_idle_connections_as_disposed(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory(pool_size=3)
    held = [engine.connect() for _ in range(3)]
    for conn in held:
        conn.close()
    assert one_pool(_name(pg)).idle == 3
    engine.dispose()
    engine.connect().close()
    snap = one_pool(_name(pg))
    assert snap.closed["disposed"] == 3
    assert (snap.checkouts, snap.idle, snap.instances) == (4, 1, 1)


def test_pool_recycle_closes_old_connections_as_max_lifetime(
    pw: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    engine = engine_factory(pool_size=1, pool_recycle=1)
    engine.connect().close()
    time.sleep(1.2)
    engine.connect().close()
    got = pw.collect()
    name = _name(pg)
    assert got.value("poolwatch.connections.closed", pool__name=name, reason="max_lifetime") == 1
    lifetime = got.histogram(
        "poolwatch.connection.lifetime", pool__name=name, reason="max_lifetime"
    )
    assert lifetime.count == 1 and lifetime.min >= 1.0


def test_nothing_is_exported_after_uninstrument(
    harness: Harness, pg: PostgresCluster, engine_factory: Callable[..., sa.Engine]
) -> None:
    harness.instrument()
    engine = engine_factory()
    engine.connect().close()
    assert harness.collect().names()
    poolwatch.uninstrument()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    assert harness.collect().names() == set()


def test_async_engine_on_asyncpg(pw: Harness, pg: PostgresCluster) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    name = _name(pg)

    async def scenario() -> tuple[poolwatch.PoolSnapshot, list[str]]:
        engine = create_async_engine(
            pg.url("asyncpg"), pool_size=1, max_overflow=0, pool_timeout=0.3
        )
        for _ in range(100):
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        try:
            return await exhaust_async_pool(engine, lambda: one_pool(name))
        finally:
            await engine.dispose()

    during, outcomes = asyncio.run(scenario())
    assert (during.used, during.idle, during.max, during.pending) == (1, 0, 1, 2)
    assert outcomes == ["timeout", "timeout"]
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 101
    assert got.value("poolwatch.timeouts", pool__name=name) == 2
    assert not re.search(re.escape(pg.password), repr(poolwatch.pools()))
