"""One measurement for ``compare.py``: ``python _compare_child.py KIND OPS`` prints µs per
operation, with whichever ``poolwatch`` is first on ``PYTHONPATH`` instrumented.

Only poolwatch's public API and the libraries themselves are used, so that any two versions
can be measured by the same code."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from time import perf_counter
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import poolwatch
from poolwatch._demo.upstream import ThreadedUpstream

WARMUP = 500
POSTGRES = "POOLWATCH_COMPARE_POSTGRES"
"""The libpq URL of the PostgreSQL server ``compare.py`` started (``psycopg_pool``)."""
REDIS = "POOLWATCH_COMPARE_REDIS"
"""The URL of the redis-server ``compare.py`` started (``redis``)."""


def _timed(step: Any, ops: int) -> float:
    for _ in range(WARMUP):
        step()
    start = perf_counter()
    for _ in range(ops):
        step()
    return (perf_counter() - start) / ops * 1e6


def sqlalchemy(ops: int) -> float:
    import sqlite3

    from sqlalchemy.pool import QueuePool

    pool = QueuePool(lambda: sqlite3.connect(":memory:"), pool_size=1, max_overflow=0)
    return _timed(lambda: pool.connect().close(), ops)


def urllib3(ops: int) -> float:
    import urllib3 as u

    with ThreadedUpstream() as upstream:
        pool = u.HTTPConnectionPool("127.0.0.1", upstream.port, maxsize=1)
        pool.request("GET", "/")
        return _timed(lambda: pool._put_conn(pool._get_conn()), ops)


def httpx(ops: int) -> float:
    import httpcore
    import httpx as _  # noqa: F401  (poolwatch hooks httpcore when httpx is imported)

    class Ready:
        def __init__(self, origin: Any) -> None:
            self._origin = origin

        def handle_request(self, request: Any) -> Any:
            return httpcore.Response(200, content=b"")

        def can_handle_request(self, origin: Any) -> bool:
            return bool(origin == self._origin)

        def is_available(self) -> bool:
            return True

        def has_expired(self) -> bool:
            return False

        def is_idle(self) -> bool:
            return True

        def is_closed(self) -> bool:
            return False

        def close(self) -> None:
            pass

    class ReadyPool(httpcore.ConnectionPool):
        def create_connection(self, origin: Any) -> Any:
            return Ready(origin)

    pool = ReadyPool()
    request = httpcore.Request("GET", "http://127.0.0.1:9/")  # never sent anywhere
    return _timed(lambda: pool.handle_request(request).close(), ops)


def aiohttp(ops: int) -> float:
    import aiohttp as a
    from aiohttp.client_reqrep import ClientRequest
    from yarl import URL

    async def run(url: str) -> float:
        async with a.ClientSession() as session:
            async with session.get(url) as response:
                await response.read()
            connector = session.connector
            assert connector is not None
            request = ClientRequest("GET", URL(url), loop=asyncio.get_running_loop())
            timeout = a.ClientTimeout()
            for _ in range(WARMUP):
                (await connector.connect(request, [], timeout)).release()
            start = perf_counter()
            for _ in range(ops):
                (await connector.connect(request, [], timeout)).release()
            return (perf_counter() - start) / ops * 1e6

    with ThreadedUpstream() as upstream:
        return asyncio.run(run(upstream.url))


def psycopg_pool(ops: int) -> float:
    import psycopg_pool as p

    with p.ConnectionPool(os.environ[POSTGRES], min_size=2, max_size=2, open=True) as pool:
        pool.wait()
        return _timed(lambda: pool.putconn(pool.getconn()), ops)


def redis(ops: int) -> float:
    import redis as r

    pool = r.ConnectionPool.from_url(os.environ[REDIS], max_connections=1)
    try:
        return _timed(lambda: pool.release(pool.get_connection()), ops)
    finally:
        pool.disconnect()


def collect(ops: int, reader: InMemoryMetricReader) -> float:
    import sqlalchemy as sa

    engines = []
    for i in range(100):
        engine = sa.create_engine("sqlite://")
        poolwatch.track(engine, name=f"p{i}")
        engine.connect().close()
        engines.append(engine)
    reader.get_metrics_data()
    gc.collect()
    start = perf_counter()
    for _ in range(ops):
        reader.get_metrics_data()
    return (perf_counter() - start) / ops / len(engines) * 1e6


def main() -> None:
    kind, ops = sys.argv[1], int(sys.argv[2])
    reader = InMemoryMetricReader()
    poolwatch.instrument(meter_provider=MeterProvider(metric_readers=[reader]), process_view="off")
    if kind == "collect":
        print(f"{collect(ops, reader):.4f}")
    else:
        print(f"{globals()[kind](ops):.4f}")


if __name__ == "__main__":
    main()
