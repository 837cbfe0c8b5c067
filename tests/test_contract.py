"""The hot-path contract, held by every adapter.

Each adapter's checkout and return hooks inline the ledger's reference methods
(``Ledger.acquired`` / ``released`` / ``failed``; poolwatch/_ledger.py). Here every adapter
is driven, against real pools and servers, through the same events — a checkout returned at
once, one held past the leak threshold and then returned, a checkout that times out while
another holds the pool's one connection, and a checkout that fails — and its ledger must end
exactly as the reference methods leave a ledger given those events.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import poolwatch
from poolwatch import _api
from poolwatch._ledger import Ledger
from tests.support.harness import Harness
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream, refusing_port

THRESHOLD = 0.2
"""The leak threshold of these runs (seconds); the late return is held for HELD."""
HELD = 0.3


class Ending(NamedTuple):
    """How a ledger ends: what the contract decides."""

    waits: int
    uses: int
    timeouts: int
    timed_out: int
    failed: int
    leaks: int
    out: int
    stacks: int


def _ending(ledger: Ledger, active: dict[Any, float] | None = None) -> Ending:
    snap = ledger.snapshot(active=active)
    timed_out = snap.wait.get("timeout")
    failed = snap.wait.get("error")
    return Ending(
        snap.checkouts,
        snap.use.observations,
        snap.timeouts,
        timed_out.observations if timed_out else 0,
        failed.observations if failed else 0,
        snap.leaks,
        snap.checked_out,
        len(ledger.stacks),
    )


def _reference() -> Ending:
    """The events of every scenario, given to a ledger through the reference methods."""
    ledger = Ledger(leak_threshold=THRESHOLD, leak_stacks="always")
    quick, late, holder = object(), object(), object()
    ledger.acquired(quick, 0.0, 0.001)
    ledger.released(quick, 0.01)
    ledger.acquired(late, 1.0, 1.0)
    ledger.released(late, 1.0 + HELD)
    ledger.acquired(holder, 2.0, 2.0)
    ledger.failed(2.0, 2.05, timeout=True)
    ledger.released(holder, 2.1)
    ledger.failed(3.0, 3.01, timeout=False)
    return _ending(ledger)


def _only_ledger() -> tuple[Ledger, dict[Any, float] | None]:
    current = _api._current
    assert current is not None
    registry = current._registry
    [series] = [s for s in registry._series.values() if s.name == "contract"]
    return series.ledger, series.adapter.checkouts(series.pools.live())


def _sqlalchemy(tmp_path: Path) -> None:
    import sqlalchemy as sa

    failing = False

    def connect() -> sqlite3.Connection:
        if failing:
            raise sqlite3.OperationalError("refused")
        return sqlite3.connect(tmp_path / "c.db")

    engine = sa.create_engine(
        "sqlite://",
        creator=connect,
        poolclass=sa.pool.QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    poolwatch.track(engine, name="contract")
    engine.connect().close()
    late = engine.connect()
    time.sleep(HELD)
    late.close()
    holder = engine.connect()
    with pytest.raises(sa.exc.TimeoutError):
        engine.connect()
    holder.invalidate()  # the next checkout connects again: and that connect fails
    holder.close()
    failing = True
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()


def _urllib3(upstream: ThreadedUpstream) -> None:
    import urllib3

    pool = urllib3.HTTPConnectionPool("127.0.0.1", upstream.port, maxsize=1, block=True)
    poolwatch.track(pool, name="contract")
    pool.request("GET", "/")
    late = pool.request("GET", "/", preload_content=False)
    time.sleep(HELD)
    late.read()
    late.release_conn()
    holder = pool.request("GET", "/", preload_content=False)
    with pytest.raises(urllib3.exceptions.EmptyPoolError):
        pool.urlopen("GET", "/", pool_timeout=0.05)
    holder.read()
    holder.release_conn()
    pool.close()
    with pytest.raises(urllib3.exceptions.ClosedPoolError):
        pool.request("GET", "/")


def _httpx(upstream: ThreadedUpstream) -> None:
    import httpcore
    import httpx

    limits = httpx.Limits(max_connections=1)
    with httpx.Client(limits=limits, timeout=httpx.Timeout(5.0, pool=0.05)) as client:
        poolwatch.track(client, name="contract")
        client.get(upstream.url)
        late = client.send(client.build_request("GET", upstream.url), stream=True)
        time.sleep(HELD)
        late.read()
        late.close()
        holder = client.send(client.build_request("GET", upstream.url), stream=True)
        with pytest.raises(httpx.PoolTimeout):
            client.get(upstream.url)
        holder.read()
        holder.close()
        # A request failing before it could wait, in the client's own pool (httpx itself
        # refuses an ftp:// URL before its transport sees it).
        with pytest.raises(httpcore.UnsupportedProtocol):
            client._transport._pool.request("GET", "ftp://127.0.0.1/")


async def _read(session: Any, url: str) -> bytes:
    async with session.get(url) as response:
        body: bytes = await response.read()
        return body


def _aiohttp(upstream: AsyncioUpstream, refused: int) -> None:
    import aiohttp

    async def scenario() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            poolwatch.track(session, name="contract")
            async with session.get(upstream.url) as response:
                await response.read()
            async with session.get(upstream.url) as response:
                await asyncio.sleep(HELD)
                await response.read()
            holder = asyncio.ensure_future(_read(session, upstream.url + "/?delay=0.5"))
            while not any(s.used for s in poolwatch.pools() if s.name == "contract"):
                await asyncio.sleep(0.005)
            with pytest.raises(aiohttp.ConnectionTimeoutError):
                await session.get(upstream.url, timeout=aiohttp.ClientTimeout(connect=0.05))
            assert await holder == b"ok\n"
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"http://127.0.0.1:{refused}/")

    asyncio.run(asyncio.wait_for(scenario(), 20))


def _redis(server: Any, refused: int) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = redis.BlockingConnectionPool.from_url(
        server.url(50), max_connections=1, timeout=0.05, retry=Retry(NoBackoff(), 0)
    )
    client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
    poolwatch.track(pool, name="contract")
    client.ping()
    late = pool.get_connection()
    time.sleep(HELD)
    pool.release(late)
    holder = pool.get_connection()
    with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
        client.ping()
    # The next checkout reconnects the pool's one connection, to a port nobody listens on:
    # its connect fails, and so does the checkout.
    holder.disconnect()
    holder.port = refused
    pool.release(holder)
    with pytest.raises(redis.exceptions.ConnectionError, match="Connection refused"):
        client.ping()
    pool.disconnect()


async def _async_redis_scenario(server: Any, refused: int) -> None:
    import redis
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aredis.BlockingConnectionPool.from_url(
        server.url(51), max_connections=1, timeout=0.05, retry=Retry(NoBackoff(), 0)
    )
    client = aredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
    poolwatch.track(pool, name="contract")
    await client.ping()
    late = await pool.get_connection()
    await asyncio.sleep(HELD)
    await pool.release(late)
    holder = await pool.get_connection()
    with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
        await client.ping()
    await holder.disconnect()
    holder.port = refused
    await pool.release(holder)
    with pytest.raises(redis.exceptions.ConnectionError, match="Connect call failed"):
        await client.ping()
    await pool.disconnect()


def _async_redis(server: Any, refused: int) -> None:
    asyncio.run(asyncio.wait_for(_async_redis_scenario(server, refused), 20))


def _psycopg_pool(dsn: str) -> None:
    import psycopg_pool

    pool = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, timeout=0.05, open=True)
    poolwatch.track(pool, name="contract")
    pool.wait()
    with pool.connection():
        pass
    late = pool.getconn()
    time.sleep(HELD)
    pool.putconn(late)
    holder = pool.getconn()
    with pytest.raises(psycopg_pool.PoolTimeout):
        pool.getconn()
    pool.putconn(holder)
    pool.close()
    with pytest.raises(psycopg_pool.PoolClosed):
        pool.getconn()


def _asyncpg(dsn: str) -> None:
    import asyncpg

    async def scenario() -> None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        poolwatch.track(pool, name="contract")
        async with pool.acquire():
            pass
        late = await pool.acquire()
        await asyncio.sleep(HELD)
        await pool.release(late)
        holder = await pool.acquire()
        with pytest.raises(TimeoutError):
            await pool.acquire(timeout=0.05)
        await pool.release(holder)
        await pool.close()
        with pytest.raises(asyncpg.InterfaceError):
            await pool.acquire()

    asyncio.run(asyncio.wait_for(scenario(), 20))


SCENARIOS: dict[str, Callable[..., None]] = {
    "sqlalchemy": _sqlalchemy,
    "urllib3": _urllib3,
    "httpx": _httpx,
    "aiohttp": _aiohttp,
    "redis": _redis,
    "redis.asyncio": _async_redis,
    "psycopg_pool": _psycopg_pool,
    "asyncpg": _asyncpg,
}
ON_POSTGRES = ("psycopg_pool", "asyncpg")


@pytest.mark.parametrize(
    "library",
    [
        pytest.param(name, marks=pytest.mark.postgres) if name in ON_POSTGRES else name
        for name in SCENARIOS
    ],
)
def test_every_adapter_ends_its_ledger_as_the_reference_does(
    harness: Harness, tmp_path: Path, library: str, request: pytest.FixtureRequest
) -> None:
    handle = harness.instrument(leak_threshold=THRESHOLD, leak_stacks="always")
    if library == "sqlalchemy":
        _sqlalchemy(tmp_path)
    elif library == "urllib3":
        with ThreadedUpstream() as upstream:
            _urllib3(upstream)
    elif library == "httpx":
        with ThreadedUpstream() as upstream:
            _httpx(upstream)
    elif library.startswith("redis"):
        with refusing_port() as refused:
            SCENARIOS[library](request.getfixturevalue("redis_server"), refused)
    elif library in ON_POSTGRES:
        from tests.support.pgadmin import dsn

        SCENARIOS[library](dsn(request.getfixturevalue("postgres")))
    else:
        with AsyncioUpstream() as upstream, refusing_port() as refused:
            _aiohttp(upstream, refused)
    ledger, active = _only_ledger()
    assert _ending(ledger, active) == _reference()
    assert handle.errors == {}
