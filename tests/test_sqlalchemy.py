"""SQLAlchemy adapter on SQLite: levels, closes by reason, naming, discovery, undo.

PostgreSQL and asyncpg behaviour is in test_postgres.py; these tests need no server and pin
the mechanics.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event, exc, pool
from sqlalchemy.pool import base

import poolwatch
from tests.support.harness import Harness
from tests.support.pools import one_pool
from tests.support.scenarios import exhaust_async_pool
from tests.support.threads import wait_until

# SQLAlchemy's pools only: instrument() also finds any other library's pool still alive.
_pool = functools.partial(one_pool, kind="sqlalchemy")


def _url(tmp_path: Path, name: str = "app.db") -> str:
    return f"sqlite:///{tmp_path}/{name}"


@pytest.mark.semconv
def test_levels_of_a_queue_pool(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(_url(tmp_path), pool_size=2, max_overflow=3)
    held = [engine.connect() for _ in range(3)]
    snap = _pool()
    assert (snap.used, snap.idle, snap.max, snap.pending) == (3, 0, 5, 0)
    for conn in held:
        conn.close()
    snap = _pool()
    assert (snap.used, snap.idle, snap.max) == (0, 2, 5)
    got = pw.collect()
    name = f"sqlite:///{tmp_path}/app.db"
    assert got.value("poolwatch.connections", pool__name=name, state="used") == 0
    assert got.value("poolwatch.connections", pool__name=name, state="idle") == 2
    assert got.value("poolwatch.connections.max", pool__name=name) == 5
    assert got.value("db.client.connection.idle.max", db__client__connection__pool__name=name) == 2
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 3
    assert got.count("poolwatch.use.duration", pool__name=name) == 3
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 3
    assert got.value("poolwatch.connections.closed", pool__name=name, reason="pool_full") == 1


def test_pending_counts_callers_blocked_on_the_pool(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(_url(tmp_path), pool_size=1, max_overflow=0, pool_timeout=10)
    held = engine.connect()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(engine.connect()))
    waiter.start()
    try:
        wait_until(lambda: _pool().pending == 1)
        assert pw.collect().value("poolwatch.pending_requests") == 1
    finally:
        held.close()
        waiter.join(5)
    assert _pool().pending == 0
    got[0].close()  # type: ignore[attr-defined]


@pytest.mark.semconv
def test_timeouts_are_exact(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(_url(tmp_path), pool_size=1, max_overflow=0, pool_timeout=0.05)
    held = engine.connect()
    for _ in range(3):
        with pytest.raises(exc.TimeoutError):
            engine.connect()
    held.close()
    got = pw.collect()
    assert got.value("poolwatch.timeouts") == 3
    assert got.count("poolwatch.wait.duration", outcome="timeout") == 3
    assert got.histogram("poolwatch.wait.duration", outcome="timeout").min >= 0.05
    assert got.value("db.client.connection.timeouts") == 3
    assert _pool().timeouts == 3


def test_checkouts_stay_exact_with_eight_threads(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(_url(tmp_path), pool_size=4, max_overflow=0, pool_timeout=30)
    threads, each = 8, 250
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(each):
            engine.pool.connect().close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", outcome="acquired") == threads * each
    assert got.count("poolwatch.use.duration") == threads * each
    assert got.value("poolwatch.connections", state="used") == 0


def test_closes_are_counted_by_reason_with_lifetimes(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(_url(tmp_path), pool_size=2, max_overflow=0, pool_recycle=3600)
    # invalidated: the application invalidates a connection
    conn = engine.connect()
    conn.invalidate()
    conn.close()
    # error: invalidated because of an error that is not a disconnect
    raw = engine.raw_connection()
    raw.invalidate(RuntimeError("driver state corrupt"))
    raw.close()
    # max_lifetime: pool_recycle exceeded at the next checkout
    raw = engine.raw_connection()
    record = raw._connection_record
    raw.close()
    assert record is not None
    record.starttime -= 7200
    engine.raw_connection().close()
    # disposed: engine.dispose() closes the idle connections
    idle = _pool().idle
    engine.dispose()
    got = pw.collect()
    closed = {p.attributes["reason"]: p.value for p in got.points("poolwatch.connections.closed")}
    assert closed == {"max_lifetime": 1, "invalidated": 1, "error": 1, "disposed": idle}
    lifetime = got.histogram("poolwatch.connection.lifetime", reason="max_lifetime")
    assert lifetime.count == 1 and lifetime.min >= 7200


def test_dispose_keeps_the_series_and_counts_the_new_pool(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(_url(tmp_path))
    engine.connect().close()
    engine.dispose()
    engine.connect().close()
    snap = _pool()
    assert snap.name == f"sqlite:///{tmp_path}/app.db"
    assert (snap.checkouts, snap.instances, snap.instances_created) == (2, 1, 2)
    assert snap.closed["disposed"] == 1


def test_engines_created_before_instrument_are_found(harness: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(_url(tmp_path, "early.db"))
    harness.instrument()
    engine.connect().close()
    snap = _pool()
    assert (snap.name, snap.checkouts) == (f"sqlite:///{tmp_path}/early.db", 1)


def test_pools_made_without_an_engine_are_found_at_checkout(pw: Harness, tmp_path: Path) -> None:
    import sqlite3

    raw_pool = pool.QueuePool(lambda: sqlite3.connect(str(tmp_path / "raw.db")), pool_size=1)
    raw_pool.connect().close()
    snap = _pool("dbapi://(QueuePool)")
    assert (snap.checkouts, snap.max) == (1, 11)
    poolwatch.track(raw_pool, name="raw-cache")
    raw_pool.connect().close()
    assert _pool("raw-cache").checkouts == 1


def test_non_queue_pools_are_reported_without_a_limit(pw: Harness, tmp_path: Path) -> None:
    url = _url(tmp_path)
    null = sa.create_engine(url, poolclass=pool.NullPool)
    static = sa.create_engine("sqlite://", poolclass=pool.StaticPool)
    single = sa.create_engine("sqlite://", poolclass=pool.SingletonThreadPool, pool_size=2)
    poolwatch.track(null, name="null")
    poolwatch.track(static, name="static")
    poolwatch.track(single, name="single")
    held = [null.connect(), null.connect(), static.connect(), single.connect()]
    by_name = {s.name: s for s in poolwatch.pools()}
    assert [
        (s.used, s.idle, s.max, s.pending) for s in map(by_name.get, ["null", "static", "single"])
    ] == [
        (2, 0, None, 0),
        (1, 0, None, 0),
        (1, 0, None, 0),
    ]
    for conn in held:
        conn.close()
    by_name = {s.name: s for s in poolwatch.pools()}
    assert [(s.used, s.idle) for s in map(by_name.get, ["null", "static", "single"])] == [
        (0, 0),
        (0, 1),
        (0, 1),
    ]
    got = pw.collect()
    assert got.points("poolwatch.connections.max", pool__name="null") == []
    # A NullPool closes every connection on return by design: disposed, never pool_full.
    null_closed = {
        p.attributes["reason"]: p.value
        for p in got.points("poolwatch.connections.closed", pool__name="null")
    }
    assert null_closed == {"disposed": 2}


def test_names_tell_apart_creation_sites_of_the_same_target(pw: Harness, tmp_path: Path) -> None:
    url = _url(tmp_path)
    first = sa.create_engine(url)
    line = sys._getframe().f_lineno + 1
    second = sa.create_engine(url)
    per_request = [sa.create_engine(url, pool_size=1) for _ in range(3)]  # one site
    for engine in [first, second, *per_request]:
        engine.connect().close()
    target = f"sqlite:///{tmp_path}/app.db"
    names = {s.name: s for s in poolwatch.pools()}
    site = f"tests/test_sqlalchemy.py:{line}"
    assert names[target].instances == 1
    assert names[f"{target} ({site})"].instances == 1
    loop_series = [s for n, s in names.items() if n not in (target, f"{target} ({site})")]
    assert [(s.instances, s.instances_created, s.checkouts) for s in loop_series] == [(3, 3, 3)]


def test_connect_errors_reach_the_caller_and_are_counted(pw: Harness, tmp_path: Path) -> None:
    import sqlite3

    def refuse() -> object:
        raise sqlite3.OperationalError("connection refused")

    engine = sa.create_engine("sqlite://", creator=refuse)
    poolwatch.track(engine, name="refusing")
    with pytest.raises(exc.OperationalError, match="connection refused"):
        engine.connect()
    got = pw.collect()
    assert got.count("poolwatch.connect.duration", pool__name="refusing", outcome="error") == 1
    assert got.count("poolwatch.wait.duration", pool__name="refusing", outcome="error") == 1
    assert got.count("poolwatch.wait.duration", pool__name="refusing", outcome="acquired") == 0


def test_track_accepts_async_engines(pw: Harness, tmp_path: Path) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/async.db")
    poolwatch.track(engine, name="async-sqlite")
    assert [s.name for s in poolwatch.pools()] == ["async-sqlite"]


def test_track_rejects_what_it_does_not_know(harness: Harness) -> None:
    harness.instrument(libraries=["sqlalchemy"])
    with pytest.raises(TypeError) as caught:
        poolwatch.track(object())
    assert str(caught.value) == (
        "poolwatch.track() got builtins.object: expected an engine, client or pool of a hooked "
        "library (hooked: sqlalchemy)"
    )
    with pytest.raises(poolwatch.ConfigError):
        poolwatch.track(sa.create_engine("sqlite://"), name="postgresql://u:p@db/x")


def test_uninstrument_restores_everything(harness: Harness, tmp_path: Path) -> None:
    originals = (
        base._ConnectionFairy.__dict__["_checkout"],
        base._ConnectionRecord.__dict__["checkin"],
        base._ConnectionRecord.__dict__["invalidate"],
        base._ConnectionRecord.__dict__["_ConnectionRecord__close"],
        sa.engine.base.Engine.__dict__["__init__"],
        sa.engine.base.Engine.__dict__["dispose"],
    )
    harness.instrument()
    engine = sa.create_engine(_url(tmp_path))
    creator = engine.pool._invoke_creator
    engine.connect().close()
    engine.pool.dispose()
    # A checkout that connects, then fails: the record goes back to the pool with the
    # connect's mark (its next checkout is a first), which uninstrument() must take too.
    event.listen(engine, "checkout", _reject, once=True)
    with pytest.raises(RuntimeError):
        engine.connect()
    idle = list(engine.pool._pool.queue)
    assert [hasattr(record, "_poolwatch_fresh") for record in idle] == [True]
    poolwatch.uninstrument()
    assert [k for record in idle for k in vars(record) if "poolwatch" in k] == []
    assert originals == (
        base._ConnectionFairy.__dict__["_checkout"],
        base._ConnectionRecord.__dict__["checkin"],
        base._ConnectionRecord.__dict__["invalidate"],
        base._ConnectionRecord.__dict__["_ConnectionRecord__close"],
        sa.engine.base.Engine.__dict__["__init__"],
        sa.engine.base.Engine.__dict__["dispose"],
    )
    assert not hasattr(base.Pool, "_poolwatch_ledger")
    assert "_poolwatch_ledger" not in engine.pool.__dict__
    assert engine.pool._invoke_creator is not creator
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 1")).scalar() == 1
    assert harness.collect().names() == set()
    assert poolwatch.pools() == []


def _reject(*_: object) -> None:
    raise RuntimeError("rejected by the test's checkout listener")


def test_instrument_is_idempotent(harness: Harness) -> None:
    first = harness.instrument(libraries=["sqlalchemy"])
    assert poolwatch.instrument() is first
    assert first.libraries == ("sqlalchemy",)


def test_sqlalchemy_is_hooked_when_imported_later_and_not_imported_before() -> None:
    script = textwrap.dedent(
        """
        import sys
        from opentelemetry.sdk.metrics import MeterProvider
        import poolwatch
        handle = poolwatch.instrument(meter_provider=MeterProvider())
        assert "sqlalchemy" not in sys.modules, "instrument() must not import sqlalchemy"
        assert handle.libraries == ()
        import sqlalchemy
        assert handle.libraries == ("sqlalchemy",)
        engine = sqlalchemy.create_engine("sqlite://")
        engine.connect().close()
        print([(s.name, s.checkouts) for s in poolwatch.pools()])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('sqlite://:memory:', 1)]"


def test_async_engine_waits_and_timeouts_on_a_real_event_loop(pw: Harness, tmp_path: Path) -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    async def scenario() -> tuple[poolwatch.PoolSnapshot, list[str]]:
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path}/async.db",
            poolclass=pool.AsyncAdaptedQueuePool,  # the default for files only from 2.0.3x
            pool_size=1,
            max_overflow=0,
            pool_timeout=0.3,
        )
        try:
            return await exhaust_async_pool(engine, _pool)
        finally:
            await engine.dispose()

    during, outcomes = asyncio.run(scenario())
    assert (during.used, during.idle, during.max, during.pending) == (1, 0, 1, 2)
    assert outcomes == ["timeout", "timeout"]
    got = pw.collect()
    assert got.value("poolwatch.timeouts") == 2
    assert got.count("poolwatch.wait.duration", outcome="acquired") == 1


def test_dispose_without_closing_leaves_the_old_pool_out_of_the_levels(
    pw: Harness, tmp_path: Path
) -> None:
    """A forked child's step: dispose(close=False) keeps the parent's connections open in
    the replaced pool, which lingers until the garbage collector frees it."""
    engine = sa.create_engine(_url(tmp_path), pool_size=2, max_overflow=1)
    engine.connect().close()
    old = engine.pool  # still alive, with its open connection, as until a gc run
    engine.dispose(close=False)
    snap = _pool()
    assert (snap.used, snap.idle, snap.max, snap.instances) == (0, 0, 3, 1)
    engine.connect().close()
    snap = _pool()
    assert (snap.idle, snap.checkouts, snap.connects) == (1, 2, 2)
    assert old.checkedin() == 1  # the parent's connection, untouched


def test_a_singleton_thread_pool_is_read_by_the_process_view_and_detection(
    harness: Harness,
) -> None:
    """SingletonThreadPool keeps a ``threading.local`` in ``_conn``: not a connection record
    (AssertionPool's ``_conn`` is one)."""
    handle = harness.instrument(connection_max_age=0.001, process_view="on")
    engine = sa.create_engine("sqlite://")  # SQLite in memory: a SingletonThreadPool
    assert isinstance(engine.pool, pool.SingletonThreadPool)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        time.sleep(0.01)
        handle.process_view()
        [snap] = poolwatch.pools()
    assert (snap.used, snap.idle) == (1, 0)
    time.sleep(0.01)
    handle.process_view()
    [snap] = poolwatch.pools()
    assert (snap.used, snap.idle) == (0, 1)
    assert [a.name for a in snap.antipatterns] == ["connection_too_old"]
    assert handle.errors == {}


def test_an_engine_whose_url_is_not_a_url_is_named_by_its_pool(pw: Harness) -> None:
    import sqlite3

    dialect = sa.create_engine("sqlite://").dialect
    engine = sa.engine.base.Engine(
        pool.StaticPool(lambda: sqlite3.connect(":memory:")), dialect, "not a URL object"
    )
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    names = sorted(s.name for s in poolwatch.pools())
    assert names == ["sqlite://(StaticPool)", "sqlite://:memory:"]
    assert pw.handle is not None and pw.handle.errors == {}


def test_checkouts_after_failed_connects_count_as_reused(pw: Harness, tmp_path: Path) -> None:
    """A failed connect fails its checkout (it is not a checkout that opened nothing)."""
    import sqlite3

    failures = 3

    def flaky() -> sqlite3.Connection:
        nonlocal failures
        if failures:
            failures -= 1
            raise sqlite3.OperationalError("the database is restarting")
        return sqlite3.connect(tmp_path / "flaky.db")

    engine = sa.create_engine("sqlite://", creator=flaky, poolclass=pool.QueuePool, pool_size=1)
    poolwatch.track(engine, name="flaky")
    for _ in range(3):
        with pytest.raises(exc.OperationalError, match="restarting"):
            engine.connect()
    for _ in range(5):
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    [snap] = [s for s in poolwatch.pools() if s.name == "flaky"]
    assert (snap.checkouts, snap.connects, snap.connect_errors, snap.reused) == (5, 1, 3, 4)
    assert pw.collect().value("poolwatch.checkouts.reused", pool__name="flaky") == 4


def test_track_takes_a_sync_engine_when_greenlet_is_not_installed() -> None:
    # greenlet is installed here; None in sys.modules makes its import fail, as it fails on
    # a machine without it (SQLAlchemy 2.1's extras do not bring it).
    script = textwrap.dedent(
        """
        import sys
        sys.modules["greenlet"] = None
        import poolwatch
        poolwatch.instrument(process_view="off")
        import sqlalchemy as sa
        engine = sa.create_engine("sqlite://")
        poolwatch.track(engine, name="sync-only")
        print([p.name for p in poolwatch.pools()])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip() == "['sync-only']"
