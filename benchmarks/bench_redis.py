"""Redis pools (redis-py): what poolwatch adds per acquire+release and per loopback ``PING``.

Against a throw-away ``redis-server`` on 127.0.0.1 (``poolwatch/_demo/redis.py``: a process
of its own, so that it does not share the client's interpreter lock), three measurements,
each timed side by side with bare redis-py in one run, with the methods of the http
section (``bench_http.py``, whose machinery this reuses):

* **acquire+release** — ``pool.release(pool.get_connection())`` on a pool holding one live
  idle connection, for ``ConnectionPool``, ``BlockingConnectionPool`` and the asyncio
  ``ConnectionPool`` (awaited): exactly the code poolwatch's checkout, connect-check and
  return hooks sit on — ``get_connection`` asks the connection to connect (it is, so only
  the connect hook's check runs) and whether it has unread data (a non-blocking poll of
  its socket) — without a command. ``bare`` and ``poolwatch`` in interleaved rounds of
  ``acquire_ops``; added = the median of the rounds' paired differences; target <= 1 µs.
  Each round checks that poolwatch counted every checkout (nothing, when bare). The two
  rows time two more variants in the same rounds: the floor's hooks (``_floor.py``),
  the least any hook reporting a wait and a use can add, and the same hooks without their
  clock reads; a clock read's cost in a tight loop is printed beside them.
* **PING** — ``client.ping()`` on a ``Redis`` and an asyncio ``Redis`` client, sequential:
  ``bare``, ``poolwatch`` and, when ``opentelemetry-instrumentation-redis`` is installed,
  ``contrib`` (spans to an in-memory exporter), in interleaved rounds, as the http
  section's per-request rows.
* **in situ** — what the hooks add to a ``PING``'s latency where it is paid, inside the
  request: one instrumented client, poolwatch's hooks switched off and on between paired
  blocks of requests, in ``in_situ_layouts`` processes laid out in memory by seeds of
  their own (``bench_http.measure_layout``, ``benchmarks/in_situ.py``); read from the
  client thread's CPU time and from the wall clock. Target: <= 1% of a loopback ``PING``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from _common import Summary, heading, interleave, paired_differences, summarize, verdict
from _floor import VARIANTS, clock_line, clock_read_ns, floor_hooks, floor_lines, floor_results
from bench_http import (
    TARGET_ACQUIRE_US,
    HTTPConfig,
    InSituResult,
    LibraryResult,
    MeasurementError,
    Redis,
    RedisAsync,
    checkouts_of,
    render_in_situ,
    run_in_situ,
    run_library,
)

import poolwatch

FLOORED = (
    "redis ConnectionPool get_connection()+release()",
    "redis BlockingConnectionPool get_connection()+release()",
    "redis.asyncio ConnectionPool get_connection()+release()",
)
"""Rows also timed with the floor's hooks, and with their frames alone (``_floor.py``)."""


def _instrumented(variant: str) -> None:
    if variant == "poolwatch":
        from opentelemetry.sdk.metrics import MeterProvider

        poolwatch.instrument(meter_provider=MeterProvider())


def _counted(label: str, variant: str, expected: int) -> None:
    counted = checkouts_of("redis")
    wanted = expected if variant == "poolwatch" else 0
    if counted != wanted:
        raise MeasurementError(
            f"{label} {variant}: {counted} checkouts counted for {expected} acquire+release"
        )


def _acquire_sync(url: str, variant: str, ops: int, *, blocking: bool) -> float:
    """µs per ``pool.release(pool.get_connection())`` with one live idle connection."""
    import redis

    _instrumented(variant)
    cls = redis.BlockingConnectionPool if blocking else redis.ConnectionPool
    try:
        with floor_hooks(variant, cls, "get_connection", "release") as timed:
            pool = cls.from_url(url, max_connections=1)
            pool.release(pool.get_connection())  # one live idle connection
            get, release = pool.get_connection, pool.release
            start = perf_counter()
            for _ in range(ops):
                release(get())
            elapsed = (perf_counter() - start) / ops * 1e6
            _counted(cls.__name__, variant, ops + 1)
            timed.check(ops + 1)
            pool.disconnect()
        return elapsed
    finally:
        poolwatch.uninstrument()


def _acquire_async(url: str, variant: str, ops: int) -> float:
    """µs per ``await pool.release(await pool.get_connection())``, asyncio."""
    import redis.asyncio

    async def run() -> float:
        pool = redis.asyncio.ConnectionPool.from_url(url, max_connections=1)
        await pool.release(await pool.get_connection())
        get, release = pool.get_connection, pool.release
        start = perf_counter()
        for _ in range(ops):
            await release(await get())
        elapsed = (perf_counter() - start) / ops * 1e6
        _counted("asyncio ConnectionPool", variant, ops + 1)
        await pool.disconnect()
        return elapsed

    _instrumented(variant)
    try:
        with floor_hooks(
            variant, redis.asyncio.ConnectionPool, "get_connection", "release"
        ) as timed:
            elapsed = asyncio.run(run())
            timed.check(ops + 1)
        return elapsed
    finally:
        poolwatch.uninstrument()


def run_acquire(url: str, config: HTTPConfig) -> dict[str, dict[str, Summary]]:
    """Per pool class, µs per acquire+release bare and with poolwatch, and what it adds."""
    ops = config.acquire_ops
    cases: dict[str, Callable[[str], float]] = {
        "redis ConnectionPool get_connection()+release()": lambda v: _acquire_sync(
            url, v, ops, blocking=False
        ),
        "redis BlockingConnectionPool get_connection()+release()": lambda v: _acquire_sync(
            url, v, ops, blocking=True
        ),
        "redis.asyncio ConnectionPool get_connection()+release()": lambda v: _acquire_async(
            url, v, ops
        ),
    }
    results: dict[str, dict[str, Summary]] = {}
    for label, one in cases.items():
        variants = VARIANTS if label in FLOORED else ("bare", "poolwatch")
        runs = {variant: functools.partial(one, variant) for variant in variants}
        samples = interleave(runs, config.acquire_rounds)
        result = {name: summarize(values) for name, values in samples.items()}
        result["added"] = summarize(paired_differences(samples["poolwatch"], samples["bare"]))
        result.update(floor_results(samples))
        results[label] = result
    return results


@dataclass(frozen=True)
class RedisResults:
    """Everything the section measured."""

    server: str
    pings: list[LibraryResult]
    acquire: dict[str, dict[str, Summary]]
    in_situ: list[InSituResult]
    clock_ns: float


def run_redis(config: HTTPConfig, *, in_situ: bool = True) -> RedisResults:
    """Start a throw-away redis-server, then measure acquire+release, PING and in situ."""
    from poolwatch._demo.redis import RedisServer

    with RedisServer() as server:
        url = server.url()
        version = server.command("INFO", "server")
        line = next(
            (row for row in _text(version).splitlines() if row.startswith("redis_version:")),
            "redis_version:unknown",
        )
        acquire = run_acquire(url, config)
        libraries: list[Any] = [Redis(), RedisAsync()]
        pings = [run_library(library, url, config) for library in libraries]
        situ = [run_in_situ(library, url, config) for library in libraries] if in_situ else []
    return RedisResults(line.split(":", 1)[1].strip(), pings, acquire, situ, clock_read_ns())


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def render_redis(measured: RedisResults, config: HTTPConfig) -> str:
    """The acquire+release rows, the PING table, the in-situ tables, the verdicts."""
    lines = [
        heading("Redis pools (redis-py): acquire+release, and a loopback PING"),
        f"redis-server {measured.server} on 127.0.0.1, in its own process",
        f"acquire+release: {config.acquire_rounds} interleaved rounds x {config.acquire_ops} "
        "ops, one live idle connection; added = median of per-round paired differences",
        clock_line(measured.clock_ns),
    ]
    for label, row in measured.acquire.items():
        added = row["added"].median
        lines.append(
            f"{label}: bare {row['bare'].median:.2f} µs, with poolwatch "
            f"{row['poolwatch'].median:.2f} µs (IQR {row['poolwatch'].spread()}): poolwatch "
            f"adds {added:.2f} µs (IQR {row['added'].spread()}) per acquire+release "
            f"(target <= {TARGET_ACQUIRE_US:.0f} µs): {verdict(added <= TARGET_ACQUIRE_US)}"
        )
        if "floor added" in row:
            lines.extend(floor_lines(row, added))
    lines.append("")
    lines.append(
        f"PING: {config.rounds} interleaved rounds x {config.requests} requests (after "
        f"{config.warmup} warm-up); added = median of per-round paired differences"
    )
    for r in measured.pings:
        bare = r.per_request["bare"].median
        parts = [f"{r.name}: bare {bare:.1f} µs"]
        for variant, summary in r.added.items():
            a = summary.median
            parts.append(f"{variant} {a:+.2f} µs ({a / bare * 100:+.2f}%)")
        if r.refusal:
            parts.append(f"contrib skipped: {r.refusal}")
        lines.append(", ".join(parts))
    if measured.in_situ:
        lines.append(
            render_in_situ(measured.in_situ, config, "Redis pools: added latency per PING, in situ")
        )
    return "\n".join(lines)


def main(config: HTTPConfig) -> str:
    """Run the section and render it; a machine where redis-server cannot run says so."""
    from poolwatch._demo.redis import RedisError, find_server

    try:
        find_server()
    except RedisError as missing:
        return heading("Redis pools (redis-py)") + f"\nskipped: {missing}"
    return render_redis(run_redis(config), config)
