"""A workload that exhausts real psycopg_pool and asyncpg pools, for the end-to-end test of
the shipped alerts and dashboards on those kinds (tests/test_pg_end_to_end.py).

    python -m tests.support.pg_workload --dsn DSN --port-file FILE --seconds 90

Instruments itself with poolwatch, serves the Prometheus endpoint on a free loopback port
(written to ``--port-file``), and runs cycles, each with four callers per pool at once:

* ``orders-psycopg`` — a psycopg_pool ``ConnectionPool`` of 3, one of its connections taken
  and never given back (a leak past the 2 s threshold): two callers hold the other two
  for 0.3 s; then one waits with a 0.1 s timeout (it times out) and one with 1 s (it gets
  a connection after 0.3 s: a slow acquire). Between cycles the server ends an idle
  connection's backend every fifth cycle; its next borrower's query fails and it is
  dropped (stale).
* ``orders-asyncpg`` — an asyncpg pool of 3, the same shape, on an event loop of its own;
  the caller that gets its connection late acquires without a timeout (the
  ``no_pool_timeout`` anti-pattern). Every fifth cycle the server ends an idle
  connection's backend (asyncpg notices at once: stale).
* ``down-psycopg``, ``down-asyncpg`` — pools for a loopback port that refuses
  connections (psycopg's a ``NullConnectionPool``, which connects for each caller), asked
  for a connection three times a second: connect errors, and, since both waits include
  opening the connection, wait errors.

It stops after ``--seconds`` (bounded: at most 300) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import psycopg
import psycopg_pool

import poolwatch
from tests.support.upstream import refusing_port

HOLD = 0.3
SIZE = 3
WAITS = (0.1, 1.0)
"""The timeouts of the two callers that come once the pool is taken: one times out, one
gets a connection when the first holder gives it back."""
LEAK_THRESHOLD = 2.0
KILL_EVERY = 5
"""Cycles between two backends ended: a cycle that starts with one connection dead finds
it replaced at once, and nobody times out in it."""


def _terminate_one(admin: Any, pids: list[int]) -> None:
    if pids:
        admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))


def _psycopg(dsn: str, admin: Any, stop: threading.Event) -> None:
    pool = psycopg_pool.ConnectionPool(dsn, min_size=SIZE, max_size=SIZE, open=False)
    poolwatch.track(pool, name="orders-psycopg")
    pool.open(wait=True, timeout=30)
    leaked = pool.getconn()  # never given back while the workload runs

    def caller(timeout: float) -> None:
        try:
            with pool.connection(timeout=timeout) as conn:
                conn.execute("SELECT 1")
                time.sleep(HOLD)
        except psycopg_pool.PoolTimeout:
            pass  # the exhaustion is what poolwatch reports
        except psycopg.OperationalError:
            pass  # a backend the server ended: the pool drops the connection

    try:
        for number in itertools.count(1):
            if stop.is_set():
                break
            threads = [threading.Thread(target=caller, args=(5.0,)) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.05)  # the holders first, then the callers who wait
            waiters = [threading.Thread(target=caller, args=(w,)) for w in WAITS]
            for t in waiters:
                t.start()
            for t in threads + waiters:
                t.join(30)
            if number % KILL_EVERY == 0:
                _terminate_one(admin, [c.info.backend_pid for c in list(pool._pool)])
    finally:
        pool.putconn(leaked)
        pool.close()


async def _asyncpg(dsn: str, admin: Any, stop: threading.Event) -> None:
    pool = asyncpg.create_pool(dsn, min_size=SIZE, max_size=SIZE)
    poolwatch.track(pool, name="orders-asyncpg")
    await pool
    leaked = await pool.acquire()

    async def caller(timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            async with pool.acquire(timeout=timeout) as con:
                await con.fetchval("SELECT 1")
                await asyncio.sleep(HOLD)

    try:
        for number in itertools.count(1):
            if stop.is_set():
                break
            holders = [asyncio.create_task(caller(5.0)) for _ in range(2)]
            await asyncio.sleep(0.05)  # the holders first, then the callers who wait
            await asyncio.gather(*holders, caller(WAITS[0]), caller(None))
            if number % KILL_EVERY == 0:
                idle = [h._con for h in list(pool._queue._queue) if h.is_connected()]
                _terminate_one(admin, [con.get_server_pid() for con in idle])
                await asyncio.sleep(0.05)
    finally:
        await pool.release(leaked)
        await pool.close()


def _broken(refused: int, stop: threading.Event) -> None:
    down = f"postgresql://u:p@127.0.0.1:{refused}/down"
    # A null pool connects for each caller (a pool's workers would retry in the background,
    # further and further apart).
    pool = psycopg_pool.NullConnectionPool(down, max_size=1, timeout=2, open=False)
    poolwatch.track(pool, name="down-psycopg")
    pool.open()

    async def asyncpg_calls() -> None:
        apool = asyncpg.create_pool(down, min_size=0, max_size=1)
        poolwatch.track(apool, name="down-asyncpg")
        await apool
        try:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    await apool.acquire(timeout=2)
                with contextlib.suppress(psycopg.OperationalError):
                    pool.getconn()  # refused at once
                await asyncio.sleep(0.3)
        finally:
            await apool.close()
            pool.close()

    asyncio.run(asyncpg_calls())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args()
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    handle = poolwatch.instrument(prometheus_port=0, leak_threshold=LEAK_THRESHOLD)
    try:
        with (
            refusing_port() as refused,
            psycopg.connect(args.dsn, autocommit=True) as admin_sync,
            psycopg.connect(args.dsn, autocommit=True) as admin_async,
        ):
            threads = [
                threading.Thread(target=_psycopg, args=(args.dsn, admin_sync, stop)),
                threading.Thread(target=lambda: asyncio.run(_asyncpg(args.dsn, admin_async, stop))),
                threading.Thread(target=_broken, args=(refused, stop)),
            ]
            for t in threads:
                t.start()
            assert handle.prometheus_address is not None
            args.port_file.write_text(str(handle.prometheus_address[1]))
            stop.wait(min(args.seconds, 300.0))
            stop.set()
            for t in threads:
                t.join(30)
    finally:
        poolwatch.uninstrument()
    return 0


if __name__ == "__main__":
    sys.exit(main())
