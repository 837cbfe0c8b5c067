"""Pool waits in traces: a ``pool.wait`` span for each wait that waited, under the span of
the caller that waited, and its ids as exemplars of the wait histogram.

A real SDK tracer provider with an in-memory span exporter, real pools against real servers
(SQLite, loopback HTTP servers), real threads and a real event loop; the OTLP test sends
spans and metrics through the real OTLP/HTTP exporters to a loopback receiver.
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import poolwatch
from poolwatch._tracing import SPAN_CONNECT, SPAN_WAIT
from tests.support.harness import Harness
from tests.support.pools import one_pool
from tests.support.threads import wait_until
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream

HOLD = 0.1
"""Seconds a holder keeps the pool's one connection while another caller waits."""
THRESHOLD = 0.04
"""The tests' ``wait_span_threshold``: well below a real wait (HOLD), well above what a free
checkout takes on a loaded two-core machine (the default, 1 ms, is not: a thread waiting
for the interpreter can take that long to get an idle connection)."""


class Traced:
    """A tracer provider recording every span into memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("the application")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def by_id(self) -> dict[int, ReadableSpan]:
        return {s.context.span_id: s for s in self.spans()}


@pytest.fixture
def traced(harness: Harness) -> Iterator[Traced]:
    made = Traced()
    try:
        yield made
    finally:
        made.provider.shutdown()


def _parent_name(span: ReadableSpan, spans: dict[int, ReadableSpan]) -> str | None:
    assert span.parent is not None, f"{span.name} has no parent"
    return spans[span.parent.span_id].name


def _seconds(span: ReadableSpan) -> float:
    assert span.start_time is not None and span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


# -- SQLAlchemy, threads ---------------------------------------------------------------------
def test_each_waiting_thread_gets_a_wait_span_under_its_own_span(
    harness: Harness, traced: Traced, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/w.db", pool_size=1, max_overflow=0)
    poolwatch.track(engine, name="orders-db")
    held = engine.connect()

    def request(i: int) -> None:
        with traced.tracer.start_as_current_span(f"request {i}"), engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
            time.sleep(HOLD)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(engine.pool._pool.not_empty._waiters) == 3)
    time.sleep(HOLD)
    held.close()
    for t in threads:
        t.join(10)
    spans = traced.by_id()
    waits = traced.spans(SPAN_WAIT)
    assert len(waits) == 3
    assert sorted(_parent_name(w, spans) or "" for w in waits) == [
        "request 0",
        "request 1",
        "request 2",
    ]
    for wait in waits:
        assert dict(wait.attributes or {}) == {
            "pool.name": "orders-db",
            "pool.kind": "sqlalchemy",
            "outcome": "acquired",
        }
        assert wait.status.status_code == StatusCode.UNSET
        assert _seconds(wait) >= HOLD  # it waited at least for the holder
        parent = spans[wait.parent.span_id]  # type: ignore[union-attr]
        assert parent.start_time <= wait.start_time <= wait.end_time <= parent.end_time  # type: ignore[operator]
    assert traced.spans(SPAN_CONNECT) == []  # SQLite connects in microseconds
    engine.dispose()


def test_free_checkouts_and_waits_below_the_threshold_make_no_span(
    harness: Harness, traced: Traced, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=0.5)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/w.db", pool_size=1, max_overflow=0)
    with traced.tracer.start_as_current_span("many free checkouts"):
        for _ in range(200):
            engine.connect().close()
    held = engine.connect()
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    time.sleep(HOLD)  # a real wait, below the 0.5 s threshold
    held.close()
    waiter.join(10)
    assert [s.name for s in traced.spans()] == ["many free checkouts"]
    assert (
        harness.collect().histogram("poolwatch.wait.duration", outcome="acquired").exemplars == ()
    )
    engine.dispose()


def test_a_timeout_and_a_failed_connect_are_wait_spans_with_their_outcome(
    harness: Harness, traced: Traced, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    engine = sa.create_engine(
        f"sqlite:///{tmp_path}/w.db", pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    poolwatch.track(engine, name="orders-db")
    held = engine.connect()
    with traced.tracer.start_as_current_span("timed out"), pytest.raises(sa.exc.TimeoutError):
        engine.connect()
    held.close()
    engine.dispose()

    def refuse() -> sqlite3.Connection:
        time.sleep(THRESHOLD * 2)  # longer than the threshold: the connect's span is a child
        raise sqlite3.OperationalError("the database is restarting")

    refusing = sa.create_engine("sqlite://", creator=refuse, poolclass=sa.pool.QueuePool)
    poolwatch.track(refusing, name="restarting-db")
    with traced.tracer.start_as_current_span("refused"), pytest.raises(sa.exc.OperationalError):
        refusing.connect()
    spans = traced.by_id()
    timeout, error = sorted(traced.spans(SPAN_WAIT), key=lambda s: s.start_time or 0)
    assert (timeout.attributes or {})["outcome"] == "timeout"
    assert timeout.status.status_code == StatusCode.ERROR
    assert _parent_name(timeout, spans) == "timed out"
    assert 0.1 <= _seconds(timeout) < 1.0
    assert (error.attributes or {})["outcome"] == "error"
    assert _parent_name(error, spans) == "refused"
    [connect] = traced.spans(SPAN_CONNECT)
    assert connect.parent is not None and connect.parent.span_id == error.context.span_id
    assert (connect.attributes or {})["outcome"] == "error"
    assert connect.status.status_code == StatusCode.ERROR
    assert error.start_time <= connect.start_time <= connect.end_time <= error.end_time  # type: ignore[operator]


def test_no_span_while_the_sdk_exports(harness: Harness, traced: Traced, tmp_path: Path) -> None:
    """The SDK's exporters run with instrumentation suppressed in their context: an OTLP
    exporter's wait for its own requests pool is not the application's (it made spans with
    no parent, exported in turn)."""
    import sqlalchemy as sa
    from opentelemetry import context

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    engine = sa.create_engine(
        f"sqlite:///{tmp_path}/w.db", pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    held = engine.connect()
    token = context.attach(context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
    finally:
        context.detach(token)
    assert traced.spans(SPAN_WAIT) == []
    with pytest.raises(sa.exc.TimeoutError):  # the same wait, not suppressed: its span
        engine.connect()
    held.close()
    engine.dispose()
    [span] = traced.spans(SPAN_WAIT)
    assert (span.attributes or {})["outcome"] == "timeout"
    assert one_pool(kind="sqlalchemy").timeouts == 2  # counted either way


def test_a_new_connection_opened_inside_a_wait_is_its_child(
    harness: Harness, traced: Traced, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    def slow_connect() -> sqlite3.Connection:
        time.sleep(THRESHOLD * 2)
        return sqlite3.connect(tmp_path / "w.db")

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    engine = sa.create_engine("sqlite://", creator=slow_connect, poolclass=sa.pool.QueuePool)
    poolwatch.track(engine, name="orders-db")
    with traced.tracer.start_as_current_span("first request"):
        engine.connect().close()  # opens the connection: a wait past the threshold
    with traced.tracer.start_as_current_span("second request"):
        engine.connect().close()  # reuses it: no span
    [wait] = traced.spans(SPAN_WAIT)
    [connect] = traced.spans(SPAN_CONNECT)
    assert _parent_name(wait, traced.by_id()) == "first request"
    assert connect.parent is not None and connect.parent.span_id == wait.context.span_id
    assert (connect.attributes or {})["outcome"] == "ok"
    assert _seconds(connect) >= THRESHOLD * 2
    got = harness.collect()
    [connect_exemplar] = got.histogram(
        "poolwatch.connect.duration", pool__name="orders-db", outcome="ok"
    ).exemplars
    assert connect_exemplar.span_id == connect.context.span_id
    engine.dispose()


# -- asyncio tasks -----------------------------------------------------------------------
def test_a_waiting_task_gets_its_span_under_its_own_task_span(
    harness: Harness, traced: Traced
) -> None:
    """Two tasks on one event loop, each in a span of its own; the one that waits for the
    connector's one slot gets the wait span — under its own span, never the other's."""
    import aiohttp

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)

    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            poolwatch.track(session, name="pricing-api")
            async with session.get(url) as warm:  # one idle connection: nobody opens one
                await warm.read()

            async def call(name: str, path: str) -> None:
                with traced.tracer.start_as_current_span(name):
                    async with session.get(url + path) as response:
                        await response.read()

            first = asyncio.ensure_future(call("holder", f"/?delay={HOLD * 2}"))
            await asyncio.sleep(HOLD / 2)
            await asyncio.gather(first, call("waiter", "/"))

    with AsyncioUpstream() as up:
        asyncio.run(asyncio.wait_for(scenario(up.url), 20))
    [wait] = traced.spans(SPAN_WAIT)
    assert _parent_name(wait, traced.by_id()) == "waiter"
    assert (wait.attributes or {})["pool.kind"] == "aiohttp"
    assert _seconds(wait) >= HOLD


def test_async_sqlalchemy_tasks_each_get_their_own_wait_span(
    harness: Harness, traced: Traced, tmp_path: Path
) -> None:
    from sqlalchemy import pool
    from sqlalchemy.ext.asyncio import create_async_engine

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)

    async def scenario() -> None:
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path}/a.db",
            poolclass=pool.AsyncAdaptedQueuePool,
            pool_size=1,
            max_overflow=0,
        )
        poolwatch.track(engine, name="async-db")
        async with engine.connect():  # one idle connection: nobody opens one
            pass

        async def request(name: str, hold: float) -> None:
            with traced.tracer.start_as_current_span(name):
                async with engine.connect():
                    await asyncio.sleep(hold)

        holder = asyncio.ensure_future(request("holder", HOLD * 2))
        await asyncio.sleep(HOLD / 2)
        await asyncio.gather(holder, request("waiter a", 0.0), request("waiter b", 0.0))
        await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), 20))
    waits = traced.spans(SPAN_WAIT)
    spans = traced.by_id()
    assert sorted(_parent_name(w, spans) or "" for w in waits) == ["waiter a", "waiter b"]


# -- HTTP pools --------------------------------------------------------------------------
def test_urllib3_waits_and_a_slow_connect_outside_the_wait(
    harness: Harness, traced: Traced
) -> None:
    """urllib3 opens a connection after the wait: a slow connect (the TLS handshake) gets a
    ``pool.connect`` span of its own, under the caller's span."""
    import urllib3

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    with ThreadedUpstream(tls=True, handshake_delay=THRESHOLD * 2) as up:
        context = ssl.create_default_context(cafile=up.ca_file)
        pool = urllib3.HTTPSConnectionPool(
            "127.0.0.1", up.port, maxsize=1, block=True, ssl_context=context
        )
        poolwatch.track(pool, name="payments-api")
        with traced.tracer.start_as_current_span("first call"):
            pool.request("GET", "/")  # connects: the handshake is slow
        held = pool.request("GET", "/", preload_content=False)
        waiter = threading.Thread(target=_traced_call, args=(traced, "waiting call", pool))
        waiter.start()
        time.sleep(HOLD)
        held.read()
        held.release_conn()
        waiter.join(10)
        pool.close()
    spans = traced.by_id()
    connects = traced.spans(SPAN_CONNECT)
    [connect] = connects
    assert _parent_name(connect, spans) == "first call"
    assert _seconds(connect) >= THRESHOLD * 2
    [wait] = traced.spans(SPAN_WAIT)
    assert _parent_name(wait, spans) == "waiting call"
    assert (wait.attributes or {})["server.address"] == "127.0.0.1"


def _traced_call(traced: Traced, name: str, pool: Any) -> None:
    with traced.tracer.start_as_current_span(name):
        pool.request("GET", "/")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["Client", "AsyncClient"])
def test_httpx_waits_are_spans_of_the_request_that_waited(
    harness: Harness, traced: Traced, asynchronous: bool
) -> None:
    import httpx

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    limits = httpx.Limits(max_connections=1)
    with ThreadedUpstream() as up:
        if asynchronous:

            async def scenario() -> None:
                async with httpx.AsyncClient(limits=limits) as client:

                    async def call(name: str, path: str) -> None:
                        with traced.tracer.start_as_current_span(name):
                            (await client.get(up.url + path)).raise_for_status()

                    holder = asyncio.ensure_future(call("holder", f"/?delay={HOLD * 2}"))
                    await asyncio.sleep(HOLD / 2)
                    await asyncio.gather(holder, call("waiter", "/"))

            asyncio.run(asyncio.wait_for(scenario(), 20))
        else:
            with httpx.Client(limits=limits) as client:
                held = client.send(client.build_request("GET", up.url), stream=True)

                def call() -> None:
                    with traced.tracer.start_as_current_span("waiter"):
                        client.get(up.url).raise_for_status()

                waiter = threading.Thread(target=call)
                waiter.start()
                time.sleep(HOLD)
                held.read()
                held.close()
                waiter.join(10)
    [wait] = traced.spans(SPAN_WAIT)
    assert _parent_name(wait, traced.by_id()) == "waiter"
    assert (wait.attributes or {})["pool.kind"] == "httpx"
    assert _seconds(wait) >= HOLD / 2


# -- PostgreSQL pools (the session's throw-away cluster) -------------------------------------
@pytest.mark.postgres
def test_psycopg_pool_waiting_threads_and_a_timeout_get_wait_spans(
    harness: Harness, traced: Traced, postgres: Any
) -> None:
    """Free checkouts make no span; two threads waiting for the pool's one connection each
    get an ``acquired`` wait under their own span; a ``PoolTimeout`` is a ``timeout`` wait.
    The pool's workers open its connections, outside any wait (their slow connects, if any,
    are spans of their own: not counted here)."""
    import psycopg_pool

    from tests.support.pgadmin import dsn

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    with psycopg_pool.ConnectionPool(dsn(postgres), min_size=1, max_size=1, open=True) as pool:
        poolwatch.track(pool, name="reports-db")
        pool.wait()
        with traced.tracer.start_as_current_span("free checkouts"):
            for _ in range(50):
                pool.putconn(pool.getconn())
        held = pool.getconn()

        def request(i: int) -> None:
            with traced.tracer.start_as_current_span(f"request {i}"), pool.connection():
                pass

        threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 2)
        time.sleep(HOLD)
        pool.putconn(held)
        for thread in threads:
            thread.join(10)
        held = pool.getconn()
        with (
            traced.tracer.start_as_current_span("timed out"),
            pytest.raises(psycopg_pool.PoolTimeout),
        ):
            pool.getconn(timeout=0.1)
        pool.putconn(held)
    spans = traced.by_id()
    waits = sorted(traced.spans(SPAN_WAIT), key=lambda s: _parent_name(s, spans) or "")
    assert [(_parent_name(w, spans), (w.attributes or {})["outcome"]) for w in waits] == [
        ("request 0", "acquired"),
        ("request 1", "acquired"),
        ("timed out", "timeout"),
    ]
    for wait in waits:
        attributes = dict(wait.attributes or {})
        assert attributes["pool.name"] == "reports-db"
        assert attributes["pool.kind"] == "psycopg_pool"
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == postgres.port
        assert _seconds(wait) >= (0.1 if attributes["outcome"] == "timeout" else HOLD)
    assert waits[0].status.status_code == StatusCode.UNSET
    assert waits[2].status.status_code == StatusCode.ERROR


@pytest.mark.postgres
def test_psycopg_null_pool_connects_inside_the_wait_as_its_child(
    harness: Harness, traced: Traced, postgres: Any
) -> None:
    """A null pool opens the connection in the caller's ``getconn()``: a slow connect (its
    ``configure`` callback is part of it) is the wait's ``pool.connect`` child."""
    import psycopg_pool

    from tests.support.pgadmin import dsn

    def slow_configure(conn: Any) -> None:
        time.sleep(THRESHOLD * 2)

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    with psycopg_pool.NullConnectionPool(
        dsn(postgres), max_size=1, configure=slow_configure, open=True
    ) as pool:
        poolwatch.track(pool, name="reports-db")
        with traced.tracer.start_as_current_span("request"), pool.connection():
            pass
    [wait] = traced.spans(SPAN_WAIT)
    [connect] = traced.spans(SPAN_CONNECT)
    assert _parent_name(wait, traced.by_id()) == "request"
    assert (wait.attributes or {})["outcome"] == "acquired"
    assert connect.parent is not None and connect.parent.span_id == wait.context.span_id
    assert (connect.attributes or {})["outcome"] == "ok"
    assert _seconds(connect) >= THRESHOLD * 2


@pytest.mark.postgres
def test_a_psycopg_pool_sharing_a_series_with_a_null_pool_keeps_its_connects_apart(
    harness: Harness, traced: Traced, postgres: Any
) -> None:
    """A null pool's connect is part of its caller's wait; a pool's worker connects are in
    no wait, and stay spans of their own when both pools report into one series."""
    import psycopg_pool

    from tests.support.pgadmin import dsn

    def slow_configure(conn: Any) -> None:
        time.sleep(THRESHOLD * 2)

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    null = psycopg_pool.NullConnectionPool(
        dsn(postgres), max_size=1, configure=slow_configure, open=False
    )
    pooled = psycopg_pool.ConnectionPool(
        dsn(postgres), min_size=1, max_size=1, configure=slow_configure, open=False
    )
    poolwatch.track(null, name="reports-db")  # first: the series is a null pool's
    poolwatch.track(pooled, name="reports-db")
    try:
        pooled.open(wait=True)  # its worker's connect
        null.open()
        with traced.tracer.start_as_current_span("request"), null.connection():
            pass
    finally:
        pooled.close()
        null.close()
    [wait] = traced.spans(SPAN_WAIT)
    connects = traced.spans(SPAN_CONNECT)
    inside = [
        s for s in connects if s.parent is not None and s.parent.span_id == wait.context.span_id
    ]
    apart = [s for s in connects if s not in inside]
    assert (len(inside), len(apart)) == (1, 1)
    assert apart[0].parent is None  # the worker's: a root span of its own
    assert _seconds(apart[0]) >= THRESHOLD * 2


@pytest.mark.postgres
def test_asyncpg_waiting_task_and_a_timeout_get_wait_spans(
    harness: Harness, traced: Traced, postgres: Any
) -> None:
    """Tasks on one event loop: free acquires make no span; the task waiting for the pool's
    one connection gets an ``acquired`` wait under its own span, never the holder's; an
    ``acquire(timeout=)`` that times out is a ``timeout`` wait."""
    import asyncpg

    from tests.support.pgadmin import dsn

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)

    async def scenario() -> None:
        async with asyncpg.create_pool(dsn(postgres), min_size=1, max_size=1) as pool:
            poolwatch.track(pool, name="orders-pg")
            with traced.tracer.start_as_current_span("free acquires"):
                for _ in range(20):
                    await pool.release(await pool.acquire())

            async def holder() -> None:
                with traced.tracer.start_as_current_span("holder"):
                    async with pool.acquire():
                        await asyncio.sleep(HOLD * 2)

            async def waiter() -> None:
                with traced.tracer.start_as_current_span("waiter"):
                    async with pool.acquire():
                        pass

            first = asyncio.ensure_future(holder())
            await asyncio.sleep(HOLD / 2)
            await asyncio.gather(first, waiter())
            async with pool.acquire():
                with (
                    traced.tracer.start_as_current_span("timed out"),
                    pytest.raises(asyncio.TimeoutError),
                ):
                    await pool.acquire(timeout=0.1)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    spans = traced.by_id()
    waits = sorted(traced.spans(SPAN_WAIT), key=lambda s: _parent_name(s, spans) or "")
    assert [(_parent_name(w, spans), (w.attributes or {})["outcome"]) for w in waits] == [
        ("timed out", "timeout"),
        ("waiter", "acquired"),
    ]
    timeout, acquired = waits
    assert (acquired.attributes or {})["pool.kind"] == "asyncpg"
    assert (acquired.attributes or {})["pool.name"] == "orders-pg"
    assert _seconds(acquired) >= HOLD
    assert timeout.status.status_code == StatusCode.ERROR
    assert 0.1 <= _seconds(timeout) < 1.0


@pytest.mark.postgres
def test_asyncpg_connect_inside_acquire_is_the_waits_child(
    harness: Harness, traced: Traced, postgres: Any
) -> None:
    """asyncpg opens a holder's missing connection inside the caller's ``acquire()``: a slow
    connect (a ``connect=`` function that takes its time, then connects) is the wait's
    ``pool.connect`` child; the next acquire reuses the connection and makes no span."""
    import asyncpg

    from tests.support.pgadmin import dsn

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(THRESHOLD * 2)
        return await asyncpg.connect(*args, **kwargs)

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)

    async def scenario() -> None:
        async with asyncpg.create_pool(
            dsn(postgres), min_size=0, max_size=1, connect=slow_connect
        ) as pool:
            poolwatch.track(pool, name="orders-pg")
            with traced.tracer.start_as_current_span("first request"):
                await pool.release(await pool.acquire())
            with traced.tracer.start_as_current_span("second request"):
                await pool.release(await pool.acquire())

    asyncio.run(asyncio.wait_for(scenario(), 20))
    [wait] = traced.spans(SPAN_WAIT)
    [connect] = traced.spans(SPAN_CONNECT)
    assert _parent_name(wait, traced.by_id()) == "first request"
    assert connect.parent is not None and connect.parent.span_id == wait.context.span_id
    assert (connect.attributes or {})["outcome"] == "ok"
    assert _seconds(connect) >= THRESHOLD * 2


# -- off -----------------------------------------------------------------------------------
def test_no_spans_when_turned_off_or_no_provider_records_them(
    harness: Harness, traced: Traced, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    def one_wait() -> None:
        engine = sa.create_engine(f"sqlite:///{tmp_path}/w.db", pool_size=1, max_overflow=0)
        held = engine.connect()
        waiter = threading.Thread(target=lambda: engine.connect().close())
        waiter.start()
        time.sleep(HOLD)
        held.close()
        waiter.join(10)
        engine.dispose()

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=None)
    with traced.tracer.start_as_current_span("off"):
        one_wait()
    assert [s.name for s in traced.spans()] == ["off"]
    poolwatch.uninstrument()
    harness.instrument()  # the global provider: no SDK one is set in the tests
    one_wait()
    assert [s.name for s in traced.spans()] == ["off"]
    assert (
        harness.collect().histogram("poolwatch.wait.duration", outcome="acquired").exemplars == ()
    )


def test_a_tracer_provider_that_is_not_one_is_a_config_error(harness: Harness) -> None:
    with pytest.raises(poolwatch.ConfigError, match=r"'tracer_provider'.*TracerProvider"):
        harness.instrument(tracer_provider="jaeger")


# -- exemplars over OTLP -----------------------------------------------------------------
def test_exemplars_over_otlp_link_the_wait_histogram_to_the_spans(
    harness: Harness, tmp_path: Path
) -> None:
    """Spans and metrics through the real OTLP/HTTP exporters to a loopback receiver: the
    wait histogram's points carry exemplars whose trace and span ids are a ``pool.wait``
    span's, exported beside them."""
    import sqlalchemy as sa
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from tests.support.otlp import receiver

    with receiver() as (kept, port):
        endpoint = f"http://127.0.0.1:{port}"
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"), export_interval_millis=60_000
        )
        meter_provider = MeterProvider(metric_readers=[reader])
        poolwatch.instrument(
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
            process_view="off",
            wait_span_threshold=THRESHOLD,
        )
        engine = sa.create_engine(f"sqlite:///{tmp_path}/w.db", pool_size=1, max_overflow=0)
        poolwatch.track(engine, name="orders-db")
        held = engine.connect()
        tracer = tracer_provider.get_tracer("the application")

        def request() -> None:
            with tracer.start_as_current_span("request"):
                engine.connect().close()

        waiters = [threading.Thread(target=request) for _ in range(2)]
        for waiter in waiters:
            waiter.start()
        wait_until(lambda: len(engine.pool._pool.not_empty._waiters) == 2)
        time.sleep(HOLD)
        held.close()
        for waiter in waiters:
            waiter.join(10)
        tracer_provider.force_flush()
        meter_provider.force_flush()
        poolwatch.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()
        engine.dispose()
    waits, exemplars = _exported(kept.by_path)
    assert len(waits) == 2
    assert exemplars, "no exemplar was exported"
    for span_id, trace_id, value in exemplars:
        assert waits.get(span_id) == trace_id  # the exemplar names a pool.wait span
        assert value >= HOLD


def _received_spans(requests: list[tuple[str, bytes]]) -> list[Any]:
    """Every span in the OTLP trace requests received (``opentelemetry.proto`` spans)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for path, body in requests:
        if path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for scope in (ss for rs in request.resource_spans for ss in rs.scope_spans):
                spans.extend(scope.spans)
    return spans


def _exported(
    requests: list[tuple[str, bytes]],
) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes, float]]]:
    """From the OTLP requests received: every ``pool.wait`` span (span id: trace id), and
    every exemplar of a ``poolwatch.wait.duration`` point (span id, trace id, value)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    waits = {s.span_id: s.trace_id for s in _received_spans(requests) if s.name == SPAN_WAIT}
    exemplars: list[tuple[bytes, bytes, float]] = []
    for path, body in requests:
        if path == "/v1/metrics":
            metrics = ExportMetricsServiceRequest()
            metrics.ParseFromString(body)
            for scope in (sm for rm in metrics.resource_metrics for sm in rm.scope_metrics):
                for metric in scope.metrics:
                    if metric.name == "poolwatch.wait.duration":
                        exemplars.extend(
                            (e.span_id, e.trace_id, e.as_double)
                            for point in metric.histogram.data_points
                            for e in point.exemplars
                        )
    return waits, exemplars


def test_the_exhaustion_demo_sends_its_waits_as_spans_under_each_call(tmp_path: Path) -> None:
    """The compose stack's path on loopback: ``poolwatch demo`` with OTEL_TRACES_EXPORTER and
    OTEL_METRICS_EXPORTER set to otlp. Every pool.wait span is the child of the worker call
    that waited (``demo <pool>``, or the pools' set-up: ``demo start``), in its trace; the
    starved pools' waits end in timeouts with status ERROR; the wait histogram's exemplars
    name exported pool.wait spans."""
    import os
    import subprocess
    import sys

    from opentelemetry.proto.trace.v1.trace_pb2 import Status

    from tests.support.otlp import receiver

    demo = [sys.executable, "-m", "poolwatch", "demo", "--port", "0", "--database", "sqlite"]
    with receiver() as (kept, port):
        env = {
            **os.environ,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_SERVICE_NAME": "demo-under-test",
        }
        result = subprocess.run(
            [*demo, "--scenario", "exhaustion", "--duration", "3"],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env=env,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        requests = list(kept.by_path)
    spans = _received_spans(requests)
    by_id = {s.span_id: s for s in spans}
    waits = [s for s in spans if s.name == SPAN_WAIT]
    outcomes: dict[tuple[str, str], int] = {}
    for wait in waits:
        attributes = {a.key: a.value.string_value for a in wait.attributes}
        pool, outcome = attributes["pool.name"], attributes["outcome"]
        assert wait.parent_span_id in by_id, (pool, outcome, wait.parent_span_id)
        parent = by_id[wait.parent_span_id]  # exported: the call that waited
        assert parent.name in (f"demo {pool}", "demo start")  # a call, or the pools' set-up
        assert parent.trace_id == wait.trace_id
        assert parent.start_time_unix_nano <= wait.start_time_unix_nano
        assert wait.end_time_unix_nano <= parent.end_time_unix_nano
        failed = wait.status.code == Status.STATUS_CODE_ERROR
        assert failed == (outcome != "acquired"), (pool, outcome, wait.status)
        outcomes[pool, outcome] = outcomes.get((pool, outcome), 0) + 1
    for pool in ("orders-db", "pricing-api", "pricing-api-async"):  # starved: 0.2 s timeouts
        assert outcomes.get((pool, "timeout"), 0) > 0, outcomes
    wait_ids, exemplars = _exported(requests)
    assert exemplars, "no exemplar was exported"
    for span_id, trace_id, _ in exemplars:
        assert wait_ids.get(span_id) == trace_id


# -- exemplars on poolwatch's own Prometheus endpoint ---------------------------------------
def test_a_real_prometheus_stores_the_wait_spans_as_exemplars(
    harness: Harness, traced: Traced, tmp_path: Path
) -> None:
    """poolwatch's endpoint writes exemplars in the OpenMetrics format Prometheus asks for
    when its exemplar storage is on; Prometheus keeps them, with the wait span's ids."""
    import sqlalchemy as sa

    from tests.support.prometheus import Processes, Prometheus, until

    handle = poolwatch.instrument(
        prometheus_port=0,
        tracer_provider=traced.provider,
        process_view="off",
        wait_span_threshold=THRESHOLD,
    )
    assert handle.prometheus_address is not None
    host, port = handle.prometheus_address
    engine = sa.create_engine(f"sqlite:///{tmp_path}/w.db", pool_size=1, max_overflow=0)
    poolwatch.track(engine, name="orders-db")
    held = engine.connect()

    def request() -> None:
        with traced.tracer.start_as_current_span("request"):
            engine.connect().close()

    began = time.time()
    waiter = threading.Thread(target=request)
    waiter.start()
    time.sleep(HOLD)
    held.close()
    waiter.join(10)
    [wait] = traced.spans(SPAN_WAIT)
    processes = Processes()
    try:
        prometheus = Prometheus(
            processes, tmp_path, {"app": [f"{host}:{port}"]}, "groups: []\n", exemplars=True
        )
        selector = 'poolwatch_wait_duration_seconds_bucket{pool_name="orders-db"}'
        found = until(
            "the wait's exemplar in Prometheus",
            lambda: prometheus.query_exemplars(selector, began - 60, time.time() + 60) or None,
            seconds=60,
        )
    finally:
        processes.stop()
        engine.dispose()
    [series] = found
    [exemplar] = series["exemplars"]
    assert exemplar["labels"] == {
        "trace_id": format(wait.context.trace_id, "032x"),
        "span_id": format(wait.context.span_id, "016x"),
    }
    assert float(exemplar["value"]) == pytest.approx(_seconds(wait), abs=0.005)


# -- redis-py, threads and tasks -------------------------------------------------------------
@pytest.fixture
def redis_url(redis_server: Any) -> str:
    url: str = redis_server.url(30)
    return url


def test_redis_waits_and_timeouts_are_spans_of_the_caller_that_waited(
    harness: Harness, traced: Traced, redis_url: str
) -> None:
    """A BlockingConnectionPool of one connection: a thread waiting for it gets an
    ``acquired`` wait span under its own span, a caller that times out a ``timeout`` one;
    free checkouts make none. The connection opened inside the first checkout is kept for
    that checkout's wait (connects_in_wait), which was too short for a span of its own."""
    import redis

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=10)
    client = redis.Redis(connection_pool=pool)
    poolwatch.track(client, name="sessions-cache")
    with traced.tracer.start_as_current_span("free checkouts"):
        for _ in range(50):
            client.ping()
    held = pool.get_connection()
    answers: list[bool] = []

    def waiter() -> None:
        with traced.tracer.start_as_current_span("waiter"):
            answers.append(client.ping())

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: pool.pool.empty() and len(pool.pool.not_empty._waiters) == 1)
    time.sleep(HOLD)
    pool.release(held)
    thread.join(10)
    assert answers == [True]

    pool.timeout = 0.1
    held = pool.get_connection()
    with (
        traced.tracer.start_as_current_span("timed out"),
        pytest.raises(redis.exceptions.ConnectionError, match="No connection available"),
    ):
        client.ping()
    pool.release(held)
    pool.disconnect()

    spans = traced.by_id()
    acquired, timeout = sorted(traced.spans(SPAN_WAIT), key=lambda s: s.start_time or 0)
    assert dict(acquired.attributes or {}) == {
        "pool.name": "sessions-cache",
        "pool.kind": "redis",
        "server.address": "127.0.0.1",
        "server.port": urlsplit(redis_url).port,
        "outcome": "acquired",
    }
    assert acquired.status.status_code == StatusCode.UNSET
    assert _parent_name(acquired, spans) == "waiter"
    assert _seconds(acquired) >= HOLD
    assert dict(timeout.attributes or {}) == {
        "pool.name": "sessions-cache",
        "pool.kind": "redis",
        "server.address": "127.0.0.1",
        "server.port": urlsplit(redis_url).port,
        "outcome": "timeout",
    }
    assert timeout.status.status_code == StatusCode.ERROR
    assert _parent_name(timeout, spans) == "timed out"
    assert 0.1 <= _seconds(timeout) < 1.0
    assert traced.spans(SPAN_CONNECT) == []  # a loopback connect is below the threshold
    assert sorted(s.name for s in traced.spans() if s.name != SPAN_WAIT) == [
        "free checkouts",
        "timed out",
        "waiter",
    ]


def test_a_redis_task_waiting_gets_its_span_under_its_own_task_span(
    harness: Harness, traced: Traced, redis_url: str
) -> None:
    """Two tasks on one event loop sharing an asyncio BlockingConnectionPool of one
    connection: the one that waits gets the wait span, under its own span."""
    import redis.asyncio as aredis

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)

    async def scenario() -> None:
        pool = aredis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=10)
        client = aredis.Redis(connection_pool=pool)
        poolwatch.track(client, name="sessions-cache")
        await client.ping()  # one idle connection: nobody opens one below

        async def holder() -> None:
            with traced.tracer.start_as_current_span("holder"):
                conn = await pool.get_connection()
                await asyncio.sleep(HOLD * 2)
                await pool.release(conn)

        async def waiter() -> None:
            with traced.tracer.start_as_current_span("waiter"):
                assert await client.ping() is True

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(HOLD / 2)
        await asyncio.gather(first, waiter())
        await pool.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), 20))
    [wait] = traced.spans(SPAN_WAIT)
    assert _parent_name(wait, traced.by_id()) == "waiter"
    assert dict(wait.attributes or {}) == {
        "pool.name": "sessions-cache",
        "pool.kind": "redis",
        "server.address": "127.0.0.1",
        "server.port": urlsplit(redis_url).port,
        "outcome": "acquired",
    }
    assert _seconds(wait) >= HOLD


# -- aiobotocore: its connectors are aiohttp's, its pools botocore's -------------------------
@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_aiobotocore_waits_are_spans_named_as_the_botocore_pool(
    harness: Harness, traced: Traced, moto_endpoint: str
) -> None:
    """An S3 client of one connection (``max_pool_connections=1``) whose connection is held
    by an unread body (4 MiB: aiohttp frees a connection once the body has arrived, read or
    not): the task waiting for it gets a wait span under its own span, with the botocore
    pool's name (service and endpoint) and kind, not an anonymous aiohttp's."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    harness.instrument(tracer_provider=traced.provider, wait_span_threshold=THRESHOLD)

    async def scenario() -> None:
        async with get_session().create_client(
            "s3",
            endpoint_url=moto_endpoint,
            region_name="eu-west-1",
            aws_access_key_id="AKIAPOOLWATCHTRACE",
            aws_secret_access_key="poolwatch-trace-secret",
            config=AioConfig(
                max_pool_connections=1,
                retries={"total_max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        ) as client:
            await client.create_bucket(
                Bucket="traced", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
            )
            await client.put_object(Bucket="traced", Key="k", Body=b"x" * (4 << 20))
            held = await client.get_object(Bucket="traced", Key="k")  # body unread: kept

            async def waiter() -> None:
                with traced.tracer.start_as_current_span("waiter"):
                    await client.head_object(Bucket="traced", Key="k")

            waiting = asyncio.ensure_future(waiter())
            await asyncio.sleep(HOLD)
            reading.append(time.time_ns())  # the waiter is waiting; reading frees the slot
            assert len(await held["Body"].read()) == 4 << 20
            held["Body"].close()
            await waiting

    reading: list[int] = []
    asyncio.run(asyncio.wait_for(scenario(), 60))
    [wait] = traced.spans(SPAN_WAIT)
    assert _parent_name(wait, traced.by_id()) == "waiter"
    assert dict(wait.attributes or {}) == {
        "pool.name": f"s3 {moto_endpoint}",
        "pool.kind": "botocore",
        "server.address": "127.0.0.1",
        "server.port": urlsplit(moto_endpoint).port,
        "outcome": "acquired",
    }
    # It began during the hold (once the waiter's request was built and signed, so not at
    # the hold's first instant, nor HOLD long) and ended once the body had been read.
    assert wait.start_time is not None and wait.end_time is not None
    assert wait.start_time < reading[0] < wait.end_time
