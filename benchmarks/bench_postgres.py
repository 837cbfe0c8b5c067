"""PostgreSQL pools: what poolwatch adds per acquire+release of psycopg_pool and asyncpg
pools, against a loopback ``SELECT 1`` round trip.

The server is a throw-away PostgreSQL cluster on 127.0.0.1 (``poolwatch._demo.postgres``,
Debian's server binaries; the section is skipped, with the reason, when they are missing).

Rows, each timed in this process, bare and with poolwatch side by side in one run, round
by round in rotated order (``_common.interleave``); "added" is the median of the per-round
paired differences:

* ``psycopg_pool getconn()+putconn()`` — a ``ConnectionPool`` (``min_size=max_size=2``,
  open, its connections ready) from one thread;
* ``psycopg_pool async getconn()+putconn()`` — an ``AsyncConnectionPool`` the same way, on
  an event loop;
* ``asyncpg acquire()+release()`` — an ``asyncpg.Pool`` (``min_size=max_size=2``):
  ``await pool.acquire()`` + ``await pool.release(con)``, whose release runs asyncpg's
  reset query (a round trip to the server), as every release in an application does.

Each poolwatch round checks that poolwatch counted every checkout (warm-up included). The
psycopg_pool rows, sync and async, time two more variants in the same rounds: the floor's
hooks (``_floor.py``), the least any hook reporting a wait and a use can add, and the same
hooks without their clock reads; a clock read's cost in a tight loop is printed beside them.

The round trip the 1% target is read against: ``SELECT 1`` on a connection held
throughout, psycopg (``conn.execute("SELECT 1")``) and asyncpg (``con.fetchval("SELECT 1")``),
median per call over the same rounds.

In situ: those rows time the hooks in a tight loop, where their code and data stay in the
processor's caches. What they add inside real work is read as bench_http.py reads it for
HTTP (see its docstring): one pool, instrumented from the start, runs blocks of
``checkout + SELECT 1 + return``; in one block of each pair poolwatch's hooks are switched
off (``bench_http.HookSwitch``), in the other on, in a seeded random order; the median of
the pairs' differences of the thread's CPU time per operation, with a distribution-free
95% interval, is what the hooks add. One process: one draw of the memory layout (the HTTP
section reads six).
"""

from __future__ import annotations

import asyncio
import functools
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter, thread_time
from typing import Any

from _common import (
    Summary,
    heading,
    interleave,
    median_interval,
    paired_differences,
    summarize,
    verdict,
)
from _floor import VARIANTS, clock_line, clock_read_ns, floor_hooks, floor_lines, floor_results
from bench_http import HookSwitch, MeasurementError, checkouts_of

import poolwatch

TARGET_ACQUIRE_US = 1.0
TARGET_SHARE_PCT = 1.0
FLOORED = ("psycopg_pool getconn()+putconn()", "psycopg_pool async getconn()+putconn()")
"""Rows also timed with the floor's hooks, and with their frames alone (``_floor.py``)."""


@dataclass(frozen=True)
class PostgresConfig:
    """How much to measure."""

    rounds: int = 21
    ops: int = 5_000
    """Acquire+release per round (asyncpg's release is a round trip: a fifth of it)."""
    warmup: int = 200
    round_trips: int = 2_000
    in_situ_pairs: int = 400
    in_situ_block: int = 20
    in_situ_seconds: float = 30.0


@contextmanager
def _cluster() -> Iterator[str]:
    from poolwatch._demo.postgres import PostgresCluster

    with PostgresCluster() as pg:
        yield f"postgresql://{pg.user}:{pg.password}@{pg.host}:{pg.port}/{pg.dbname}"


def _instrumented(variant: str) -> Any:
    if variant == "poolwatch":
        from opentelemetry.sdk.metrics import MeterProvider

        return poolwatch.instrument(meter_provider=MeterProvider(), process_view="off")
    return None


def _counted(label: str, variant: str, kind: str, expected: int) -> None:
    counted = checkouts_of(kind)
    wanted = expected if variant == "poolwatch" else 0
    if counted != wanted:
        raise MeasurementError(
            f"{label} {variant}: {counted} checkouts counted for {expected} acquire+release"
        )


def _psycopg_sync(dsn: str, variant: str, config: PostgresConfig) -> float:
    """µs per ``getconn()`` + ``putconn()``; variant ``floor``: the floor's hooks instead
    of poolwatch's (``_floor.py``)."""
    import psycopg_pool

    _instrumented(variant)
    try:
        with (
            floor_hooks(variant, psycopg_pool.ConnectionPool, "getconn", "putconn") as timed,
            psycopg_pool.ConnectionPool(dsn, min_size=2, max_size=2, open=True) as pool,
        ):
            pool.wait()
            for _ in range(config.warmup):
                pool.putconn(pool.getconn())
            start = perf_counter()
            for _ in range(config.ops):
                pool.putconn(pool.getconn())
            elapsed = (perf_counter() - start) / config.ops * 1e6
            _counted("psycopg_pool", variant, "psycopg_pool", config.warmup + config.ops)
            timed.check(config.warmup + config.ops)
        return elapsed
    finally:
        poolwatch.uninstrument()


def _psycopg_async(dsn: str, variant: str, config: PostgresConfig) -> float:
    """µs per ``await getconn()`` + ``await putconn()``."""
    import psycopg_pool

    async def run() -> float:
        async with psycopg_pool.AsyncConnectionPool(dsn, min_size=2, max_size=2) as pool:
            await pool.wait()
            for _ in range(config.warmup):
                await pool.putconn(await pool.getconn())
            start = perf_counter()
            for _ in range(config.ops):
                await pool.putconn(await pool.getconn())
            elapsed = (perf_counter() - start) / config.ops * 1e6
            _counted("psycopg_pool async", variant, "psycopg_pool", config.warmup + config.ops)
            return elapsed

    _instrumented(variant)
    try:
        pool_class = psycopg_pool.AsyncConnectionPool
        with floor_hooks(variant, pool_class, "getconn", "putconn") as timed:
            elapsed = asyncio.run(run())
            timed.check(config.warmup + config.ops)
        return elapsed
    finally:
        poolwatch.uninstrument()


def _asyncpg(dsn: str, variant: str, config: PostgresConfig) -> float:
    """µs per ``await pool.acquire()`` + ``await pool.release(con)``."""
    import asyncpg

    ops = config.ops // 5

    async def run() -> float:
        async with asyncpg.create_pool(dsn, min_size=2, max_size=2) as pool:
            for _ in range(config.warmup):
                await pool.release(await pool.acquire())
            start = perf_counter()
            for _ in range(ops):
                await pool.release(await pool.acquire())
            elapsed = (perf_counter() - start) / ops * 1e6
            _counted("asyncpg", variant, "asyncpg", config.warmup + ops)
            return elapsed

    _instrumented(variant)
    try:
        return asyncio.run(run())
    finally:
        poolwatch.uninstrument()


def _select_psycopg(dsn: str, config: PostgresConfig) -> float:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(config.warmup):
            conn.execute("SELECT 1")
        start = perf_counter()
        for _ in range(config.round_trips):
            conn.execute("SELECT 1").fetchone()
        return (perf_counter() - start) / config.round_trips * 1e6


def _select_asyncpg(dsn: str, config: PostgresConfig) -> float:
    import asyncpg

    async def run() -> float:
        con = await asyncpg.connect(dsn)
        try:
            for _ in range(config.warmup):
                await con.fetchval("SELECT 1")
            start = perf_counter()
            for _ in range(config.round_trips):
                await con.fetchval("SELECT 1")
            return (perf_counter() - start) / config.round_trips * 1e6
        finally:
            await con.close()

    return asyncio.run(run())


@dataclass(frozen=True)
class InSitu:
    """What the hooks add to one ``checkout + SELECT 1 + return``, read in situ."""

    bare: float
    """Median µs of the thread's CPU time per operation, hooks off."""
    added: tuple[float, float, float]
    """Median µs of CPU time the hooks add per operation, and its 95% interval."""
    pairs: int


def _psycopg_in_situ(dsn: str, config: PostgresConfig) -> InSitu:
    """Blocks of ``with pool.connection(): SELECT 1``, hooks on and off in pairs."""
    import psycopg_pool
    from opentelemetry.sdk.metrics import MeterProvider

    order = random.Random("psycopg_pool in situ")
    switch = HookSwitch()
    meters = MeterProvider()
    poolwatch.instrument(meter_provider=meters, process_view="off")
    on: list[float] = []
    off: list[float] = []
    try:
        with psycopg_pool.ConnectionPool(dsn, min_size=2, max_size=2, open=True) as pool:
            pool.wait()

            def operation() -> None:
                with pool.connection() as conn:
                    conn.execute("SELECT 1").fetchone()

            for _ in range(config.warmup):
                operation()
            deadline = time.monotonic() + config.in_situ_seconds
            for _ in range(config.in_situ_pairs):
                if time.monotonic() > deadline:
                    break
                first = order.random() < 0.5
                for hooked in (first, not first):
                    switch(hooked)
                    operation()  # untimed: a class's attributes changed, its caches refill
                    cpu = thread_time()
                    for _ in range(config.in_situ_block):
                        operation()
                    (on if hooked else off).append(
                        (thread_time() - cpu) / config.in_situ_block * 1e6
                    )
            switch(True)
            expected = config.warmup + len(on) * (config.in_situ_block + 1)
            counted = checkouts_of("psycopg_pool")
            if counted != expected:
                raise MeasurementError(
                    f"psycopg_pool in situ: {counted} checkouts counted for {expected}"
                )
    finally:
        poolwatch.uninstrument()
        meters.shutdown()
    return InSitu(statistics.median(off), median_interval(paired_differences(on, off)), len(on))


@dataclass(frozen=True)
class PostgresResults:
    acquire: dict[str, dict[str, Summary]]
    round_trip: dict[str, Summary]
    in_situ: InSitu
    clock_ns: float


def run_postgres(config: PostgresConfig) -> PostgresResults:
    """Start the cluster; measure every row side by side, then in situ."""
    with _cluster() as dsn:
        cases: dict[str, Callable[[str], float]] = {
            "psycopg_pool getconn()+putconn()": lambda v: _psycopg_sync(dsn, v, config),
            "psycopg_pool async getconn()+putconn()": lambda v: _psycopg_async(dsn, v, config),
            "asyncpg acquire()+release()": lambda v: _asyncpg(dsn, v, config),
        }
        acquire: dict[str, dict[str, Summary]] = {}
        for label, one in cases.items():
            variants = VARIANTS if label in FLOORED else ("bare", "poolwatch")
            runs = {variant: functools.partial(one, variant) for variant in variants}
            samples = interleave(runs, config.rounds)
            result = {name: summarize(values) for name, values in samples.items()}
            result["added"] = summarize(paired_differences(samples["poolwatch"], samples["bare"]))
            result.update(floor_results(samples))
            acquire[label] = result
        trips = interleave(
            {
                "psycopg": lambda: _select_psycopg(dsn, config),
                "asyncpg": lambda: _select_asyncpg(dsn, config),
            },
            config.rounds,
        )
        round_trip = {name: summarize(values) for name, values in trips.items()}
        in_situ = _psycopg_in_situ(dsn, config)
    return PostgresResults(acquire, round_trip, in_situ, clock_read_ns())


def render_postgres(measured: PostgresResults, config: PostgresConfig) -> str:
    trip = measured.round_trip
    lines = [
        heading("PostgreSQL pools: acquire+release, and a loopback SELECT 1"),
        f"{config.rounds} interleaved rounds x {config.ops} ops (asyncpg {config.ops // 5}), "
        f"after {config.warmup} warm-up; added = median of per-round paired differences",
        f"SELECT 1 round trip: psycopg {trip['psycopg'].median:.1f} µs "
        f"(IQR {trip['psycopg'].spread(1)}), asyncpg {trip['asyncpg'].median:.1f} µs "
        f"(IQR {trip['asyncpg'].spread(1)})",
        clock_line(measured.clock_ns),
    ]
    for label, row in measured.acquire.items():
        added = row["added"].median
        reference = trip["asyncpg" if label.startswith("asyncpg") else "psycopg"].median
        share = added / reference * 100
        lines.append(
            f"{label}: bare {row['bare'].median:.2f} µs, with poolwatch "
            f"{row['poolwatch'].median:.2f} µs: poolwatch adds {added:.2f} µs "
            f"(IQR {row['added'].spread(2)}; target <= {TARGET_ACQUIRE_US:.0f} µs: "
            f"{verdict(added <= TARGET_ACQUIRE_US)}), {share:.2f}% of a SELECT 1 "
            f"(target <= {TARGET_SHARE_PCT:.0f}%: {verdict(share <= TARGET_SHARE_PCT)})"
        )
        if "floor added" in row:
            lines.extend(floor_lines(row, added))
    s = measured.in_situ
    median, low, high = s.added
    lines.append(
        f"in situ, psycopg_pool connection() + SELECT 1 ({s.pairs} pairs of "
        f"{config.in_situ_block}): {s.bare:.1f} µs of CPU per operation bare; the hooks add "
        f"{median:.2f} µs (95% {low:.2f} to {high:.2f}), {median / s.bare * 100:.2f}%"
    )
    return "\n".join(lines)
